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
