//! The window builder: timestamped frames and audio samples of one source in, exact
//! t-second audio-visual windows out, one every `hop`.
//!
//! Pure code: no GStreamer, no threads, no clock of its own. Everything is cut by buffer
//! timestamps on the pipeline's running time (never by arrival order: a file's decoder
//! delivers audio seconds ahead of video), so any interleaving of the two streams gives the
//! same windows. Window k covers `[k * hop, k * hop + length)`; it goes out once every enabled
//! modality has data up to its end (or has ended), or when one modality runs more than
//! `max_lead` ahead of a lagging one, or, for live sources, when the caller's clock is
//! `max_wait` past its end. Missing data is filled (nearest frame, zero audio) and counted.

use std::collections::VecDeque;
use std::ops::Range;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::media::{AudioChunk, RunningTime, VideoFrame};

/// What a builder needs to know; fixed for the life of one pipeline incarnation.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowSettings {
    pub length: Duration,
    pub hop: Duration,
    /// Frames per window (F); 0 when the source has no video.
    pub n_frames: usize,
    /// Audio sample rate; `length * sample_rate` must be a whole number.
    pub sample_rate: u32,
    pub video: bool,
    pub audio: bool,
    pub max_lead: Duration,
    pub max_wait: Duration,
    /// The part of each window the frames are taken from; `None`: the whole window.
    pub video_span: Option<VideoSpan>,
}

/// The frames of a window spread over `[start + offset, start + offset + length)` rather
/// than the whole window (a model trained on a shorter video clip than its audio clip).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VideoSpan {
    pub offset: Duration,
    pub length: Duration,
}

impl WindowSettings {
    /// Where frame `frame_idx` of `n_frames` is taken, relative to the window start, and the
    /// sampling interval: frame j is nearest to `offset + (j + 0.5) * length / n_frames`.
    fn frame_offset(&self, frame_idx: usize) -> (Duration, Duration) {
        let span = self.video_span.unwrap_or(VideoSpan { offset: Duration::ZERO, length: self.length });
        let interval = span.length / self.n_frames as u32;
        (span.offset + interval * frame_idx as u32 + interval / 2, interval)
    }

    /// Samples per window: `length * sample_rate`, exactly.
    pub fn n_samples(&self) -> usize {
        (self.length.as_nanos() * self.sample_rate as u128 / 1_000_000_000) as usize
    }

    fn start(&self, index: u64) -> RunningTime {
        RunningTime(Duration::from_nanos((self.hop.as_nanos() * index as u128) as u64))
    }

    fn end(&self, index: u64) -> RunningTime {
        self.start(index) + self.length
    }

    fn sample_index(&self, time: RunningTime) -> i64 {
        // Rounded to the nearest sample.
        ((time.as_nanos() * self.sample_rate as u128 + 500_000_000) / 1_000_000_000) as i64
    }
}

/// Which modality a degraded window is missing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Degraded {
    AudioLost,
    VideoLost,
}

impl Degraded {
    /// The contract's name (the `degraded` field of events): `audio_lost` or `video_lost`.
    pub fn as_str(self) -> &'static str {
        match self {
            Degraded::AudioLost => "audio_lost",
            Degraded::VideoLost => "video_lost",
        }
    }
}

/// One window of model input, before preprocessing.
#[derive(Debug, Clone)]
pub struct Window {
    pub source: Arc<str>,
    /// k: windows of one incarnation are numbered from zero every hop.
    pub index: u64,
    pub start: RunningTime,
    pub end: RunningTime,
    pub start_utc: OffsetDateTime,
    pub end_utc: OffsetDateTime,
    /// Exactly `n_frames` frames (empty without video).
    pub frames: Vec<Arc<VideoFrame>>,
    /// Exactly `n_samples` samples (empty without audio).
    pub audio: Vec<f32>,
    /// Index of `audio[0]` on the source's sample clock (`start * sample_rate`), so the
    /// feature stage can reuse spectrogram frames shared with the previous window.
    pub first_sample: i64,
    pub stats: WindowStats,
    pub degraded: Option<Degraded>,
}

/// What went into a window that was not real data, and how the streams lined up.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct WindowStats {
    /// Frames whose nearest real frame was more than half a sampling interval away.
    pub video_gap_frames: u32,
    /// Audio samples that were filled with silence.
    pub audio_gap_samples: u32,
    /// Arrival delay of audio minus that of video at the time the window went out
    /// (positive: audio arrives later than video relative to its timestamps).
    pub av_skew: Option<time::Duration>,
    /// Sound level of the window's newest hop of audio (its last `hop` seconds, all of it
    /// when the hop is longer than the window): 20 log10 of the RMS, in dBFS (a full-scale
    /// sine reads -3.01). `None` without audio; silence reads [`SILENCE_DBFS`].
    pub audio_dbfs: Option<f32>,
}

/// The level digital silence reads: the floor of [`rms_dbfs`].
pub const SILENCE_DBFS: f32 = -120.0;

/// 20 log10 of the RMS of `samples` (full scale = 1.0), floored at [`SILENCE_DBFS`].
pub fn rms_dbfs(samples: &[f32]) -> f32 {
    if samples.is_empty() {
        return SILENCE_DBFS;
    }
    let mean_square = samples.iter().map(|&x| f64::from(x) * f64::from(x)).sum::<f64>() / samples.len() as f64;
    let dbfs = 10.0 * mean_square.log10();
    if dbfs.is_finite() { (dbfs as f32).max(SILENCE_DBFS) } else { SILENCE_DBFS }
}

/// Builds the windows of one source incarnation.
pub struct WindowBuilder {
    source: Arc<str>,
    settings: WindowSettings,
    utc_origin: OffsetDateTime,
    frames: VecDeque<Arc<VideoFrame>>,
    /// Samples from `audio_base` (absolute sample index) on, gaps filled with zeros.
    audio: VecDeque<f32>,
    audio_base: i64,
    audio_gaps: VecDeque<Range<i64>>,
    audio_started: bool,
    video_watermark: Option<RunningTime>,
    first_video: Option<RunningTime>,
    first_audio: Option<RunningTime>,
    video_ended: bool,
    audio_ended: bool,
    video_delay: Option<time::Duration>,
    audio_delay: Option<time::Duration>,
    next_index: Option<u64>,
    /// Both streams ended and the last full window is out: nothing more comes from this
    /// builder (the cursor must not start over on data that is gone).
    exhausted: bool,
    counters: BuilderCounters,
}

/// Running totals of one builder.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BuilderCounters {
    pub windows: u64,
    pub degraded_windows: u64,
    pub video_gap_frames: u64,
    pub audio_gap_samples: u64,
    /// Frames or samples dropped because one modality ran more than `max_lead` ahead.
    pub dropped_frames: u64,
    pub dropped_samples: u64,
    /// Buffers that arrived out of timestamp order within their modality and were dropped.
    pub out_of_order: u64,
}

/// A jump of less than this between consecutive audio buffers is taken as continuous
/// (timestamps are rounded to nanoseconds, sample positions are not).
const AUDIO_JITTER: Duration = Duration::from_millis(2);

/// A window's first index is the first whose start is no earlier than the first data minus this.
const START_TOLERANCE: Duration = Duration::from_millis(50);

impl WindowBuilder {
    pub fn new(source: Arc<str>, settings: WindowSettings, utc_origin: OffsetDateTime) -> Self {
        WindowBuilder {
            source,
            settings,
            utc_origin,
            frames: VecDeque::new(),
            audio: VecDeque::new(),
            audio_base: 0,
            audio_gaps: VecDeque::new(),
            audio_started: false,
            video_watermark: None,
            first_video: None,
            first_audio: None,
            video_ended: false,
            audio_ended: false,
            video_delay: None,
            audio_delay: None,
            next_index: None,
            exhausted: false,
            counters: BuilderCounters::default(),
        }
    }

    pub fn settings(&self) -> &WindowSettings {
        &self.settings
    }

    pub fn counters(&self) -> BuilderCounters {
        self.counters
    }

    /// Adds a frame that arrived at `arrival` (caller's running-time clock). Returns the
    /// windows that became complete.
    pub fn push_frame(&mut self, frame: Arc<VideoFrame>, arrival: RunningTime) -> Vec<Window> {
        if !self.settings.video {
            return Vec::new();
        }
        if let Some(last) = self.frames.back()
            && frame.pts <= last.pts
        {
            self.counters.out_of_order += 1;
            return Vec::new();
        }
        self.video_delay = Some(arrival.signed_diff(frame.pts));
        self.first_video.get_or_insert(frame.pts);
        let end = frame.end();
        self.video_watermark = Some(self.video_watermark.map_or(end, |mark| mark.max(end)));
        self.frames.push_back(frame);
        self.drain(None)
    }

    /// Adds audio samples that arrived at `arrival`. Returns the windows that became complete.
    pub fn push_audio(&mut self, chunk: &AudioChunk, arrival: RunningTime) -> Vec<Window> {
        if !self.settings.audio || chunk.samples.is_empty() {
            return Vec::new();
        }
        let mut index = self.settings.sample_index(chunk.pts);
        let jitter = (AUDIO_JITTER.as_nanos() * self.settings.sample_rate as u128 / 1_000_000_000) as i64;
        let mut samples = chunk.samples.as_slice();
        if !self.audio_started {
            self.audio_started = true;
            self.audio_base = index;
        } else {
            let end = self.audio_end();
            if (index - end).abs() <= jitter {
                index = end;
            }
            if index < end {
                // Overlap: keep what we have, take only the new part.
                let overlap = (end - index) as usize;
                if overlap >= samples.len() {
                    self.counters.out_of_order += 1;
                    return Vec::new();
                }
                samples = &samples[overlap..];
            } else if index > end {
                self.audio_gaps.push_back(end..index);
                self.audio.extend(std::iter::repeat_n(0.0, (index - end) as usize));
            }
        }
        self.audio_delay = Some(arrival.signed_diff(chunk.pts));
        self.first_audio.get_or_insert(chunk.pts);
        self.audio.extend(samples.iter().copied());
        self.drain(None)
    }

    /// Marks the end of the video stream (EOS); windows waiting only on video go out.
    pub fn end_video(&mut self) -> Vec<Window> {
        self.video_ended = true;
        self.drain(None)
    }

    /// Marks the end of the audio stream.
    pub fn end_audio(&mut self) -> Vec<Window> {
        self.audio_ended = true;
        self.drain(None)
    }

    /// Live sources: emits windows whose end is `max_wait` or more before `now` even if a
    /// modality is still missing (filled, marked degraded).
    pub fn poll(&mut self, now: RunningTime) -> Vec<Window> {
        self.drain(Some(now))
    }

    /// True when every enabled modality has ended and nothing more can come out.
    pub fn finished(&self) -> bool {
        (!self.settings.video || self.video_ended) && (!self.settings.audio || self.audio_ended)
    }

    fn audio_end(&self) -> i64 {
        self.audio_base + self.audio.len() as i64
    }

    fn audio_watermark(&self) -> Option<RunningTime> {
        self.audio_started.then(|| {
            let nanos = self.audio_end().max(0) as u128 * 1_000_000_000 / self.settings.sample_rate as u128;
            RunningTime(Duration::from_nanos(nanos as u64))
        })
    }

    fn first_index(&self) -> Option<u64> {
        let mut first = RunningTime::ZERO;
        for (enabled, ended, seen) in [
            (self.settings.video, self.video_ended, self.first_video),
            (self.settings.audio, self.audio_ended, self.first_audio),
        ] {
            if !enabled {
                continue;
            }
            match seen {
                Some(pts) => first = first.max(pts),
                None if ended => {}
                None => return None,
            }
        }
        let first = first.saturating_sub(START_TOLERANCE).as_duration();
        let hop = self.settings.hop.as_nanos();
        Some(first.as_nanos().div_ceil(hop) as u64)
    }

    fn drain(&mut self, now: Option<RunningTime>) -> Vec<Window> {
        let mut out = Vec::new();
        if self.exhausted {
            return out;
        }
        if self.next_index.is_none() {
            // Wait for the first data of every modality unless one runs too far ahead.
            let lead_exceeded = self.lead().is_some_and(|lead| lead > self.settings.max_lead + self.settings.length);
            self.next_index = match self.first_index() {
                Some(index) => Some(index),
                None if lead_exceeded || self.finished() => Some(
                    self.first_video
                        .or(self.first_audio)
                        .map(|first| first.as_duration().as_nanos().div_ceil(self.settings.hop.as_nanos()) as u64)
                        .unwrap_or(0),
                ),
                None => None,
            };
        }
        while let Some(index) = self.next_index {
            let end = self.settings.end(index);
            let video_ready =
                !self.settings.video || self.video_ended || self.video_watermark.is_some_and(|mark| mark >= end);
            let audio_ready =
                !self.settings.audio || self.audio_ended || self.audio_watermark().is_some_and(|mark| mark >= end);
            let any_data_past_end =
                [self.video_watermark, self.audio_watermark()].into_iter().flatten().any(|mark| mark >= end);
            let complete = video_ready && audio_ready;
            let forced = !complete
                && (self.leading_mark().is_some_and(|mark| mark >= end + self.settings.max_lead)
                    || now.is_some_and(|now| now >= end + self.settings.max_wait && any_data_past_end));
            if self.finished() && !any_data_past_end {
                // The streams ended inside this window: a file ends after its last full window.
                self.next_index = None;
                self.exhausted = true;
                self.frames.clear();
                self.audio.clear();
                break;
            }
            if !(complete || forced) {
                break;
            }
            let degraded = if complete {
                // Complete because a stream ended before this window's end: that sense is lost.
                if self.settings.audio && self.audio_ended && self.audio_watermark().is_none_or(|mark| mark < end) {
                    Some(Degraded::AudioLost)
                } else if self.settings.video && self.video_ended && self.video_watermark.is_none_or(|mark| mark < end)
                {
                    Some(Degraded::VideoLost)
                } else {
                    None
                }
            } else if !video_ready {
                Some(Degraded::VideoLost)
            } else {
                Some(Degraded::AudioLost)
            };
            out.push(self.cut(index, degraded));
            self.next_index = Some(index + 1);
            self.evict(self.settings.start(index + 1));
        }
        self.enforce_lead();
        out
    }

    fn leading_mark(&self) -> Option<RunningTime> {
        [self.video_watermark, self.audio_watermark()].into_iter().flatten().max()
    }

    /// How far the leading modality is ahead of the lagging one (both must have started).
    fn lead(&self) -> Option<Duration> {
        if !(self.settings.video && self.settings.audio) {
            return None;
        }
        let video = self.video_watermark.or(self.first_video);
        let audio = self.audio_watermark();
        match (video, audio) {
            (Some(v), Some(a)) => Some(if v > a { v.0 - a.0 } else { a.0 - v.0 }),
            (Some(v), None) => Some(v.0),
            (None, Some(a)) => Some(a.0),
            (None, None) => None,
        }
    }

    fn cut(&mut self, index: u64, degraded: Option<Degraded>) -> Window {
        let settings = &self.settings;
        let start = settings.start(index);
        let end = settings.end(index);
        let mut stats = WindowStats::default();

        let mut frames = Vec::with_capacity(settings.n_frames);
        if settings.video && settings.n_frames > 0 {
            for frame_idx in 0..settings.n_frames {
                let (offset, interval) = settings.frame_offset(frame_idx);
                let target = start + offset;
                match self.nearest_frame(target, end) {
                    Some(frame) => {
                        let distance = frame.pts.signed_diff(target).unsigned_abs();
                        if distance > interval / 2 {
                            stats.video_gap_frames += 1;
                        }
                        frames.push(frame);
                    }
                    None => {
                        stats.video_gap_frames += 1;
                        let (width, height) = self.frames.front().map(|f| (f.width, f.height)).unwrap_or((0, 0));
                        frames.push(Arc::new(VideoFrame::solid(target, width, height, [0, 0, 0])));
                    }
                }
            }
        }

        let mut audio = Vec::new();
        let first_sample = settings.sample_index(start);
        if settings.audio {
            let n_samples = settings.n_samples();
            audio.reserve_exact(n_samples);
            let wanted = first_sample..first_sample + n_samples as i64;
            for sample_idx in wanted.clone() {
                let offset = sample_idx - self.audio_base;
                if offset >= 0 && (offset as usize) < self.audio.len() {
                    audio.push(self.audio[offset as usize]);
                } else {
                    audio.push(0.0);
                    stats.audio_gap_samples += 1;
                }
            }
            for gap in &self.audio_gaps {
                let overlap = gap.start.max(wanted.start)..gap.end.min(wanted.end);
                if overlap.start < overlap.end {
                    stats.audio_gap_samples += (overlap.end - overlap.start) as u32;
                }
            }
        }
        if let (Some(audio_delay), Some(video_delay)) = (self.audio_delay, self.video_delay) {
            stats.av_skew = Some(audio_delay - video_delay);
        }
        if settings.audio {
            let hop_samples = (settings.hop.as_nanos() * settings.sample_rate as u128 / 1_000_000_000) as usize;
            stats.audio_dbfs = Some(rms_dbfs(&audio[audio.len().saturating_sub(hop_samples.max(1))..]));
        }

        self.counters.windows += 1;
        self.counters.degraded_windows += u64::from(degraded.is_some());
        self.counters.video_gap_frames += u64::from(stats.video_gap_frames);
        self.counters.audio_gap_samples += u64::from(stats.audio_gap_samples);

        Window {
            source: self.source.clone(),
            index,
            start,
            end,
            start_utc: self.utc_origin + start.as_duration(),
            end_utc: self.utc_origin + end.as_duration(),
            frames,
            audio,
            first_sample,
            stats,
            degraded,
        }
    }

    /// The frame nearest to `target` among those before `end` (ties go to the earlier one).
    fn nearest_frame(&self, target: RunningTime, end: RunningTime) -> Option<Arc<VideoFrame>> {
        let after = self.frames.partition_point(|frame| frame.pts < target);
        let mut best: Option<&Arc<VideoFrame>> = None;
        for candidate in [after.checked_sub(1), Some(after)].into_iter().flatten() {
            let Some(frame) = self.frames.get(candidate) else { continue };
            if frame.pts >= end {
                continue;
            }
            let better = match best {
                None => true,
                Some(current) => {
                    frame.pts.signed_diff(target).unsigned_abs() < current.pts.signed_diff(target).unsigned_abs()
                }
            };
            if better {
                best = Some(frame);
            }
        }
        best.cloned()
    }

    /// Drops what no later window can use: frames before the last one preceding `start`,
    /// samples before `start`.
    fn evict(&mut self, start: RunningTime) {
        let keep_from = self.frames.partition_point(|frame| frame.pts < start).saturating_sub(1);
        self.frames.drain(..keep_from);
        let first_needed = self.settings.sample_index(start);
        if first_needed > self.audio_base {
            let drop = ((first_needed - self.audio_base) as usize).min(self.audio.len());
            self.audio.drain(..drop);
            self.audio_base += drop as i64;
        }
        while self.audio_gaps.front().is_some_and(|gap| gap.end <= self.audio_base) {
            self.audio_gaps.pop_front();
        }
    }

    /// Bounds memory when one modality runs far ahead and windows cannot go out yet.
    fn enforce_lead(&mut self) {
        let limit = self.settings.length + self.settings.max_lead;
        if let (Some(first), Some(last)) = (self.frames.front(), self.frames.back())
            && last.pts.as_duration().saturating_sub(first.pts.as_duration()) > limit
        {
            let cutoff = last.pts.saturating_sub(limit);
            let drop = self.frames.partition_point(|frame| frame.pts < cutoff);
            self.frames.drain(..drop);
            self.counters.dropped_frames += drop as u64;
        }
        let max_samples = (limit.as_nanos() * self.settings.sample_rate as u128 / 1_000_000_000) as usize;
        if self.audio.len() > max_samples {
            let drop = self.audio.len() - max_samples;
            self.audio.drain(..drop);
            self.audio_base += drop as i64;
            self.counters.dropped_samples += drop as u64;
        }
    }
}

#[cfg(test)]
mod tests;
