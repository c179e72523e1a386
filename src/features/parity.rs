//! Test-only harness for the log-mel parity test: runs the NumPy reference
//! (`python -m mbt.logmel IN.npy OUT.npy --metadata M.json`, models/mbt/logmel.py) on
//! samples written as .npy and reads its output back.
//!
//! The only I/O in `features`, and only under `cfg(test)`. The interpreter is `$MBT_PYTHON`
//! (which must have numpy), else the first of models/.venv/bin/python,
//! target/py-ci/bin/python (CI) and python3 that can import numpy; with none the parity test
//! says so and passes. The committed fixture in models/testdata needs no interpreter.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::model::AudioRecipe;

/// An interpreter that can import numpy, or `None` (the caller skips the test).
pub(super) fn python() -> Option<PathBuf> {
    if let Some(explicit) = std::env::var_os("MBT_PYTHON") {
        let explicit = PathBuf::from(explicit);
        assert!(has_numpy(&explicit), "MBT_PYTHON={} cannot import numpy", explicit.display());
        return Some(explicit);
    }
    let root = repository_root();
    [root.join("models/.venv/bin/python"), root.join("target/py-ci/bin/python"), PathBuf::from("python3")]
        .into_iter()
        .find(|python| has_numpy(python))
}

/// The reference's `[T, M]` output for `audio` under `recipe`, flattened.
pub(super) fn reference_log_mel(python: &Path, recipe: &AudioRecipe, audio: &[f32]) -> Vec<f32> {
    let dir = std::env::temp_dir().join(format!("mbt-edge-logmel-parity-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("temporary folder");
    let (input, output, metadata) = (dir.join("in.npy"), dir.join("out.npy"), dir.join("metadata.json"));
    crate::npy::write_npy(&input, &[audio.len()], audio).expect("writing in.npy");
    std::fs::write(&metadata, metadata_json(recipe)).expect("writing metadata.json");
    let run = Command::new(python)
        .args(["-m", "mbt.logmel"])
        .args([&input, &output])
        .arg("--metadata")
        .arg(&metadata)
        .current_dir(repository_root().join("models"))
        .stdin(Stdio::null())
        .output()
        .expect("running the reference");
    assert!(run.status.success(), "python -m mbt.logmel failed: {}", String::from_utf8_lossy(&run.stderr));
    let (shape, values) = crate::npy::read_npy(&output).expect("reading out.npy");
    assert_eq!(shape, [recipe.n_frames, recipe.n_mels], "the reference's output shape");
    let _ = std::fs::remove_dir_all(&dir);
    values
}

/// The committed fixture models/testdata/logmel.{samples,expected}.npy and its recipe
/// (logmel.recipe.json, written by models/testdata/make_testdata.py): (recipe, samples,
/// expected `[T, M]` flattened). Checks parity where no Python is installed.
pub(super) fn committed_fixture() -> (AudioRecipe, Vec<f32>, Vec<f32>) {
    let dir = repository_root().join("models/testdata");
    let json = std::fs::read_to_string(dir.join("logmel.recipe.json")).expect("logmel.recipe.json");
    let fields = flat_json_object(&json);
    let field = |key: &str| {
        fields
            .iter()
            .find(|(name, _)| name == key)
            .map(|(_, value)| value.as_str())
            .unwrap_or_else(|| panic!("logmel.recipe.json has no {key:?}"))
    };
    let number =
        |key: &str| field(key).parse::<f64>().unwrap_or_else(|err| panic!("logmel.recipe.json {key:?}: {err}"));
    let count = |key: &str| number(key) as usize;
    let recipe = AudioRecipe {
        sample_rate: number("sample_rate") as u32,
        n_frames: count("n_frames"),
        n_mels: count("n_mels"),
        win_length: count("win_length"),
        hop_length: count("hop_length"),
        n_fft: count("n_fft"),
        window: field("window").trim_matches('"').to_string(),
        mel_scale: field("mel_scale").trim_matches('"').to_string(),
        fmin: number("fmin"),
        fmax: number("fmax"),
        power: number("power"),
        log_offset: number("log_offset"),
        mean: number("mean"),
        std: number("std"),
    };
    let (_, samples) = crate::npy::read_npy(&dir.join("logmel.samples.npy")).expect("logmel.samples.npy");
    let (shape, expected) = crate::npy::read_npy(&dir.join("logmel.expected.npy")).expect("logmel.expected.npy");
    assert_eq!(shape, [recipe.n_frames, recipe.n_mels], "logmel.expected.npy's shape");
    (recipe, samples, expected)
}

/// `{"key": value, ...}` without nesting, strings without escapes: (key, raw value) pairs.
fn flat_json_object(json: &str) -> Vec<(String, String)> {
    let body = json.trim().trim_start_matches('{').trim_end_matches('}');
    body.split(',')
        .filter_map(|pair| pair.split_once(':'))
        .map(|(key, value)| (key.trim().trim_matches('"').to_string(), value.trim().to_string()))
        .collect()
}

fn repository_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn has_numpy(python: &Path) -> bool {
    Command::new(python)
        .args(["-c", "import numpy"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

/// The part of the `mbt` metadata the reference's CLI reads (models/METADATA.md).
fn metadata_json(recipe: &AudioRecipe) -> String {
    let window_seconds = (recipe.n_frames * recipe.hop_length) as f64 / recipe.sample_rate as f64;
    format!(
        concat!(
            r#"{{"window_seconds": {:?}, "audio": {{"sample_rate": {}, "n_frames": {}, "n_mels": {}, "#,
            r#""win_length": {}, "hop_length": {}, "n_fft": {}, "window": "{}", "mel_scale": "{}", "#,
            r#""fmin": {:?}, "fmax": {:?}, "power": {:?}, "log_offset": {:?}, "mean": {:?}, "std": {:?}}}}}"#
        ),
        window_seconds,
        recipe.sample_rate,
        recipe.n_frames,
        recipe.n_mels,
        recipe.win_length,
        recipe.hop_length,
        recipe.n_fft,
        recipe.window,
        recipe.mel_scale,
        recipe.fmin,
        recipe.fmax,
        recipe.power,
        recipe.log_offset,
        recipe.mean,
        recipe.std,
    )
}
