//! The model stage on the real model files: tract's logits equal the PyTorch outputs
//! committed as parity fixtures, and broken or mismatched model files end in a clear message
//! and exit 78 from the binary.

use std::path::{Path, PathBuf};
use std::process::Command;

use mbt_edge::config::Runtime;
use mbt_edge::model::{Int8Attention, ModelInfo, ModelRuntime, Parallelism, Selection};
use mbt_edge::npy::read_npy;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The inputs of `model`'s parity fixture (`NAME.parity/`): (batch, video, audio).
fn fixture_inputs(model: &Path) -> (usize, Vec<f32>, Vec<f32>) {
    let fixture = model.with_extension("parity");
    let (video_shape, video) = read_npy(&fixture.join("video.npy")).expect("video.npy");
    let (_, audio) = read_npy(&fixture.join("audio.npy")).expect("audio.npy");
    (video_shape[0], video, audio)
}

/// Runs the fixture inputs of `model` through tract and compares every output with the
/// PyTorch values within `tolerance` (absolute, on logits).
/// (An int8 model's attention products stay f32 here, as onnxruntime runs them: the int8
/// ones are checked by `int8_attention_keeps_the_top_1_of_f32_attention`.)
fn check_parity(model: &Path, tolerance: f32) {
    let fixture = model.with_extension("parity");
    let info = ModelInfo::read(model).unwrap_or_else(|err| panic!("{err}"));
    let selection = Selection::from_env().expect("MBT_EDGE_KERNEL");
    let mut runtime = ModelRuntime::load_with(&info, Runtime::Cpu, 1, selection, Int8Attention::Off, Parallelism::Auto)
        .unwrap_or_else(|err| panic!("{err}"));
    let (batch, video, audio) = fixture_inputs(model);
    let logits = runtime.run(batch, &video, &audio).expect("tract runs the model");
    let mut worst = 0f32;
    for (name, pick) in [("logits", 0), ("logits_audio", 1), ("logits_video", 2)] {
        let (shape, expected) = read_npy(&fixture.join(format!("{name}.npy"))).expect(name);
        assert_eq!(shape, [batch, info.metadata.labels.len()]);
        let got: Vec<f32> = logits
            .iter()
            .flat_map(|row| match pick {
                0 => row.fused.clone(),
                1 => row.audio.clone().expect("audio logits"),
                _ => row.video.clone().expect("video logits"),
            })
            .collect();
        for (got, expected) in got.iter().zip(&expected) {
            worst = worst.max((got - expected).abs());
        }
    }
    eprintln!("{}: max |tract - pytorch| = {worst:e}", model.display());
    assert!(worst < tolerance, "max difference {worst}");
}

#[test]
fn tiny_model_matches_pytorch() {
    check_parity(&repo().join("models/testdata/mbt-tiny.onnx"), 1e-4);
}

#[test]
fn demo_model_matches_pytorch() {
    check_parity(&repo().join("models/avsynth-edge.onnx"), 1e-4);
}

#[test]
fn int8_model_matches_its_onnxruntime_outputs() {
    // The fixture's reference is onnxruntime's int8 arithmetic (rounding differs slightly from
    // tract's, and on AMX machines the weight matmuls run as the fused op of src/model/int8.rs).
    check_parity(&repo().join("models/avsynth-edge-int8.onnx"), 2e-2);
}

/// The shipped int8 model with its attention products in int8 (every head: `Always`; where
/// this CPU has VNNI, else both runs are the same, and the test says so) against the same file
/// with them in f32, and against the f32 model, on 32 random windows (video U(-1, 1), audio
/// N(0, 1)-like, as the parity fixtures): the top-1 class of the fused, audio and video logits
/// agrees with f32 attention on every window, and moves no more often against the f32 model
/// than the int8 weights alone do. Prints the agreement and the largest logit change.
/// `MBT_EDGE_TOP1_MODELS=F32,INT8` runs another pair instead (the vit-base export and its
/// int8 file, too big to commit: BENCHMARKS.md), `MBT_EDGE_TOP1_WINDOWS=N` on N windows.
#[test]
fn int8_attention_keeps_the_top_1_of_f32_attention() {
    let selection = Selection::from_env().expect("MBT_EDGE_KERNEL");
    let pair =
        std::env::var("MBT_EDGE_TOP1_MODELS").unwrap_or_else(|_| "avsynth-edge.onnx,avsynth-edge-int8.onnx".into());
    let (f32_file, int8_file) = pair.split_once(',').expect("MBT_EDGE_TOP1_MODELS=F32,INT8");
    let load = |name: &str, int8_attention: Int8Attention| {
        let info = ModelInfo::read(&repo().join("models").join(name)).unwrap_or_else(|err| panic!("{err}"));
        ModelRuntime::load_with(&info, Runtime::Cpu, 2, selection, int8_attention, Parallelism::Auto)
            .unwrap_or_else(|err| panic!("{err}"))
    };
    // `Always`: edge-small's 129-133 keys are fewer than the default takes.
    let mut int8 = load(int8_file, Int8Attention::Always);
    let mut int8_f32_attention = load(int8_file, Int8Attention::Off);
    let mut f32 = load(f32_file, Int8Attention::Off);
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let mut uniform = move || {
        state = state.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
        (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    };
    let windows = std::env::var("MBT_EDGE_TOP1_WINDOWS").map_or(32, |n| n.parse().expect("MBT_EDGE_TOP1_WINDOWS"));
    let video: Vec<f32> = (0..windows * int8.video_len()).map(|_| uniform()).collect();
    // A sum of three uniforms: mean 0, variance 1, as the fixtures' normal audio.
    let audio: Vec<f32> = (0..windows * int8.audio_len()).map(|_| uniform() + uniform() + uniform()).collect();
    let top1 = |v: &[f32]| v.iter().enumerate().fold(0, |best, (ix, x)| if *x > v[best] { ix } else { best });
    let heads = |l: &mbt_edge::model::Logits| [l.fused.clone(), l.audio.clone().unwrap(), l.video.clone().unwrap()];
    let (a, b, c) = (
        int8.run(windows, &video, &audio).unwrap(),
        int8_f32_attention.run(windows, &video, &audio).unwrap(),
        f32.run(windows, &video, &audio).unwrap(),
    );
    let (mut same, mut int8_vs_f32, mut weights_vs_f32, mut worst) = (0, 0, 0, 0f32);
    for ((a, b), c) in a.iter().zip(&b).zip(&c) {
        for ((a, b), c) in heads(a).iter().zip(&heads(b)).zip(&heads(c)) {
            same += (top1(a) == top1(b)) as usize;
            int8_vs_f32 += (top1(a) == top1(c)) as usize;
            weights_vs_f32 += (top1(b) == top1(c)) as usize;
            worst = a.iter().zip(b).fold(worst, |w, (x, y)| w.max((x - y).abs()));
        }
    }
    let total = 3 * windows;
    eprintln!(
        "int8 attention: top-1 equal to f32 attention {same}/{total}; against the f32 model {int8_vs_f32}/{total} \
         (int8 weights alone {weights_vs_f32}/{total}); largest |logit change| {worst:e}"
    );
    assert_eq!(same, total, "int8 attention moved a top-1 class");
    // The int8 products ran (the logits moved) wherever the CPU has a VNNI path for them.
    assert_eq!(worst > 0.0, Int8Attention::runs_on(selection), "largest change {worst}");
    assert!(int8_vs_f32 >= weights_vs_f32, "int8 attention: {int8_vs_f32} against {weights_vs_f32}");
}

/// The two encoders side by side (`Parallelism::Streams`: the audio encoder on a second
/// thread) give the logits of each op split over the threads (`Ops`) and of one thread, bit
/// for bit, on the tiny, demo and int8 demo models (the fixtures' inputs); `Auto` takes the
/// lanes at the demo model's size and splits the ops of a batch big enough (streams.rs's
/// tests: of encoders of unequal size).
#[test]
fn encoders_side_by_side_give_the_logits_of_one_thread() {
    let selection = Selection::from_env().expect("MBT_EDGE_KERNEL");
    for name in ["testdata/mbt-tiny.onnx", "avsynth-edge.onnx", "avsynth-edge-int8.onnx"] {
        let model = repo().join("models").join(name);
        let info = ModelInfo::read(&model).unwrap_or_else(|err| panic!("{err}"));
        let load = |threads: usize, parallelism: Parallelism| {
            ModelRuntime::load_with(&info, Runtime::Cpu, threads, selection, Int8Attention::Auto, parallelism)
                .unwrap_or_else(|err| panic!("{err}"))
        };
        let (batch, video, audio) = fixture_inputs(&model);
        let mut one = load(1, Parallelism::Auto);
        let want = one.run(batch, &video, &audio).unwrap();
        assert_eq!(one.parallelism(batch), Some("one thread"));
        for (parallelism, runs_as) in [(Parallelism::Streams, "streams"), (Parallelism::Ops, "ops")] {
            let mut runtime = load(2, parallelism);
            for round in 0..2 {
                assert_eq!(runtime.run(batch, &video, &audio).unwrap(), want, "{name}: {runs_as}, round {round}");
            }
            assert_eq!(runtime.parallelism(batch), Some(runs_as), "{name}");
        }
        if name != "avsynth-edge.onnx" {
            continue;
        }
        // Encoders of one size (128 tokens each) and small products: the lanes.
        let mut auto = load(2, Parallelism::Auto);
        assert_eq!(auto.run(batch, &video, &audio).unwrap(), want);
        assert_eq!(auto.parallelism(batch), Some("streams"), "edge-small at batch {batch}");
        // The choice does not depend on the architecture; under qemu (scripts/test-aarch64.sh)
        // these 32 windows on tract's own kernels would take two minutes.
        if cfg!(target_arch = "x86_64") {
            // 32 windows: fc1 is 32 x 133 x 128 x 512 = 279 M multiply-adds; each op is split.
            let many = 32;
            let (v, a) = (video[..auto.video_len()].repeat(many), audio[..auto.audio_len()].repeat(many));
            let logits = auto.run(many, &v, &a).unwrap();
            assert_eq!(auto.parallelism(many), Some("ops"), "edge-small at batch {many}");
            for (x, y) in logits[many - 1].fused.iter().zip(&want[0].fused) {
                assert!((x - y).abs() < 1e-5, "the last of {many} windows against the first alone: {x} vs {y}");
            }
        }
    }
}

#[test]
fn batches_of_any_size_give_the_same_logits_as_single_windows() {
    batches_match_single_windows(&repo().join("models/testdata/mbt-tiny.onnx"));
}

#[test]
fn int8_batches_give_the_same_logits_as_single_windows() {
    batches_match_single_windows(&repo().join("models/avsynth-edge-int8.onnx"));
}

fn batches_match_single_windows(model: &Path) {
    let info = ModelInfo::read(model).unwrap();
    let mut runtime = ModelRuntime::load(&info, Runtime::Cpu, 1).unwrap();
    let (batch, video, audio) = fixture_inputs(model);
    let together = runtime.run(batch, &video, &audio).unwrap();
    for row in 0..batch {
        let v = &video[row * runtime.video_len()..(row + 1) * runtime.video_len()];
        let a = &audio[row * runtime.audio_len()..(row + 1) * runtime.audio_len()];
        let alone = runtime.run(1, v, a).unwrap();
        for (x, y) in alone[0].fused.iter().zip(&together[row].fused) {
            assert!((x - y).abs() < 1e-5, "row {row}: {x} vs {y}");
        }
    }
}

#[test]
fn cuda_without_a_driver_is_refused_and_auto_falls_back() {
    let info = ModelInfo::read(&repo().join("models/testdata/mbt-tiny.onnx")).unwrap();
    // This machine has no GPU: auto must give the CPU, cuda must refuse with a reason.
    let auto = ModelRuntime::load(&info, Runtime::Auto, 1).expect("auto falls back to the CPU");
    assert_eq!(auto.backend_name(), "cpu");
    let err = ModelRuntime::load(&info, Runtime::Cuda, 1).expect_err("no CUDA here").to_string();
    assert!(err.contains("model.runtime = \"cuda\""), "{err}");
}

// The binary: broken model files end in exit 78 with a clear message.

fn mbt_edge() -> Command {
    Command::new(env!("CARGO_BIN_EXE_mbt-edge"))
}

fn check_config_fails(dir: &Path, model_path: &Path, extra: &str, needle: &str) {
    let config = dir.join("config.toml");
    std::fs::write(&config, format!("[model]\npath = \"{}\"\n{extra}", model_path.display())).unwrap();
    let output = mbt_edge().args(["check-config", "--config"]).arg(&config).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(78), "stderr: {stderr}");
    assert!(stderr.contains(needle), "{needle:?} not in: {stderr}");
    assert!(stderr.contains("config.toml:"), "names the config file: {stderr}");
}

#[test]
fn check_config_accepts_a_good_model() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("config.toml");
    let model = repo().join("models/testdata/mbt-tiny.onnx");
    std::fs::write(&config, format!("[model]\npath = \"{}\"\n", model.display())).unwrap();
    let output = mbt_edge().args(["check-config", "--config"]).arg(&config).output().unwrap();
    assert_eq!(output.status.code(), Some(0), "{}", String::from_utf8_lossy(&output.stderr));
    assert!(String::from_utf8_lossy(&output.stdout).contains("model mbt-tiny"));
}

#[test]
fn garbage_model_file_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("broken.onnx");
    std::fs::write(&model, b"this is not a protobuf at all \x00\xff\x13").unwrap();
    check_config_fails(dir.path(), &model, "", "not a valid ONNX model");
}

#[test]
fn missing_model_file_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    check_config_fails(dir.path(), &dir.path().join("absent.onnx"), "", "cannot read the model");
}

/// The tiny model with its `mbt` metadata removed or altered, written with the onnx package
/// when Python has it; otherwise by editing the protobuf bytes of the key.
fn model_with_metadata_key_renamed(dir: &Path) -> PathBuf {
    let bytes = std::fs::read(repo().join("models/testdata/mbt-tiny.onnx")).unwrap();
    // metadata_props entry: field 14, then key field 1 = "mbt" (0x0a 0x03 'm' 'b' 't').
    let needle = b"\x0a\x03mbt";
    let position = bytes.windows(needle.len()).rposition(|window| window == needle).expect("the key is in the file");
    let mut edited = bytes.clone();
    edited[position + 2..position + 5].copy_from_slice(b"xyz");
    let path = dir.join("no-metadata.onnx");
    std::fs::write(&path, edited).unwrap();
    path
}

#[test]
fn model_without_metadata_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let model = model_with_metadata_key_renamed(dir.path());
    check_config_fails(dir.path(), &model, "", "has no `mbt` metadata entry");
}

#[test]
fn model_whose_frame_size_contradicts_its_graph_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(repo().join("models/testdata/mbt-tiny.onnx")).unwrap();
    let text = String::from_utf8_lossy(&bytes);
    let info = ModelInfo::read(&repo().join("models/testdata/mbt-tiny.onnx")).unwrap();
    let width = info.metadata.video.as_ref().unwrap().width;
    // Same-length edit of the JSON: "width": 32 -> "width": 99 keeps the protobuf valid.
    let separator = if text.contains(&format!("\"width\": {width}")) { ": " } else { ":" };
    let from = format!("\"width\"{separator}{width}");
    assert!(text.contains(&from), "metadata JSON layout changed");
    let to = format!("\"width\"{separator}{}", if width == 99 { 98 } else { 99 });
    assert_eq!(from.len(), to.len());
    let position = bytes.windows(from.len()).position(|window| window == from.as_bytes()).unwrap();
    let mut edited = bytes.clone();
    edited[position..position + to.len()].copy_from_slice(to.as_bytes());
    let model = dir.path().join("wrong-width.onnx");
    std::fs::write(&model, edited).unwrap();
    check_config_fails(dir.path(), &model, "", "`video` has shape");
}

#[test]
fn window_seconds_contradicting_the_model_exits_78() {
    let dir = tempfile::tempdir().unwrap();
    let model = repo().join("models/testdata/mbt-tiny.onnx");
    check_config_fails(dir.path(), &model, "\n[window]\nseconds = 7.0\n", "differs from the model's window");
}
