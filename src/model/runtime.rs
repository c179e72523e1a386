//! The model runtime on tract: load the ONNX graph once, keep it decluttered with a symbolic
//! batch, and prepare one optimized plan per batch size actually used (batch 1 at load).
//! CPU by default; with the `cuda` feature the CUDA runtime registered by tract-cuda, found
//! through tract's runtime registry (never by calling CUDA directly: without a driver that
//! would panic). On the CPU the fused ops of `f32fuse.rs` and `int8.rs` replace tract's chains
//! on the kernel path `MBT_EDGE_KERNEL` selects (`kernel.rs`). Each model owns one thread pool
//! of `[model] threads` (tract's rayon `Executor`), made at load and kept for the model's
//! life: every plan runs inside it, so tract's matrix products and the fused ops share its
//! threads and no call spawns one.

use std::collections::HashMap;

use anyhow::{Context as _, bail, ensure};
use tract_linalg::multithread::{Executor, multithread_tract_scope};
use tract_onnx::prelude::*;
use tract_onnx::tract_core::runtime::{Runnable, Runtime as TractRuntime, runtime_for_name};

// Linking tract-cuda registers its runtime in tract's registry.
#[cfg(feature = "gpu")]
use tract_cuda as _;

use super::int8::attention::Int8Attention;
use super::kernel::Selection;
use super::streams::{Parallelism, STREAMS_BELOW, STREAMS_SHARE, StreamPlan, largest_product};
use super::{ModelError, ModelInfo};
use crate::config::Runtime as RuntimeChoice;

/// Raw logits of one window.
#[derive(Debug, Clone, PartialEq)]
pub struct Logits {
    pub fused: Vec<f32>,
    pub audio: Option<Vec<f32>>,
    pub video: Option<Vec<f32>>,
}

/// A loaded model ready to run batches.
pub struct ModelRuntime {
    backend: &'static dyn TractRuntime,
    typed: TypedModel,
    batch_symbol: Option<Symbol>,
    plans: HashMap<usize, Plan>,
    video_input: Option<usize>,
    audio_input: Option<usize>,
    outputs: [Option<usize>; 3],
    video_len: usize,
    audio_len: usize,
    video_shape: Vec<usize>,
    audio_shape: Vec<usize>,
    classes: usize,
    /// The model's threads (tract's executor; single-threaded for `threads = 1`).
    executor: Executor,
    parallelism: Parallelism,
    selection: Selection,
    /// The int8 weight matmuls' path (None: none fused), and the int8 attention's with the
    /// fewest keys it takes and how many attention ops have such heads (None: attention f32).
    int8: Option<super::int8::Int8Path>,
    int8_attention: Option<(super::int8::Int8Path, usize, usize)>,
}

impl std::fmt::Debug for ModelRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ModelRuntime")
            .field("backend", &self.backend.name())
            .field("batches", &self.plans.keys())
            .field("kernel", &self.selection)
            .finish()
    }
}

/// A plan for one batch size: tract's, or the two encoders side by side (`streams.rs`).
enum Plan {
    Tract(Box<dyn Runnable>),
    Streams(Box<StreamPlan>),
}

/// Picks the tract runtime for `choice`; says plainly why CUDA is not used.
pub fn select_backend(choice: RuntimeChoice) -> Result<&'static dyn TractRuntime, String> {
    let cpu = || runtime_for_name("cpu").ok().flatten().ok_or_else(|| "tract's cpu runtime is missing".to_string());
    match choice {
        RuntimeChoice::Cpu => cpu(),
        RuntimeChoice::Cuda | RuntimeChoice::Auto => {
            let cuda = if cfg!(feature = "gpu") {
                match runtime_for_name("cuda") {
                    Ok(Some(runtime)) => Ok(runtime),
                    Ok(None) => Err("tract's cuda runtime is not registered".to_string()),
                    Err(err) => Err(format!("no usable CUDA driver: {err:#}")),
                }
            } else {
                Err("this build has no CUDA support (build with `--features cuda`, or `cuda-12` on a Jetson)"
                    .to_string())
            };
            match (cuda, choice) {
                (Ok(runtime), _) => Ok(runtime),
                (Err(reason), RuntimeChoice::Cuda) => Err(format!("model.runtime = \"cuda\" but {reason}")),
                (Err(reason), _) => {
                    tracing::info!(reason, "runtime auto: using the CPU");
                    cpu()
                }
            }
        }
    }
}

impl ModelRuntime {
    /// Loads `info`'s model for `choice` with `threads` threads, the fused ops on the kernel
    /// path `MBT_EDGE_KERNEL` selects (by default the best this CPU has), an int8 model's
    /// attention products in int8 unless `MBT_EDGE_INT8_ATTENTION=0`, its threads used as
    /// `MBT_EDGE_PARALLEL` says (by default: per op for big ops, per encoder for small ones).
    pub fn load(info: &ModelInfo, choice: RuntimeChoice, threads: usize) -> Result<ModelRuntime, ModelError> {
        let mismatch = |message: String| ModelError::Mismatch { path: info.path.clone(), message };
        let selection = Selection::from_env().map_err(|err| mismatch(err.to_string()))?;
        let parallelism = Parallelism::from_env().map_err(|err| mismatch(err.to_string()))?;
        ModelRuntime::load_with(info, choice, threads, selection, Int8Attention::from_env(), parallelism)
    }

    /// [`ModelRuntime::load`] with the kernel path given, when an int8 model runs its
    /// attention products in int8 (where the CPU has VNNI), and how it uses its threads
    /// (tests, benchmarks).
    pub fn load_with(
        info: &ModelInfo,
        choice: RuntimeChoice,
        threads: usize,
        selection: Selection,
        int8_attention: Int8Attention,
        parallelism: Parallelism,
    ) -> Result<ModelRuntime, ModelError> {
        let mismatch = |message: String| ModelError::Mismatch { path: info.path.clone(), message };
        if let Selection::Fused(kernel) = selection
            && let Some(missing) = kernel.missing()
        {
            return Err(mismatch(format!("kernel path {kernel} needs {missing}, which this CPU lacks")));
        }
        let backend = select_backend(choice).map_err(mismatch)?;
        let executor =
            if threads > 1 { Executor::multithread_with_name(threads, "mbt-model") } else { Executor::SingleThread };
        // A GPU backend gets the one Softmax back where rewrite.py spelled it with MaxPool,
        // which tract-cuda lacks (gpu_graph.rs); the CPU keeps the faster spelled-out form.
        let restored;
        let proto = if backend.name() == "cpu" {
            &info.proto
        } else {
            let mut proto = info.proto.clone();
            let count = super::gpu_graph::restore_softmax(&mut proto);
            tracing::debug!(count, backend = %backend.name(), "softmax chains restored to Softmax for the GPU");
            restored = proto;
            &restored
        };
        let inference = tract_onnx::onnx()
            .model_for_proto_model(proto)
            .map_err(|err| ModelError::NotOnnx { path: info.path.clone(), message: format!("{err:#}") })?;
        let mut typed = inference
            .into_typed()
            .and_then(|model| model.into_decluttered())
            .map_err(|err| mismatch(format!("tract cannot type the graph: {err:#}")))?;
        // The CLS token read as a one-row slice, which tract then pushes up into the last
        // layer (gather.rs): that layer runs its tail for one row instead of every token.
        if backend.name() == "cpu" {
            let mut sliced = typed.clone();
            match super::gather::gathers_as_slices(&mut sliced).and_then(|count| {
                if count > 0 {
                    sliced.declutter()?;
                    // Each round moves slices upstream; a few rounds reach the projections.
                    for _ in 0..8 {
                        if super::gather::slices_through_products(&mut sliced)? == 0 {
                            break;
                        }
                        sliced.declutter()?;
                    }
                }
                Ok(count)
            }) {
                Ok(0) => {}
                Ok(count) => {
                    tracing::debug!(count, "gathers of one index as slices");
                    typed = sliced;
                }
                Err(err) => tracing::warn!("gathers left as they are: {err:#}"),
            }
        }
        // The int8 weight matmuls of a quantised model as one fused op per input (int8.rs), on
        // AMX tiles, VNNI (`vpdpbusd`, 512 or 256 bits) or AVX2 (`vpmaddwd`); a graph without
        // them (any f32 model) is left as it is.
        let cpu = backend.name() == "cpu";
        let int8_path = match selection {
            Selection::Fused(kernel) => super::int8::Int8Path::for_kernel(kernel),
            Selection::Tract => None,
        };
        let mut int8_model = None;
        if let (true, Some(path)) = (cpu, int8_path) {
            let mut fused = typed.clone();
            match super::int8::fuse(&mut fused, path) {
                Ok(0) => {}
                Ok(count) => {
                    tracing::debug!(count, ?path, "int8 matmuls fused");
                    typed = fused;
                    int8_model = Some(path);
                }
                Err(err) => tracing::warn!("int8 matmuls left to tract: {err:#}"),
            }
        }
        // Softmax, LayerNorm and GELU chains, the f32 weight matmuls with their bias and the
        // attention products as one fused op each (f32fuse.rs); anything else is left as it is.
        if let (true, Selection::Fused(kernel)) = (cpu, selection) {
            let mut fused = typed.clone();
            match super::f32fuse::fuse(&mut fused, kernel) {
                Ok(0) => {}
                Ok(count) => {
                    tracing::debug!(count, %kernel, "f32 ops fused");
                    typed = fused;
                }
                Err(err) => tracing::warn!("f32 ops left to tract: {err:#}"),
            }
        }
        // An int8 model's attention products in integers as well (int8/attention.rs), unless
        // told not to (MBT_EDGE_INT8_ATTENTION=0); f32 models keep them f32.
        let mut attention = None;
        if let Some((path, min_keys)) =
            int8_model.and_then(super::int8::attention::path_for).zip(int8_attention.min_keys())
        {
            let (count, taken) = super::f32fuse::int8_attention(&mut typed, path, min_keys);
            tracing::debug!(count, taken, ?path, min_keys, "attention products in int8");
            attention = Some((path, min_keys, taken));
        }
        let input_outlets = typed.input_outlets().map_err(|err| mismatch(format!("{err:#}")))?.to_vec();
        let output_outlets = typed.output_outlets().map_err(|err| mismatch(format!("{err:#}")))?.to_vec();
        let input_names: Vec<String> =
            input_outlets.iter().map(|outlet| typed.node(outlet.node).name.clone()).collect();
        let output_names: Vec<String> = output_outlets
            .iter()
            .map(|outlet| {
                typed.outlet_label(*outlet).map(str::to_string).unwrap_or_else(|| typed.node(outlet.node).name.clone())
            })
            .collect();
        let find_input = |name: &str| input_names.iter().position(|input| input == name);
        let find_output = |name: &str| output_names.iter().position(|output| output == name);
        let metadata = &info.metadata;
        let video_shape: Vec<usize> =
            metadata.video.as_ref().map(|v| vec![v.frames, 3, v.height as usize, v.width as usize]).unwrap_or_default();
        let audio_shape: Vec<usize> = metadata.audio.as_ref().map(|a| vec![a.n_frames, a.n_mels]).unwrap_or_default();
        let batch_symbol = typed.symbols.get("batch");
        let runtime = ModelRuntime {
            backend,
            batch_symbol,
            plans: HashMap::new(),
            video_input: find_input("video"),
            audio_input: find_input("audio"),
            outputs: [find_output("logits"), find_output("logits_audio"), find_output("logits_video")],
            video_len: video_shape.iter().product(),
            audio_len: audio_shape.iter().product(),
            video_shape,
            audio_shape,
            classes: metadata.labels.len(),
            typed,
            executor,
            parallelism,
            selection,
            int8: int8_model,
            int8_attention: attention,
        };
        if runtime.outputs[0].is_none() {
            return Err(mismatch(format!("tract sees outputs {output_names:?}, none named `logits`")));
        }
        let mut runtime = runtime;
        runtime.plan(1).map_err(|err| mismatch(format!("tract cannot prepare the model: {err:#}")))?;
        Ok(runtime)
    }

    /// The tract runtime in use: `cpu` or `cuda`.
    pub fn backend_name(&self) -> String {
        self.backend.name().to_string()
    }

    /// What runs in int8: `f32` for none; else the weight matmuls' path and, where they run
    /// in int8 too, the attention products' (`int8 vnni512, attention int8 vnni512 in 30 ops
    /// (heads of >= 256 keys)`, or `attention f32 (no head of >= 256 keys)`).
    pub fn precision(&self) -> String {
        let name = |path: super::int8::Int8Path| format!("{path:?}").to_ascii_lowercase();
        match (self.int8, self.int8_attention) {
            (None, _) => "f32".to_string(),
            (Some(path), None) => format!("int8 {}, attention f32", name(path)),
            (Some(path), Some((_, keys, 0))) => {
                format!("int8 {}, attention f32 (no head of >= {keys} keys)", name(path))
            }
            (Some(path), Some((attention, keys, ops))) => {
                let heads = if keys <= 1 { "every head".to_string() } else { format!("heads of >= {keys} keys") };
                format!("int8 {}, attention int8 {} in {ops} ops ({heads})", name(path), name(attention))
            }
        }
    }

    /// The kernel path of the fused ops, or `tract` (none fused).
    pub fn kernel_name(&self) -> &'static str {
        match self.selection {
            Selection::Fused(kernel) => kernel.name(),
            Selection::Tract => "tract",
        }
    }

    /// Floats of one window's `video` input (0 without video).
    pub fn video_len(&self) -> usize {
        self.video_len
    }

    /// Floats of one window's `audio` input (0 without audio).
    pub fn audio_len(&self) -> usize {
        self.audio_len
    }

    /// How a batch of `batch` windows uses the model's threads: `one thread`, `ops` (each op
    /// split over them) or `streams` (the encoders side by side), once that batch has run
    /// (batch 1 has from load).
    pub fn parallelism(&self, batch: usize) -> Option<&'static str> {
        self.plans.get(&batch).map(|plan| match (plan, &self.executor) {
            (Plan::Streams(_), _) => "streams",
            (Plan::Tract(_), Executor::MultiThread(_)) => "ops",
            (Plan::Tract(_), _) => "one thread",
        })
    }

    fn plan(&mut self, batch: usize) -> TractResult<&Plan> {
        if !self.plans.contains_key(&batch) {
            let model = match &self.batch_symbol {
                Some(symbol) => {
                    let values = HashMap::from([(symbol.clone(), TDim::Val(batch as i64))]);
                    self.typed.set_symbols(&values)?
                }
                None if batch == 1 => self.typed.clone(),
                None => bail!("the model has no symbolic `batch` dimension; only batch 1 runs"),
            };
            let plan = self.prepare(model)?;
            self.plans.insert(batch, plan);
        }
        Ok(&self.plans[&batch])
    }

    /// The plan for `model` (its batch set): on the CPU with threads, the two encoders side by
    /// side where `parallelism` says so (for `auto`: small ops and encoders of about one
    /// size) and the graph has both; else tract's plan, each op split over the threads.
    fn prepare(&self, model: TypedModel) -> TractResult<Plan> {
        let threaded = matches!(self.executor, Executor::MultiThread(_));
        if self.backend.name() != "cpu" || !threaded || self.parallelism == Parallelism::Ops {
            return Ok(Plan::Tract(self.backend.prepare(model)?));
        }
        let optimized = model.into_optimized()?;
        let largest = largest_product(&optimized);
        let (forced, auto) = (self.parallelism == Parallelism::Streams, self.parallelism == Parallelism::Auto);
        if (forced || (auto && largest < STREAMS_BELOW))
            && let (Some(video), Some(audio)) = (self.video_input, self.audio_input)
            && let Some(plan) = StreamPlan::new(optimized.clone(), video, audio)?
            && (forced || plan.busiest_share() <= STREAMS_SHARE)
        {
            tracing::debug!(largest, lanes = ?plan.lane_sizes(), share = plan.busiest_share(), "the encoders side by side");
            return Ok(Plan::Streams(Box::new(plan)));
        }
        Ok(Plan::Tract(Box::new(TypedSimplePlan::new(optimized)?)))
    }

    /// Runs `batch` windows: `video` holds `batch * video_len` floats, `audio` `batch * audio_len`.
    pub fn run(&mut self, batch: usize, video: &[f32], audio: &[f32]) -> TractResult<Vec<Logits>> {
        ensure!(batch > 0, "empty batch");
        ensure!(video.len() == batch * self.video_len && audio.len() == batch * self.audio_len, "input sizes");
        let mut inputs: Vec<(usize, Tensor)> = Vec::new();
        if let Some(ix) = self.video_input {
            let shape: Vec<usize> = std::iter::once(batch).chain(self.video_shape.iter().copied()).collect();
            inputs.push((ix, Tensor::from_shape(&shape, video)?));
        }
        if let Some(ix) = self.audio_input {
            let shape: Vec<usize> = std::iter::once(batch).chain(self.audio_shape.iter().copied()).collect();
            inputs.push((ix, Tensor::from_shape(&shape, audio)?));
        }
        inputs.sort_by_key(|(ix, _)| *ix);
        let outputs_ix = self.outputs;
        let classes = self.classes;
        let executor = self.executor.clone();
        let plan = self.plan(batch)?;
        let inputs: TVec<TValue> = inputs.into_iter().map(|(_, tensor)| tensor.into_tvalue()).collect();
        let outputs = match plan {
            // The video lane on this thread, the audio lane on one of the pool's.
            Plan::Streams(plan) => plan.run(&executor, inputs)?,
            Plan::Tract(plan) => {
                // On a pool thread, with the pool as tract's executor for this run: tract's
                // products and the fused ops (kernel::split_rows) share the model's threads.
                let run = || multithread_tract_scope(executor.clone(), || plan.run(inputs));
                match &executor {
                    Executor::MultiThread(pool) => pool.install(run)?,
                    _ => run()?,
                }
            }
        };
        let read = |ix: Option<usize>| -> TractResult<Option<Vec<f32>>> {
            let Some(ix) = ix else { return Ok(None) };
            let tensor = outputs.get(ix).context("missing output")?;
            let view = tensor.to_plain_array_view::<f32>()?;
            ensure!(view.len() == batch * classes, "output of {} values for {batch} x {classes}", view.len());
            Ok(Some(view.iter().copied().collect()))
        };
        let fused = read(outputs_ix[0])?.context("no logits")?;
        let audio_logits = read(outputs_ix[1])?;
        let video_logits = read(outputs_ix[2])?;
        Ok((0..batch)
            .map(|row| {
                let slice = |values: &Vec<f32>| values[row * classes..(row + 1) * classes].to_vec();
                Logits {
                    fused: slice(&fused),
                    audio: audio_logits.as_ref().map(slice),
                    video: video_logits.as_ref().map(slice),
                }
            })
            .collect())
    }
}

/// Logits to probabilities: sigmoid for multi-label models, softmax for single-label.
pub fn probabilities(logits: &[f32], multi_label: bool) -> Vec<f32> {
    if multi_label {
        return logits.iter().map(|x| 1.0 / (1.0 + (-x).exp())).collect();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|x| (x - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|x| x / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::kernel::Kernel;
    use crate::npy::read_npy;
    use std::path::{Path, PathBuf};

    /// The fixture of `model` (`NAME.parity/`, PyTorch's outputs written at export) through
    /// the runtime on `selection` with `threads`: the largest |logit difference|.
    fn parity(model: &Path, selection: Selection, threads: usize) -> f32 {
        let fixture = model.with_extension("parity");
        let info = ModelInfo::read(model).unwrap_or_else(|err| panic!("{err}"));
        let mut runtime = ModelRuntime::load_with(
            &info,
            RuntimeChoice::Cpu,
            threads,
            selection,
            Int8Attention::Off,
            Parallelism::Auto,
        )
        .unwrap_or_else(|err| panic!("{err}"));
        let (video_shape, video) = read_npy(&fixture.join("video.npy")).expect("video.npy");
        let (_, audio) = read_npy(&fixture.join("audio.npy")).expect("audio.npy");
        let batch = video_shape[0];
        let logits = runtime.run(batch, &video, &audio).expect("the model runs");
        let mut worst = 0f32;
        for (name, pick) in [("logits", 0), ("logits_audio", 1), ("logits_video", 2)] {
            let (_, expected) = read_npy(&fixture.join(format!("{name}.npy"))).expect(name);
            let got: Vec<f32> = logits
                .iter()
                .flat_map(|row| match pick {
                    0 => row.fused.clone(),
                    1 => row.audio.clone().expect("audio logits"),
                    _ => row.video.clone().expect("video logits"),
                })
                .collect();
            assert_eq!(got.len(), expected.len(), "{name}");
            worst = got.iter().zip(&expected).fold(worst, |w, (g, e)| w.max((g - e).abs()));
        }
        worst
    }

    /// Every kernel path this CPU has, and tract's own, on 1 and 2 threads against the
    /// shipped demo model's fixture (tests/model.rs checks the default path); with
    /// `MBT_EDGE_PARITY_MODEL=PATH` (e.g. the vit-base export, too big to commit) that model
    /// instead, and `MBT_EDGE_PARITY_PATHS=tract,avx2` only those paths (scalar takes minutes
    /// at vit-base's size): `cargo test --release --lib parity_of_every_kernel_path --
    /// --nocapture`. About 5 s on the demo model, so CI runs it.
    #[test]
    fn parity_of_every_kernel_path() {
        use std::io::Write as _;
        let model = std::env::var_os("MBT_EDGE_PARITY_MODEL")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/avsynth-edge.onnx"));
        let paths = Kernel::ALL.into_iter().filter(|k| k.supported()).map(Selection::Fused);
        let wanted = std::env::var("MBT_EDGE_PARITY_PATHS").ok();
        let wanted = |selection: &Selection| {
            let name = match selection {
                Selection::Fused(kernel) => kernel.name(),
                Selection::Tract => "tract",
            };
            wanted.as_ref().is_none_or(|list| list.split(',').any(|w| w.trim() == name))
        };
        for selection in std::iter::once(Selection::Tract).chain(paths).filter(wanted) {
            for threads in [1, 2] {
                let worst = parity(&model, selection, threads);
                let line =
                    format!("{}: {selection:?}, {threads} thread(s): max |logit - fixture| {worst:e}", model.display());
                let _ = writeln!(std::io::stderr(), "{line}");
                assert!(worst < 1e-4, "{line}");
            }
        }
    }
}
