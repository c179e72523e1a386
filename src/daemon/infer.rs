//! The inference worker: windows in on a bounded channel, scored windows out. It computes
//! the features of every window it takes (one thread owns the per-source streaming log-mel),
//! runs the windows that are ready together as one batch, and turns logits into
//! probabilities. When inference falls behind, the producer drops the oldest waiting window
//! (counted), so the queue never grows without bound.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::Sender;
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

/// The producer's end: hands windows to the worker. Each source has its own short queue
/// ([`WINDOWS_PER_SOURCE`]) and the worker serves the sources round-robin, one window of each
/// in turn, so when inference cannot keep up every source gets the same share of it and loses
/// the same share of its windows: a live source whose queue is full drops its own oldest
/// window (counted), never another source's. The worker also drops windows older than
/// [`MAX_WINDOW_AGE`] instead of classifying them (inference really behind). Lossless queues
/// (classify, record) wait for room instead of dropping. The worker ends once every clone is
/// dropped and nothing waits.
pub struct WindowQueue {
    shared: Arc<QueueShared>,
}

/// A window this old (by its end, in wall-clock time) when inference would take it is
/// dropped: its result would come too late to mean anything.
pub const MAX_WINDOW_AGE: Duration = Duration::from_secs(10);

/// Windows one live source may have waiting: one in inference's hands while the next is cut.
pub const WINDOWS_PER_SOURCE: usize = 2;

/// Windows the queue holds in all: two per source, and at least two batches.
pub fn queue_capacity(max_batch: usize, n_sources: usize) -> usize {
    (2 * max_batch).max(WINDOWS_PER_SOURCE * n_sources).max(1)
}

struct QueueShared {
    state: Mutex<QueueState>,
    /// Signalled when a window arrives or the last producer goes.
    arrived: Condvar,
    /// Signalled when the worker takes windows (lossless producers wait on it).
    taken: Condvar,
}

struct QueueState {
    /// Each source's waiting windows, oldest first.
    per_source: HashMap<Arc<str>, VecDeque<Window>>,
    /// Sources with windows waiting, in the order the worker serves them.
    turn: VecDeque<Arc<str>>,
    waiting: usize,
    capacity: usize,
    lossless: bool,
    producers: usize,
}

fn lock(mutex: &Mutex<QueueState>) -> MutexGuard<'_, QueueState> {
    mutex.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl WindowQueue {
    fn new(capacity: usize, lossless: bool) -> WindowQueue {
        let state = QueueState {
            per_source: HashMap::new(),
            turn: VecDeque::new(),
            waiting: 0,
            capacity: capacity.max(1),
            lossless,
            producers: 1,
        };
        WindowQueue {
            shared: Arc::new(QueueShared { state: Mutex::new(state), arrived: Condvar::new(), taken: Condvar::new() }),
        }
    }

    /// Queues `window`; see the type's docs for what happens when its source's queue is full.
    pub fn push(&self, window: Window) {
        let mut state = lock(&self.shared.state);
        if state.lossless {
            while state.waiting >= state.capacity {
                state = self.shared.taken.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
            }
        }
        let source = window.source.clone();
        let lossless = state.lossless;
        let queue = state.per_source.entry(source.clone()).or_default();
        let mut dropped = None;
        if !lossless && queue.len() >= WINDOWS_PER_SOURCE {
            dropped = queue.pop_front();
        }
        let was_empty = queue.is_empty();
        queue.push_back(window);
        if dropped.is_none() {
            state.waiting += 1;
        }
        if was_empty && !state.turn.contains(&source) {
            state.turn.push_back(source);
        }
        drop(state);
        if let Some(dropped) = dropped {
            telemetry::window_dropped(
                &dropped.source,
                "inference is behind; dropped this source's oldest waiting window",
            );
        }
        self.shared.arrived.notify_one();
    }

    /// Windows waiting for inference.
    pub fn depth(&self) -> usize {
        lock(&self.shared.state).waiting
    }

    /// How many windows may wait in all.
    pub fn capacity(&self) -> usize {
        lock(&self.shared.state).capacity
    }

    /// Resizes the queue (a reload changed the number of sources).
    pub fn set_capacity(&self, capacity: usize) {
        lock(&self.shared.state).capacity = capacity.max(1);
    }
}

impl QueueShared {
    /// The worker's end: waits for at least one window, then takes up to `max`, one per
    /// source in turn (each source's oldest first); `None` once every producer is gone and
    /// nothing waits.
    fn take(&self, max: usize) -> Option<Vec<Window>> {
        let mut state = lock(&self.state);
        loop {
            if state.waiting > 0 {
                let mut batch = Vec::new();
                while batch.len() < max {
                    let Some(source) = state.turn.pop_front() else { break };
                    let Some(queue) = state.per_source.get_mut(&source) else { continue };
                    let Some(window) = queue.pop_front() else { continue };
                    let more = !queue.is_empty();
                    if more {
                        state.turn.push_back(source);
                    }
                    state.waiting -= 1;
                    batch.push(window);
                }
                state.per_source.retain(|_, queue| !queue.is_empty());
                drop(state);
                self.taken.notify_all();
                return Some(batch);
            }
            if state.producers == 0 {
                return None;
            }
            state = self.arrived.wait(state).unwrap_or_else(|poisoned| poisoned.into_inner());
        }
    }
}

impl Clone for WindowQueue {
    fn clone(&self) -> WindowQueue {
        lock(&self.shared.state).producers += 1;
        WindowQueue { shared: self.shared.clone() }
    }
}

impl Drop for WindowQueue {
    fn drop(&mut self) {
        lock(&self.shared.state).producers -= 1;
        self.shared.arrived.notify_all();
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
    let queue = WindowQueue::new(capacity, lossless);
    // The worker holds the shared state, not a `WindowQueue`: it is no producer.
    let worker_end = queue.shared.clone();
    let mut featurizer = Featurizer::new(&metadata)?;
    let thread = std::thread::Builder::new().name("inference".into()).spawn(move || {
        let video_len = featurizer.video_len();
        let audio_len = featurizer.audio_len();
        let mut video = vec![0.0f32; video_len * max_batch];
        let mut audio = vec![0.0f32; audio_len * max_batch];
        while let Some(taken) = worker_end.take(max_batch) {
            let now = OffsetDateTime::now_utc();
            let batch: Vec<Window> = taken
                .into_iter()
                .filter(|window| {
                    let fresh = lossless || now - window.end_utc <= MAX_WINDOW_AGE;
                    if !fresh {
                        telemetry::window_dropped(&window.source, "window too old when inference took it");
                    }
                    fresh
                })
                .collect();
            if batch.is_empty() {
                continue;
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

    fn window(source: &str, index: u64) -> Window {
        Window {
            source: Arc::from(source),
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

    /// Pushes `pushed` ("source:index" words) into a live queue of `capacity` nobody drains,
    /// and compares what waits, in order, with `expected`.
    fn check(capacity: usize, pushed: &str, expected: &str) {
        let queue = WindowQueue::new(capacity, false);
        for word in pushed.split_whitespace() {
            let (source, index) = word.split_once(':').unwrap();
            queue.push(window(source, index.parse().unwrap()));
        }
        assert_eq!(queue.depth(), expected.split_whitespace().count());
        let waiting = queue.shared.take(usize::MAX).unwrap_or_default();
        let got: Vec<String> = waiting.iter().map(|window| format!("{}:{}", window.source, window.index)).collect();
        assert_eq!(got.join(" "), expected);
    }

    #[test]
    fn a_source_with_a_full_queue_drops_its_own_oldest_and_sources_are_served_in_turn() {
        check(8, "a:0 a:1", "a:0 a:1");
        check(8, "a:0 a:1 a:2 a:3 a:4", "a:3 a:4");
        // b and c push beside a busy a: a loses its own windows, not theirs; taking goes
        // round the sources in the order they started waiting.
        check(8, "a:0 a:1 a:2 b:0 c:0 b:1", "a:1 b:0 c:0 a:2 b:1");
    }

    #[test]
    fn drops_are_counted_per_source() {
        let dropped = |source: &str| crate::telemetry::snapshot().get(source).map_or(0, |c| c.windows_dropped);
        let before = (dropped("fair-a"), dropped("fair-b"));
        check(8, "fair-a:0 fair-a:1 fair-a:2 fair-a:3 fair-b:0 fair-b:1", "fair-a:2 fair-b:0 fair-a:3 fair-b:1");
        assert_eq!((dropped("fair-a") - before.0, dropped("fair-b") - before.1), (2, 0));
    }

    #[test]
    fn when_inference_keeps_up_with_a_third_of_the_windows_every_source_gets_a_third() {
        // Ten sources each push a window per round; the worker takes four per round.
        let queue = WindowQueue::new(queue_capacity(4, 10), false);
        let mut served: HashMap<String, usize> = HashMap::new();
        for round in 0..300 {
            for source in 0..10 {
                queue.push(window(&format!("round-robin-{source}"), round));
            }
            for window in queue.shared.take(4).unwrap() {
                *served.entry(window.source.to_string()).or_default() += 1;
            }
        }
        let (least, most) = (served.values().min().unwrap(), served.values().max().unwrap());
        assert_eq!(served.len(), 10);
        assert!(most - least <= 1, "served per source {served:?}");
    }

    #[test]
    fn the_worker_end_drains_then_ends_when_the_producers_are_gone() {
        let queue = WindowQueue::new(8, false);
        let shared = queue.shared.clone();
        let second = queue.clone();
        queue.push(window("a", 0));
        drop(queue);
        second.push(window("a", 1));
        assert_eq!(shared.take(1).map(|batch| batch.len()), Some(1));
        drop(second);
        assert_eq!(shared.take(8).map(|batch| batch.len()), Some(1));
        assert!(shared.take(8).is_none());
    }

    #[test]
    fn capacity_grows_with_the_sources() {
        assert_eq!(queue_capacity(4, 1), 8);
        assert_eq!(queue_capacity(4, 100), 200);
        let queue = WindowQueue::new(2, false);
        queue.set_capacity(queue_capacity(4, 3));
        assert_eq!(queue.capacity(), 8);
    }
}
