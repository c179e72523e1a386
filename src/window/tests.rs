//! Window builder tests: exact sizes, timestamps, gap fill, and the property that any
//! interleaving and jitter of the two streams gives the same windows.

use std::sync::Arc;
use std::time::Duration;

use proptest::prelude::*;
use time::macros::datetime;

use super::*;

const SAMPLE_RATE: u32 = 1_000;

fn settings(length_ms: u64, hop_ms: u64, n_frames: usize) -> WindowSettings {
    WindowSettings {
        length: Duration::from_millis(length_ms),
        hop: Duration::from_millis(hop_ms),
        n_frames,
        sample_rate: SAMPLE_RATE,
        video: true,
        audio: true,
        max_lead: Duration::from_secs(30),
        max_wait: Duration::from_secs(2),
        video_span: None,
    }
}

fn builder(settings: WindowSettings) -> WindowBuilder {
    WindowBuilder::new(Arc::from("test"), settings, datetime!(2026-01-01 00:00:00 UTC))
}

/// A frame whose pixel value encodes its index, so tests can see which frame was picked.
fn frame(frame_idx: u64, period_ms: u64) -> Arc<VideoFrame> {
    let mut frame = VideoFrame::solid(
        RunningTime(Duration::from_millis(frame_idx * period_ms)),
        2,
        2,
        [(frame_idx % 256) as u8, 0, 0],
    );
    frame.duration = Some(Duration::from_millis(period_ms));
    Arc::new(frame)
}

/// Audio chunk `chunk_idx` of `len` samples whose values encode the absolute sample index.
fn chunk(chunk_idx: u64, len: usize) -> AudioChunk {
    let first = chunk_idx as usize * len;
    AudioChunk {
        pts: RunningTime(Duration::from_nanos(first as u64 * 1_000_000_000 / SAMPLE_RATE as u64)),
        samples: (first..first + len).map(|sample_idx| sample_idx as f32).collect(),
    }
}

enum Item {
    Frame(Arc<VideoFrame>),
    Audio(AudioChunk),
}

/// `seconds` of 25 fps video and 100-sample audio chunks, video first.
fn streams(seconds: u64) -> (Vec<Item>, Vec<Item>) {
    let video = (0..seconds * 25).map(|frame_idx| Item::Frame(frame(frame_idx, 40))).collect();
    let audio = (0..seconds * 10).map(|chunk_idx| Item::Audio(chunk(chunk_idx, 100))).collect();
    (video, audio)
}

fn feed(builder: &mut WindowBuilder, item: &Item) -> Vec<Window> {
    match item {
        Item::Frame(frame) => builder.push_frame(frame.clone(), frame.pts),
        Item::Audio(chunk) => builder.push_audio(chunk, chunk.pts),
    }
}

/// What identifies a window's content.
fn summary(window: &Window) -> (u64, Vec<u8>, Vec<f32>, WindowStatsNoSkew, Option<Degraded>) {
    let frames = window.frames.iter().map(|frame| frame.rgb[0]).collect();
    let stats = WindowStatsNoSkew {
        video_gap_frames: window.stats.video_gap_frames,
        audio_gap_samples: window.stats.audio_gap_samples,
    };
    (window.index, frames, window.audio.clone(), stats, window.degraded)
}

#[derive(Debug, PartialEq)]
struct WindowStatsNoSkew {
    video_gap_frames: u32,
    audio_gap_samples: u32,
}

/// Feeds video then audio in the given order and ends both streams.
fn check(settings: WindowSettings, order: &[Item]) -> Vec<Window> {
    let mut builder = builder(settings);
    let mut windows = Vec::new();
    for item in order {
        windows.extend(feed(&mut builder, item));
    }
    windows.extend(builder.end_video());
    windows.extend(builder.end_audio());
    windows
}

#[test]
fn window_count_sizes_and_times_over_a_known_duration() {
    let (video, audio) = streams(10);
    let interleaved: Vec<Item> = video.into_iter().chain(audio).collect();
    let windows = check(settings(2_000, 1_000, 8), &interleaved);
    // Windows of 2 s every 1 s over 10 s: starts 0..=8.
    assert_eq!(windows.len(), 9);
    for (k, window) in windows.iter().enumerate() {
        assert_eq!(window.index, k as u64);
        assert_eq!(window.start, RunningTime(Duration::from_secs(k as u64)));
        assert_eq!(window.end, RunningTime(Duration::from_secs(k as u64 + 2)));
        assert_eq!(window.frames.len(), 8);
        assert_eq!(window.audio.len(), 2_000);
        assert_eq!(window.first_sample, k as i64 * 1_000);
        assert_eq!(window.audio[0], (k * 1_000) as f32);
        assert_eq!(window.audio[1_999], (k * 1_000 + 1_999) as f32);
        assert_eq!(window.stats.video_gap_frames, 0);
        assert_eq!(window.stats.audio_gap_samples, 0);
        assert_eq!(window.start_utc, datetime!(2026-01-01 00:00:00 UTC) + Duration::from_secs(k as u64));
        assert!(window.degraded.is_none());
    }
    // Frame targets of window 0: (j + 0.5) * 250 ms = 125, 375, ... -> frames 3 (120 ms), 9 (360 ms), ...
    // 125 ms is nearest to 120 (frame 3); 375 to 360/400 -> 360 is 15 away, 400 is 25: frame 9.
    let picked: Vec<u8> = windows[0].frames.iter().map(|frame| frame.rgb[0]).collect();
    assert_eq!(picked, [3, 9, 16, 22, 28, 34, 41, 47]);
}

#[test]
fn audio_ahead_of_video_gives_the_same_windows() {
    let (video, audio) = streams(6);
    let video_first: Vec<Item> = video.iter().map(clone_item).chain(audio.iter().map(clone_item)).collect();
    let audio_first: Vec<Item> = audio.into_iter().chain(video).collect();
    let a: Vec<_> = check(settings(2_000, 1_000, 4), &video_first).iter().map(summary).collect();
    let b: Vec<_> = check(settings(2_000, 1_000, 4), &audio_first).iter().map(summary).collect();
    assert_eq!(a.len(), 5);
    assert_eq!(a, b);
}

fn clone_item(item: &Item) -> Item {
    match item {
        Item::Frame(frame) => Item::Frame(frame.clone()),
        Item::Audio(chunk) => Item::Audio(chunk.clone()),
    }
}

#[test]
fn audio_gap_is_zero_filled_and_counted() {
    let (video, audio) = streams(3);
    // Drop audio chunk 5 (samples 500..600).
    let audio: Vec<Item> = audio.into_iter().enumerate().filter(|(idx, _)| *idx != 5).map(|(_, item)| item).collect();
    let order: Vec<Item> = video.into_iter().chain(audio).collect();
    let windows = check(settings(1_000, 1_000, 2), &order);
    assert_eq!(windows.len(), 3);
    assert_eq!(windows[0].stats.audio_gap_samples, 100);
    assert!(windows[0].audio[500..600].iter().all(|sample| *sample == 0.0));
    assert_eq!(windows[0].audio[600], 600.0);
    assert_eq!(windows[1].stats.audio_gap_samples, 0);
}

#[test]
fn video_gap_takes_the_nearest_frame_and_is_counted() {
    let (video, audio) = streams(2);
    // Remove frames 5..20 (200 ms .. 800 ms).
    let video: Vec<Item> = video
        .into_iter()
        .filter(|item| matches!(item, Item::Frame(frame) if !(5..20).contains(&(frame.rgb[0] as u64))))
        .collect();
    let order: Vec<Item> = video.into_iter().chain(audio).collect();
    let windows = check(settings(1_000, 1_000, 4), &order);
    // Targets 125, 375, 625, 875 ms: 125 -> frame 3 (120); 375 -> frame 4 (160) gap;
    // 625 -> frame 20 (800) gap; 875 -> frame 22 (880).
    let picked: Vec<u8> = windows[0].frames.iter().map(|frame| frame.rgb[0]).collect();
    assert_eq!(picked, [3, 4, 20, 22]);
    assert_eq!(windows[0].stats.video_gap_frames, 2);
}

#[test]
fn file_ends_after_its_last_full_window() {
    // 3.5 s of media, 1 s windows every 0.5 s: last full window is [2.5, 3.5).
    let video: Vec<Item> = (0..(35 * 25 / 10)).map(|frame_idx| Item::Frame(frame(frame_idx, 40))).collect();
    let audio: Vec<Item> = (0..35).map(|chunk_idx| Item::Audio(chunk(chunk_idx, 100))).collect();
    let order: Vec<Item> = audio.into_iter().chain(video).collect();
    let windows = check(settings(1_000, 500, 2), &order);
    let starts: Vec<u128> = windows.iter().map(|window| window.start.as_duration().as_millis()).collect();
    assert_eq!(starts, [0, 500, 1_000, 1_500, 2_000, 2_500]);
}

#[test]
fn nothing_comes_out_after_both_streams_ended() {
    // A live source that ends (EOS, then restarted by its supervisor): once the last full
    // window is out, later polls must not start over from the first window with the data gone.
    let video: Vec<Item> = (0..(35 * 25 / 10)).map(|frame_idx| Item::Frame(frame(frame_idx, 40))).collect();
    let audio: Vec<Item> = (0..35).map(|chunk_idx| Item::Audio(chunk(chunk_idx, 100))).collect();
    let order: Vec<Item> = audio.into_iter().chain(video).collect();
    let mut builder = builder(settings(1_000, 500, 2));
    let mut windows = Vec::new();
    for item in &order {
        windows.extend(feed(&mut builder, item));
    }
    windows.extend(builder.end_video());
    windows.extend(builder.end_audio());
    assert_eq!(windows.len(), 6);
    for seconds in [4, 10, 60] {
        let late = builder.poll(RunningTime(Duration::from_secs(seconds)));
        assert!(late.is_empty(), "{} windows after the end, first at {:?}", late.len(), late[0].start);
    }
    assert!(builder.end_audio().is_empty());
}

#[test]
fn windows_after_a_stream_ended_are_marked_with_that_sense_lost() {
    // Audio ends at 2 s, video goes on to 4 s (a microphone gone): 1 s windows every 1 s.
    let video: Vec<Item> = (0..100).map(|frame_idx| Item::Frame(frame(frame_idx, 40))).collect();
    let audio: Vec<Item> = (0..20).map(|chunk_idx| Item::Audio(chunk(chunk_idx, 100))).collect();
    let mut builder = builder(settings(1_000, 1_000, 2));
    let mut windows = Vec::new();
    for item in audio.iter().chain(&video[..25]) {
        windows.extend(feed(&mut builder, item));
    }
    windows.extend(builder.end_audio());
    for item in &video[25..] {
        windows.extend(feed(&mut builder, item));
    }
    let degraded: Vec<Option<Degraded>> = windows.iter().map(|window| window.degraded).collect();
    assert_eq!(degraded[..2], [None, None]);
    assert!(degraded[2..].iter().all(|d| *d == Some(Degraded::AudioLost)), "{degraded:?}");
    assert_eq!(degraded.len(), 4, "windows [0,1) .. [3,4): video runs to 4 s");
}

#[test]
fn lagging_video_is_declared_lost_after_max_lead() {
    let mut settings = settings(1_000, 1_000, 2);
    settings.max_lead = Duration::from_secs(2);
    let mut builder = builder(settings);
    let mut windows = Vec::new();
    windows.extend(builder.push_frame(frame(0, 40), RunningTime::ZERO));
    for chunk_idx in 0..40 {
        windows.extend(builder.push_audio(&chunk(chunk_idx, 100), RunningTime::ZERO));
    }
    // Audio runs to 4 s, video stopped at 40 ms: windows ending at or before 4 s - 2 s go out degraded.
    assert_eq!(windows.len(), 2);
    assert!(windows.iter().all(|window| window.degraded == Some(Degraded::VideoLost)));
    assert_eq!(builder.counters().degraded_windows, 2);
}

#[test]
fn live_poll_emits_after_max_wait() {
    let mut builder = builder(settings(1_000, 1_000, 2));
    builder.push_frame(frame(0, 40), RunningTime::ZERO);
    for chunk_idx in 0..15 {
        builder.push_audio(&chunk(chunk_idx, 100), RunningTime::ZERO);
    }
    assert!(builder.poll(RunningTime(Duration::from_millis(2_500))).is_empty());
    let windows = builder.poll(RunningTime(Duration::from_millis(3_000)));
    assert_eq!(windows.len(), 1);
    assert_eq!(windows[0].degraded, Some(Degraded::VideoLost));
}

#[test]
fn audio_only_source() {
    let mut settings = settings(1_000, 1_000, 0);
    settings.video = false;
    let (_, audio) = streams(3);
    let windows = check(settings, &audio);
    assert_eq!(windows.len(), 3);
    assert!(windows.iter().all(|window| window.frames.is_empty() && window.audio.len() == 1_000));
}

#[test]
fn skew_is_measured_from_arrival_times() {
    let mut builder = builder(settings(1_000, 1_000, 2));
    let mut windows = Vec::new();
    for frame_idx in 0..30 {
        let frame = frame(frame_idx, 40);
        let arrival = frame.pts + Duration::from_millis(10);
        windows.extend(builder.push_frame(frame, arrival));
    }
    for chunk_idx in 0..11 {
        let chunk = chunk(chunk_idx, 100);
        windows.extend(builder.push_audio(&chunk, chunk.pts + Duration::from_millis(60)));
    }
    assert_eq!(windows.len(), 1);
    assert_eq!(windows[0].stats.av_skew, Some(time::Duration::milliseconds(50)));
}

proptest! {
    /// Any interleaving of the two streams, with timestamp jitter below the audio jitter
    /// tolerance and buffers of any size, gives the same windows.
    #[test]
    fn any_interleaving_gives_the_same_windows(
        seed in any::<u64>(),
        chunk_len in 1usize..400,
        jitter_us in proptest::collection::vec(0u64..900, 64),
    ) {
        let settings = settings(2_000, 700, 5);
        let seconds = 5;
        let video: Vec<Item> = (0..seconds * 25).map(|frame_idx| Item::Frame(frame(frame_idx, 40))).collect();
        let total = seconds as usize * SAMPLE_RATE as usize;
        let audio: Vec<Item> = (0..total.div_ceil(chunk_len)).map(|chunk_idx| {
            let first = chunk_idx * chunk_len;
            let last = (first + chunk_len).min(total);
            let jitter = Duration::from_micros(jitter_us[chunk_idx % jitter_us.len()]);
            let pts = Duration::from_nanos(first as u64 * 1_000_000_000 / SAMPLE_RATE as u64) + jitter;
            Item::Audio(AudioChunk { pts: RunningTime(pts), samples: (first..last).map(|sample_idx| sample_idx as f32).collect() })
        }).collect();

        let reference: Vec<Item> = video.iter().map(clone_item).chain(audio.iter().map(clone_item)).collect();
        let expected: Vec<_> = check(settings.clone(), &reference).iter().map(summary).collect();

        // Merge the two streams in a random order that keeps each stream's own order.
        let mut rng_state = seed | 1;
        let mut next_bit = || { rng_state ^= rng_state << 13; rng_state ^= rng_state >> 7; rng_state ^= rng_state << 17; rng_state & 1 == 1 };
        let (mut v, mut a) = (video.iter().peekable(), audio.iter().peekable());
        let mut merged = Vec::new();
        while v.peek().is_some() || a.peek().is_some() {
            let take_video = match (v.peek(), a.peek()) { (Some(_), Some(_)) => next_bit(), (Some(_), None) => true, _ => false };
            merged.push(clone_item(if take_video { v.next().unwrap() } else { a.next().unwrap() }));
        }
        let got: Vec<_> = check(settings, &merged).iter().map(summary).collect();
        prop_assert_eq!(got.len(), 5);
        prop_assert_eq!(got, expected);
    }
}

#[test]
fn sound_level_is_the_rms_of_the_newest_hop_in_dbfs() {
    // A sine at amplitude 0.3 reads 20 log10(0.3 / sqrt 2) = -13.47 dBFS; silence the floor.
    let sine: Vec<f32> =
        (0..16_000).map(|idx| 0.3 * (idx as f32 * 440.0 * std::f32::consts::TAU / 16_000.0).sin()).collect();
    assert!((rms_dbfs(&sine) - -13.47).abs() < 0.01, "{}", rms_dbfs(&sine));
    assert_eq!(rms_dbfs(&[0.0; 100]), SILENCE_DBFS);
    assert_eq!(rms_dbfs(&[]), SILENCE_DBFS);
    // Windows of 2 s every 0.5 s over a signal that is 1.0 in its first second and 0.1 after:
    // the level follows the newest 0.5 s only.
    // (The whole first window would read -3 dBFS.)
    let mut audio_only = builder(WindowSettings { video: false, ..settings(2000, 500, 0) });
    let loud = AudioChunk { pts: RunningTime::ZERO, samples: vec![1.0; 1000] };
    let quiet = AudioChunk { pts: RunningTime(Duration::from_secs(1)), samples: vec![0.1; 3000] };
    let mut windows = audio_only.push_audio(&loud, loud.pts);
    windows.extend(audio_only.push_audio(&quiet, quiet.pts));
    let levels: Vec<(u64, f32)> =
        windows.iter().map(|window| (window.index, window.stats.audio_dbfs.unwrap().round())).collect();
    assert_eq!(levels, [(0, -20.0), (1, -20.0), (2, -20.0), (3, -20.0), (4, -20.0)]);
    let mut video_only = builder(WindowSettings { audio: false, ..settings(1000, 500, 2) });
    let frames: Vec<Window> =
        (0..50).flat_map(|idx| video_only.push_frame(frame(idx, 40), frame(idx, 40).pts)).collect();
    assert!(frames.iter().all(|window| window.stats.audio_dbfs.is_none()));
}

/// A model's metadata with `video.span_seconds` (scenic's AudioSet models: 32 frames over
/// 2.56 s beside 8 s of audio), at `position`.
fn metadata_with_span(position: &str) -> crate::model::ModelMetadata {
    let json = serde_json::json!({
        "format_version": 1, "name": "span", "labels": ["a"], "multi_label": true, "window_seconds": 8.0,
        "video": {"frames": 32, "height": 2, "width": 2, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5],
                  "span_seconds": 2.56, "span_position": position},
    });
    let metadata: crate::model::ModelMetadata = serde_json::from_value(json).unwrap();
    metadata.check().unwrap();
    metadata
}

#[test]
fn a_short_video_span_takes_the_frames_from_that_span() {
    for (position, offset_ms) in [("centre", 2_720), ("start", 0), ("end", 5_440)] {
        let metadata = metadata_with_span(position);
        let span = metadata.video_span();
        assert_eq!(
            span,
            Some(VideoSpan { offset: Duration::from_millis(offset_ms), length: Duration::from_millis(2_560) })
        );
        let mut settings = settings(8_000, 2_000, 32);
        settings.video_span = span;
        let (video, audio) = streams(10);
        let interleaved: Vec<Item> = video.into_iter().chain(audio).collect();
        let windows = check(settings, &interleaved);
        assert_eq!(windows.len(), 2);
        for window in &windows {
            // Frame j is nearest to start + offset + (j + 0.5) * 80 ms; at 25 fps every
            // target is a frame time, so the span's frames are picked exactly.
            let picked: Vec<Duration> = window.frames.iter().map(|frame| frame.pts.as_duration()).collect();
            let expected: Vec<Duration> =
                (0..32).map(|j| window.start.as_duration() + Duration::from_millis(offset_ms + 40 + 80 * j)).collect();
            assert_eq!(picked, expected, "{position}");
            assert_eq!(window.stats.video_gap_frames, 0);
        }
    }
}

#[test]
fn without_a_span_the_frames_cover_the_whole_window() {
    let mut metadata = metadata_with_span("centre");
    metadata.video.as_mut().unwrap().span_seconds = None;
    assert_eq!(metadata.video_span(), None);
}
