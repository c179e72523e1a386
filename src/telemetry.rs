//! Notable events as data: each function here is one event, with its log line and its counter
//! together, so logs and metrics never disagree. The metrics endpoint and `STATUS=` lines read
//! [`snapshot`].

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::media::Modality;

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
    /// Video frames and audio samples that reached the window stage.
    pub video_frames: u64,
    pub audio_samples: u64,
    /// Arrival rates over the last complete [`RATE_PERIOD`] (or the current one, once it has
    /// run twice as long: a stalled stream decays towards 0).
    pub video_fps: f64,
    pub audio_rate_hz: f64,
    rate_window: Option<RateWindow>,
}

/// The period over which arrival rates are measured.
pub const RATE_PERIOD: Duration = Duration::from_secs(2);

#[derive(Debug, Clone, Copy, PartialEq)]
struct RateWindow {
    since: Instant,
    video_frames: u64,
    audio_samples: u64,
}

impl SourceCounters {
    /// Counts arrivals and closes the rate period when it is over.
    fn arrived(&mut self, now: Instant, video_frames: u64, audio_samples: u64) {
        self.video_frames += video_frames;
        self.audio_samples += audio_samples;
        let window = self.rate_window.get_or_insert(RateWindow { since: now, video_frames: 0, audio_samples: 0 });
        window.video_frames += video_frames;
        window.audio_samples += audio_samples;
        let elapsed = now.saturating_duration_since(window.since);
        if elapsed >= RATE_PERIOD {
            self.video_fps = window.video_frames as f64 / elapsed.as_secs_f64();
            self.audio_rate_hz = window.audio_samples as f64 / elapsed.as_secs_f64();
            self.rate_window = Some(RateWindow { since: now, video_frames: 0, audio_samples: 0 });
        }
    }

    /// The rates as of `now`: a period left open for more than twice its length (nothing
    /// arrived to close it) counts as the current rate.
    pub fn rates_at(&self, now: Instant) -> (f64, f64) {
        match self.rate_window {
            Some(window) if now.saturating_duration_since(window.since) >= 2 * RATE_PERIOD => {
                let seconds = now.saturating_duration_since(window.since).as_secs_f64();
                (window.video_frames as f64 / seconds, window.audio_samples as f64 / seconds)
            }
            _ => (self.video_fps, self.audio_rate_hz),
        }
    }
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
    match sources.get_mut(source) {
        Some(counters) => update(counters),
        None => update(sources.entry(source.to_string()).or_default()),
    }
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

/// Video frames reached the window stage.
pub fn video_arrived(source: &str, frames: u64) {
    with_source(source, |counters| counters.arrived(Instant::now(), frames, 0));
}

/// Audio samples reached the window stage.
pub fn audio_arrived(source: &str, samples: u64) {
    with_source(source, |counters| counters.arrived(Instant::now(), 0, samples));
}

static EVENTS: Mutex<BTreeMap<(String, String), u64>> = Mutex::new(BTreeMap::new());

/// An event started (its `start` message was spooled).
pub fn event_started(source: &str, label: &str) {
    *EVENTS
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
        .entry((source.to_string(), label.to_string()))
        .or_default() += 1;
}

/// Events started, per (source, label).
pub fn events_started() -> BTreeMap<(String, String), u64> {
    EVENTS.lock().unwrap_or_else(|poisoned| poisoned.into_inner()).clone()
}

/// Evidence totals (snapshots, clips, retention), and what the evidence folder holds now.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EvidenceCounters {
    pub snapshots: u64,
    pub clips: u64,
    /// Snapshots and clips that could not be written (full disk, writer busy, no media).
    pub failed: u64,
    /// Files deleted by retention (`max_bytes`, `max_age`), oldest first.
    pub deleted: u64,
    pub deleted_bytes: u64,
    /// Media the evidence store was too busy to take.
    pub media_dropped: u64,
    /// What the evidence folder holds, as of the last scan.
    pub files: u64,
    pub bytes: u64,
    /// Memory the sources' evidence rings hold.
    pub ring_bytes: u64,
}

static EVIDENCE: Mutex<EvidenceCounters> = Mutex::new(EvidenceCounters {
    snapshots: 0,
    clips: 0,
    failed: 0,
    deleted: 0,
    deleted_bytes: 0,
    media_dropped: 0,
    files: 0,
    bytes: 0,
    ring_bytes: 0,
});

fn with_evidence(update: impl FnOnce(&mut EvidenceCounters)) {
    update(&mut EVIDENCE.lock().unwrap_or_else(|poisoned| poisoned.into_inner()));
}

/// A copy of the evidence totals.
pub fn evidence() -> EvidenceCounters {
    *EVIDENCE.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

pub fn evidence_media_dropped(source: &str) {
    tracing::debug!(source, "evidence media dropped: the evidence store is behind");
    with_evidence(|counters| counters.media_dropped += 1);
}

/// `took`: how long writing (for a clip: encoding and muxing) took.
pub fn evidence_written(source: &str, what: &str, path: &std::path::Path, bytes: u64, took: Duration) {
    tracing::info!(source, what, path = %path.display(), bytes, took_ms = took.as_millis() as u64, "evidence written");
    with_evidence(|counters| match what {
        "snapshot" => counters.snapshots += 1,
        _ => counters.clips += 1,
    });
}

pub fn evidence_failed(source: &str, what: &str, reason: &str) {
    tracing::warn!(source, what, reason, "evidence not written; the event goes out without it");
    with_evidence(|counters| counters.failed += 1);
}

pub fn evidence_deleted(path: &std::path::Path, bytes: u64, why: &str) {
    tracing::info!(path = %path.display(), bytes, why, "evidence deleted by retention");
    with_evidence(|counters| {
        counters.deleted += 1;
        counters.deleted_bytes += bytes;
    });
}

pub fn evidence_rings(bytes: u64) {
    with_evidence(|counters| counters.ring_bytes = bytes);
}

pub fn evidence_held(files: u64, bytes: u64) {
    with_evidence(|counters| {
        counters.files = files;
        counters.bytes = bytes;
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_are_measured_per_period_and_decay_when_a_stream_stops() {
        let start = Instant::now();
        let mut counters = SourceCounters::default();
        // 15 frames and 16000 samples (1600 every 0.1 s) per second, in arrival order, for 2 s.
        let mut arrivals: Vec<(Duration, u64, u64)> = (0..=30u32)
            .map(|tick| (Duration::from_secs_f64(f64::from(tick) / 15.0), 1, 0))
            .chain((0..=20u64).map(|tick| (Duration::from_millis(100 * tick), 0, 1600)))
            .collect();
        arrivals.sort_by_key(|arrival| arrival.0);
        for (at, frames, samples) in arrivals {
            counters.arrived(start + at, frames, samples);
        }
        let (fps, rate) = counters.rates_at(start + Duration::from_secs(2));
        // The period closes at the first arrival 2 s in: 31 frames, 20 audio chunks.
        assert!((fps - 15.5).abs() < 1e-9, "fps {fps}");
        assert!((rate - 16_000.0).abs() < 1e-6, "audio rate {rate}");
        assert_eq!(counters.video_frames, 31);
        assert_eq!(counters.audio_samples, 33_600);
        // Nothing more arrives: after twice the period the open period's (near-zero) rate shows.
        let (fps, rate) = counters.rates_at(start + Duration::from_secs(10));
        assert!(fps < 1.0 && rate < 1000.0, "stalled rates {fps} {rate}");
    }
}
