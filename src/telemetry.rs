//! Notable events as data: each function here is one event, with its log line and its counter
//! together, so logs and metrics never disagree. The metrics endpoint and `STATUS=` lines read
//! [`snapshot`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::capture::Modality;

/// Counters of one source.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SourceCounters {
    pub failures: u64,
    pub restarts: u64,
    pub dropped_video_buffers: u64,
    pub dropped_audio_buffers: u64,
    pub windows_built: u64,
    pub windows_degraded: u64,
    pub windows_dropped: u64,
    pub video_gap_frames: u64,
    pub audio_gap_samples: u64,
    /// Last measured A/V skew (audio minus video arrival delay) in seconds.
    pub last_av_skew_seconds: Option<f64>,
}

/// Inference totals.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct InferenceCounters {
    pub batches: u64,
    pub windows: u64,
    pub features_seconds: f64,
    pub inference_seconds: f64,
    /// Batch latency histogram: counts of batches at or under each bound of `LATENCY_BOUNDS`.
    pub latency_buckets: [u64; LATENCY_BOUNDS.len()],
}

/// Upper bounds (seconds) of the inference latency histogram buckets.
pub const LATENCY_BOUNDS: [f64; 10] = [0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, f64::INFINITY];

static INFERENCE: Mutex<InferenceCounters> = Mutex::new(InferenceCounters {
    batches: 0,
    windows: 0,
    features_seconds: 0.0,
    inference_seconds: 0.0,
    latency_buckets: [0; LATENCY_BOUNDS.len()],
});

/// A copy of the inference totals.
pub fn inference() -> InferenceCounters {
    *INFERENCE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

static LAST_INFERENCE: Mutex<Option<std::time::Instant>> = Mutex::new(None);

/// When the last batch finished, for the watchdog's health rule.
pub fn last_inference() -> Option<std::time::Instant> {
    *LAST_INFERENCE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn inference_ran(batch: usize, features: Duration, inference: Duration) {
    *LAST_INFERENCE.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(std::time::Instant::now());
    tracing::trace!(batch, features = ?features, inference = ?inference, "batch inferred");
    let mut counters = INFERENCE.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    counters.batches += 1;
    counters.windows += batch as u64;
    counters.features_seconds += features.as_secs_f64();
    counters.inference_seconds += inference.as_secs_f64();
    let seconds = inference.as_secs_f64();
    for (bound, count) in LATENCY_BOUNDS.iter().zip(counters.latency_buckets.iter_mut()) {
        if seconds <= *bound {
            *count += 1;
        }
    }
}

static SOURCES: Mutex<BTreeMap<String, SourceCounters>> = Mutex::new(BTreeMap::new());

fn with_source(source: &str, update: impl FnOnce(&mut SourceCounters)) {
    let mut sources = SOURCES.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
    update(sources.entry(source.to_string()).or_default());
}

/// A copy of every source's counters.
pub fn snapshot() -> BTreeMap<String, SourceCounters> {
    SOURCES.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
}

pub fn source_failed(source: &str, reason: &str, retry_in: Duration) {
    tracing::warn!(source, reason, retry_in = ?retry_in, "source failed; restarting after backoff");
    with_source(source, |counters| counters.failures += 1);
}

pub fn source_restarted(source: &str, generation: u64) {
    tracing::info!(source, generation, "source restarted");
    with_source(source, |counters| counters.restarts += 1);
}

pub fn capture_buffer_dropped(source: &str, modality: Modality) {
    tracing::debug!(source, ?modality, "capture buffer dropped: window stage is behind");
    with_source(source, |counters| match modality {
        Modality::Video => counters.dropped_video_buffers += 1,
        Modality::Audio => counters.dropped_audio_buffers += 1,
    });
}

pub fn window_built(
    source: &str,
    degraded: bool,
    video_gap_frames: u32,
    audio_gap_samples: u32,
    av_skew: Option<time::Duration>,
) {
    if video_gap_frames > 0 || audio_gap_samples > 0 {
        tracing::debug!(source, video_gap_frames, audio_gap_samples, "window with gaps filled");
    }
    with_source(source, |counters| {
        counters.windows_built += 1;
        counters.windows_degraded += u64::from(degraded);
        counters.video_gap_frames += u64::from(video_gap_frames);
        counters.audio_gap_samples += u64::from(audio_gap_samples);
        if let Some(skew) = av_skew {
            counters.last_av_skew_seconds = Some(skew.as_seconds_f64());
        }
    });
}

pub fn window_dropped(source: &str, reason: &str) {
    tracing::warn!(source, reason, "window dropped");
    with_source(source, |counters| counters.windows_dropped += 1);
}
