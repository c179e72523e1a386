//! The inference worker: windows in on a bounded channel, scored windows out. It computes
//! the features of every window it takes (one thread owns the per-source streaming log-mel),
//! runs the windows that are ready together as one batch, and turns logits into
//! probabilities. When inference falls behind, the producer drops the oldest waiting window
//! (counted), so the queue never grows without bound.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, TrySendError, bounded};
use time::OffsetDateTime;

use crate::features::Featurizer;
use crate::media::RunningTime;
use crate::model::{ModelMetadata, ModelRuntime, probabilities};
use crate::telemetry;
use crate::window::{Degraded, Window};

/// A window's identity and its scores (probabilities, one per label).
#[derive(Debug, Clone)]
pub struct ScoredWindow {
    pub source: Arc<str>,
    pub index: u64,
    pub start: RunningTime,
    pub end: RunningTime,
    pub start_utc: OffsetDateTime,
    pub end_utc: OffsetDateTime,
    pub degraded: Option<Degraded>,
    pub fused: Vec<f32>,
    pub audio: Option<Vec<f32>>,
    pub video: Option<Vec<f32>>,
    /// The window's sound level (`WindowStats::audio_dbfs`).
    pub sound_dbfs: Option<f32>,
    /// Time spent in features and inference for this window's batch.
    pub features_time: Duration,
    pub inference_time: Duration,
    pub batch_size: usize,
}

/// The producer's end: hands windows to the worker, dropping the oldest when it is behind.
#[derive(Clone)]
pub struct WindowQueue {
    sender: Sender<Window>,
    oldest: Receiver<Window>,
    lossless: bool,
}

impl WindowQueue {
    /// Queues `window`. Lossless queues (classify, record) wait instead of dropping.
    pub fn push(&self, window: Window) {
        if self.lossless {
            let _ = self.sender.send(window);
            return;
        }
        let mut window = window;
        loop {
            match self.sender.try_send(window) {
                Ok(()) => return,
                Err(TrySendError::Full(back)) => {
                    window = back;
                    if let Ok(dropped) = self.oldest.try_recv() {
                        telemetry::window_dropped(&dropped.source, "inference is behind; dropped the oldest window");
                    }
                }
                Err(TrySendError::Disconnected(_)) => return,
            }
        }
    }

    /// Windows waiting for inference.
    pub fn depth(&self) -> usize {
        self.sender.len()
    }
}

/// Starts the worker thread. `capacity` windows may wait; up to `max_batch` run together.
/// Results go to `results`; the worker ends when every `WindowQueue` clone is dropped.
pub fn spawn(
    mut runtime: ModelRuntime,
    metadata: ModelMetadata,
    max_batch: usize,
    capacity: usize,
    lossless: bool,
    results: Sender<ScoredWindow>,
) -> anyhow::Result<(WindowQueue, JoinHandle<()>)> {
    let (sender, receiver) = bounded::<Window>(capacity.max(1));
    let queue = WindowQueue { sender, oldest: receiver.clone(), lossless };
    let mut featurizer = Featurizer::new(&metadata)?;
    let thread = std::thread::Builder::new().name("inference".into()).spawn(move || {
        let video_len = featurizer.video_len();
        let audio_len = featurizer.audio_len();
        let mut video = vec![0.0f32; video_len * max_batch];
        let mut audio = vec![0.0f32; audio_len * max_batch];
        while let Ok(first) = receiver.recv() {
            let mut batch = vec![first];
            while batch.len() < max_batch {
                match receiver.try_recv() {
                    Ok(window) => batch.push(window),
                    Err(_) => break,
                }
            }
            let started = Instant::now();
            for (slot, window) in batch.iter().enumerate() {
                featurizer.fill(
                    window,
                    &mut video[slot * video_len..(slot + 1) * video_len],
                    &mut audio[slot * audio_len..(slot + 1) * audio_len],
                );
            }
            let features_time = started.elapsed();
            let n = batch.len();
            let logits = match runtime.run(n, &video[..n * video_len], &audio[..n * audio_len]) {
                Ok(logits) => logits,
                Err(err) => {
                    for window in &batch {
                        telemetry::window_dropped(&window.source, &format!("inference failed: {err:#}"));
                    }
                    continue;
                }
            };
            let inference_time = started.elapsed() - features_time;
            telemetry::inference_ran(n, features_time, inference_time);
            for (window, logits) in batch.into_iter().zip(logits) {
                let scored = ScoredWindow {
                    source: window.source.clone(),
                    index: window.index,
                    start: window.start,
                    end: window.end,
                    start_utc: window.start_utc,
                    end_utc: window.end_utc,
                    degraded: window.degraded,
                    // With a sense lost, the surviving sense's head decides: `logits` would
                    // average in the head of the sense that sees nothing (models/METADATA.md).
                    fused: probabilities(
                        match (window.degraded, &logits.audio, &logits.video) {
                            (Some(Degraded::AudioLost), _, Some(video)) => video,
                            (Some(Degraded::VideoLost), Some(audio), _) => audio,
                            _ => &logits.fused,
                        },
                        metadata.multi_label,
                    ),
                    audio: logits.audio.as_deref().map(|values| probabilities(values, metadata.multi_label)),
                    video: logits.video.as_deref().map(|values| probabilities(values, metadata.multi_label)),
                    sound_dbfs: window.stats.audio_dbfs,
                    features_time,
                    inference_time,
                    batch_size: n,
                };
                if results.send(scored).is_err() {
                    return;
                }
            }
        }
    })?;
    Ok((queue, thread))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::window::WindowStats;

    fn window(index: u64) -> Window {
        Window {
            source: Arc::from("s"),
            index,
            start: RunningTime::ZERO,
            end: RunningTime::ZERO,
            start_utc: OffsetDateTime::UNIX_EPOCH,
            end_utc: OffsetDateTime::UNIX_EPOCH,
            frames: Vec::new(),
            audio: Vec::new(),
            first_sample: 0,
            stats: WindowStats::default(),
            degraded: None,
        }
    }

    /// Pushes windows 0..pushed into a queue of `capacity` nobody drains; returns what waits.
    fn check(capacity: usize, pushed: u64, expected: &[u64]) {
        let (sender, receiver) = bounded(capacity);
        let queue = WindowQueue { sender, oldest: receiver.clone(), lossless: false };
        for index in 0..pushed {
            queue.push(window(index));
        }
        assert_eq!(queue.depth(), expected.len());
        let waiting: Vec<u64> = receiver.try_iter().map(|window| window.index).collect();
        assert_eq!(waiting, expected);
    }

    #[test]
    fn a_full_queue_drops_the_oldest_windows() {
        check(3, 2, &[0, 1]);
        check(3, 3, &[0, 1, 2]);
        check(3, 7, &[4, 5, 6]);
        check(1, 5, &[4]);
    }

    #[test]
    fn dropped_windows_are_counted() {
        let before = crate::telemetry::snapshot().get("s").map_or(0, |counters| counters.windows_dropped);
        check(2, 6, &[4, 5]);
        let after = crate::telemetry::snapshot().get("s").map_or(0, |counters| counters.windows_dropped);
        assert!(after >= before + 4, "{before} -> {after}");
    }
}
