//! `mbt-edge bench`: preprocessing per hop (with the streaming log-mel reuse the daemon gets)
//! and inference per window on this machine, with the config's runtime and threads. Several
//! model files can be timed in one run (`--also`); their runs alternate so that a busy
//! neighbour on a shared machine affects each alike.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;
use time::OffsetDateTime;

use crate::daemon::{self, Failure};
use crate::features::Featurizer;
use crate::media::{RunningTime, VideoFrame};
use crate::model::{ModelInfo, ModelRuntime};
use crate::window::{Window, WindowStats};

#[derive(Serialize)]
struct Report {
    cpu: String,
    logical_cpus: usize,
    threads: usize,
    runtime: String,
    /// The fused ops' kernel path (`MBT_EDGE_KERNEL`), or `tract`.
    kernel: String,
    hop_seconds: f64,
    preprocess: Timing,
    models: Vec<ModelReport>,
}

#[derive(Serialize)]
struct ModelReport {
    name: String,
    path: String,
    sha256: String,
    /// What runs in int8 ([`ModelRuntime::precision`]).
    precision: String,
    batches: Vec<BatchReport>,
}

#[derive(Serialize)]
struct BatchReport {
    batch: usize,
    /// Per batch.
    timing: Timing,
    per_window_median_ms: f64,
    windows_per_second: f64,
    /// How the batch used the threads ([`ModelRuntime::parallelism`]: `one thread`, `ops`,
    /// `streams`).
    parallelism: String,
}

#[derive(Serialize, Clone, Copy)]
struct Timing {
    runs: usize,
    median_ms: f64,
    p90_ms: f64,
    min_ms: f64,
}

impl Timing {
    fn of(mut samples: Vec<Duration>) -> Timing {
        samples.sort();
        let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize].as_secs_f64() * 1e3;
        Timing { runs: samples.len(), median_ms: pick(0.5), p90_ms: pick(0.9), min_ms: pick(0.0) }
    }
}

/// Times preprocessing and inference; prints a table or, with `json`, one JSON object.
pub fn bench(config: &Path, json: bool, runs: usize, batches: &[usize], also: &[PathBuf]) -> Result<(), Failure> {
    let prepared = daemon::prepare(config)?;
    let settings = &prepared.settings;
    let runs = runs.max(1);
    let mut models = vec![prepared.model.clone()];
    for path in also {
        models.push(ModelInfo::read(path).map_err(Failure::config)?);
    }
    let mut runtimes = Vec::new();
    for model in &models {
        runtimes
            .push(ModelRuntime::load(model, settings.model.runtime, settings.model.threads).map_err(Failure::config)?);
    }
    let metadata = &prepared.model.metadata;

    // Preprocessing: consecutive windows of one source, one hop apart, as the daemon sees them.
    let hop = settings.window.hop;
    let windows = synthetic_windows(&prepared, 12 + runs.min(50));
    let mut featurizer = Featurizer::new(metadata).map_err(Failure::config)?;
    let mut video = vec![0.0; featurizer.video_len()];
    let mut audio = vec![0.0; featurizer.audio_len()];
    let mut preprocess = Vec::new();
    for (idx, window) in windows.iter().enumerate() {
        let started = Instant::now();
        featurizer.fill(window, &mut video, &mut audio);
        if idx > 0 {
            preprocess.push(started.elapsed());
        }
    }

    // Inference: per batch size, the models' runs alternate.
    let mut reports: Vec<ModelReport> = models
        .iter()
        .zip(&runtimes)
        .map(|(model, runtime)| ModelReport {
            name: model.name().to_string(),
            path: model.path.display().to_string(),
            sha256: model.sha256.clone(),
            precision: runtime.precision(),
            batches: Vec::new(),
        })
        .collect();
    for &batch in batches {
        let batch = batch.max(1);
        let video_in: Vec<f32> = (0..batch).flat_map(|_| video.iter().copied()).collect();
        let audio_in: Vec<f32> = (0..batch).flat_map(|_| audio.iter().copied()).collect();
        let mut samples = vec![Vec::new(); runtimes.len()];
        for run in 0..runs + 2 {
            for (model_idx, runtime) in runtimes.iter_mut().enumerate() {
                let started = Instant::now();
                runtime.run(batch, &video_in, &audio_in).map_err(|err| Failure::other(anyhow::anyhow!("{err:#}")))?;
                if run >= 2 {
                    samples[model_idx].push(started.elapsed());
                }
            }
        }
        for (model_idx, samples) in samples.into_iter().enumerate() {
            let timing = Timing::of(samples);
            let parallelism = runtimes[model_idx].parallelism(batch).unwrap_or("?").to_string();
            reports[model_idx].batches.push(BatchReport {
                batch,
                parallelism,
                timing,
                per_window_median_ms: timing.median_ms / batch as f64,
                windows_per_second: batch as f64 / (timing.median_ms / 1e3),
            });
        }
    }

    let report = Report {
        cpu: cpu_model(),
        logical_cpus: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        threads: settings.model.threads,
        runtime: runtimes[0].backend_name(),
        kernel: runtimes[0].kernel_name().to_string(),
        hop_seconds: hop.as_secs_f64(),
        preprocess: Timing::of(preprocess),
        models: reports,
    };
    if json {
        println!("{}", serde_json::to_string_pretty(&report).map_err(Failure::other)?);
    } else {
        print_table(&report);
    }
    Ok(())
}

fn print_table(report: &Report) {
    println!(
        "cpu: {} ({} logical), runtime {}, kernel {}, {} thread(s)",
        report.cpu, report.logical_cpus, report.runtime, report.kernel, report.threads
    );
    println!(
        "preprocess per hop ({:.2} s hop, streaming log-mel + video tensor): median {:.3} ms, p90 {:.3} ms",
        report.hop_seconds, report.preprocess.median_ms, report.preprocess.p90_ms
    );
    println!(
        "{:<28} {:>5} {:>12} {:>12} {:>14} {:>12} {:>9}  threads as",
        "model file", "batch", "median ms", "p90 ms", "ms per window", "windows/s", "speed-up"
    );
    let first = report.models.first();
    for model in &report.models {
        let file = Path::new(&model.path).file_name().map_or(model.name.clone(), |f| f.to_string_lossy().into_owned());
        for batch in &model.batches {
            // Against the first model (the config's) at the same batch size, for `--also`.
            let baseline = first
                .and_then(|first| first.batches.iter().find(|b| b.batch == batch.batch))
                .map(|b| b.per_window_median_ms);
            let speedup = baseline.map_or(String::new(), |ms| format!("{:.2}x", ms / batch.per_window_median_ms));
            println!(
                "{:<28} {:>5} {:>12.2} {:>12.2} {:>14.2} {:>12.1} {:>9}  {}",
                file,
                batch.batch,
                batch.timing.median_ms,
                batch.timing.p90_ms,
                batch.per_window_median_ms,
                batch.windows_per_second,
                speedup,
                batch.parallelism
            );
        }
    }
    for model in &report.models {
        let file = Path::new(&model.path).file_name().map_or(model.name.clone(), |f| f.to_string_lossy().into_owned());
        println!("{file}: {}", model.precision);
    }
}

/// Windows of one source one hop apart, with noise audio and changing frames.
fn synthetic_windows(prepared: &daemon::Prepared, count: usize) -> Vec<Window> {
    let metadata = &prepared.model.metadata;
    let hop = prepared.settings.window.hop;
    let length = prepared.window_length;
    let sample_rate = metadata.audio.as_ref().map_or(16_000, |audio| audio.sample_rate);
    let n_samples = (length.as_secs_f64() * sample_rate as f64).round() as usize;
    let hop_samples = (hop.as_secs_f64() * sample_rate as f64).round() as usize;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let mut noise = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state >> 40) as f32 / (1u64 << 24) as f32 - 0.5
    };
    let total = n_samples + hop_samples * count;
    let signal: Vec<f32> = (0..total).map(|_| noise() * 0.5).collect();
    let frames: Vec<Arc<VideoFrame>> = match &metadata.video {
        Some(video) => (0..video.frames * 2)
            .map(|idx| {
                let rgb = (0..video.width * video.height * 3).map(|_| ((noise() + 0.5) * 255.0) as u8).collect();
                Arc::new(VideoFrame {
                    pts: RunningTime::ZERO,
                    duration: None,
                    width: video.width,
                    height: video.height,
                    rgb: if idx % 2 == 0 { rgb } else { vec![128; (video.width * video.height * 3) as usize] },
                })
            })
            .collect(),
        None => Vec::new(),
    };
    let n_frames = metadata.video.as_ref().map_or(0, |video| video.frames);
    (0..count)
        .map(|k| {
            let start = RunningTime(hop * k as u32);
            Window {
                source: Arc::from("bench"),
                index: k as u64,
                start,
                end: start + length,
                start_utc: OffsetDateTime::UNIX_EPOCH,
                end_utc: OffsetDateTime::UNIX_EPOCH,
                frames: (0..n_frames).map(|j| frames[(j + k) % frames.len().max(1)].clone()).collect(),
                audio: if metadata.audio.is_some() {
                    signal[k * hop_samples..k * hop_samples + n_samples].to_vec()
                } else {
                    Vec::new()
                },
                first_sample: (k * hop_samples) as i64,
                stats: WindowStats::default(),
                degraded: None,
            }
        })
        .collect()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|text| {
            text.lines()
                .find(|line| line.starts_with("model name"))
                .and_then(|line| line.split_once(':'))
                .map(|(_, name)| name.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.to_string())
}
