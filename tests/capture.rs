//! Capture and windowing on real GStreamer pipelines: live test sources, files made with
//! gst-launch-1.0 in the test, an injected pipeline error, a live source that ends, a clean
//! stop, and a real RTSP server (tests/rtsp_server.py: H.264 and PCMA or L16) that is killed
//! and comes back. No model is involved: the formats are given directly.

mod common;

use std::path::Path;
use std::process::Command;
use std::sync::atomic::AtomicBool;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, bounded};
use mbt_edge::capture::{self, CaptureEvent, CaptureFormat, CaptureOptions, SinkMode, SourceStatus};
use mbt_edge::config::{RestartSettings, Settings, SourceSettings};
use mbt_edge::daemon::{StageOutput, WindowStage};
use mbt_edge::window::{Window, WindowSettings};

const WIDTH: u32 = 64;
const HEIGHT: u32 = 48;
const RATE: u32 = 16_000;
const FRAMES: usize = 8;

fn source_from_toml(body: &str) -> SourceSettings {
    let text = format!("[model]\npath = \"m.onnx\"\n\n[[source]]\nname = \"s\"\n{body}\n");
    Settings::from_toml_str(Path::new("test.toml"), &text).unwrap_or_else(|err| panic!("{err}")).sources.remove(0)
}

fn window_settings(length: Duration, hop: Duration) -> WindowSettings {
    WindowSettings {
        length,
        hop,
        n_frames: FRAMES,
        sample_rate: RATE,
        video: true,
        audio: true,
        max_lead: Duration::from_secs(30),
        max_wait: Duration::from_secs(2),
        video_span: None,
    }
}

fn format() -> CaptureFormat {
    CaptureFormat { video: Some((WIDTH, HEIGHT)), audio: Some(RATE) }
}

struct Run {
    windows: Vec<Window>,
    statuses: Vec<(SourceStatus, String)>,
    finished: bool,
    failed: Option<String>,
}

/// Runs `source` through capture and the window stage until it finishes, fails, or `until`
/// says stop (checked after each output), or `deadline` passes.
fn drive(
    source: SourceSettings,
    settings: WindowSettings,
    deadline: Duration,
    mut on_output: impl FnMut(&capture::SourceHandle, &Run),
    until: impl Fn(&Run) -> bool,
) -> (Run, capture::SourceHandle) {
    let live = source.kind.is_live();
    let (sender, receiver) = bounded(256);
    let options = CaptureOptions { format: format(), mode: SinkMode { sync: false }, lossless: !live, evidence: None };
    let handle = capture::spawn(0, source.clone(), options, sender, None).expect("spawn");
    let mut stage = WindowStage::new(vec![(source.name.clone(), settings, live)]);
    let mut run = Run { windows: Vec::new(), statuses: Vec::new(), finished: false, failed: None };
    let start = Instant::now();
    while start.elapsed() < deadline && !run.finished && run.failed.is_none() && !until(&run) {
        let Some(event) = next(&receiver) else { continue };
        for output in stage.handle(event) {
            match output {
                StageOutput::Window(window) => run.windows.push(window),
                StageOutput::Status { status, detail, .. } => run.statuses.push((status, detail)),
                StageOutput::Finished { .. } => run.finished = true,
                StageOutput::Failed { message, .. } => run.failed = Some(message),
            }
            on_output(&handle, &run);
        }
    }
    (run, handle)
}

fn next(receiver: &Receiver<CaptureEvent>) -> Option<CaptureEvent> {
    receiver.recv_timeout(Duration::from_millis(100)).ok()
}

/// Every window has F frames and exactly t * rate samples, frames sit within one frame
/// period of their sampling targets (all but `holes` of them: targets in a hole of the
/// stream, which the window counts as gap frames), and audio is cut at the window's start on
/// the same clock.
fn check_window_shape(window: &Window, frame_period: Duration, holes: usize) {
    let length = window.end.as_duration() - window.start.as_duration();
    assert_eq!(window.frames.len(), FRAMES, "window {}", window.index);
    assert_eq!(window.audio.len() as u128, length.as_nanos() * RATE as u128 / 1_000_000_000, "window {}", window.index);
    let mut far = Vec::new();
    for (frame_idx, frame) in window.frames.iter().enumerate() {
        assert_eq!((frame.width, frame.height, frame.rgb.len()), (WIDTH, HEIGHT, (WIDTH * HEIGHT * 3) as usize));
        let interval = length / FRAMES as u32;
        let target = window.start.as_duration() + interval * frame_idx as u32 + interval / 2;
        let distance = frame.pts.as_duration().abs_diff(target);
        if distance > frame_period {
            far.push((frame_idx, distance));
        }
    }
    assert!(far.len() <= holes, "window {}: frames far from their targets {far:?}", window.index);
    assert!(far.len() <= window.stats.video_gap_frames as usize, "window {}: uncounted holes {far:?}", window.index);
    let expected_first = (window.start.as_duration().as_nanos() * RATE as u128 / 1_000_000_000) as i64;
    assert_eq!(window.first_sample, expected_first);
}

#[test]
fn non_live_test_source_gives_the_exact_window_count() {
    let source = source_from_toml(
        "kind = \"test\"\nis_live = false\nduration = 6\nfps = 25\nsample_rate = 48000\npattern = \"ball\"\nwidth = 320\nheight = 240",
    );
    let (run, _handle) = drive(
        source,
        window_settings(Duration::from_secs(2), Duration::from_secs(1)),
        Duration::from_secs(60),
        |_, _| {},
        |_| false,
    );
    assert!(run.finished, "the source must finish; failed: {:?}", run.failed);
    // 6 s of media, 2 s windows every 1 s: windows start at 0, 1, 2, 3, 4.
    let starts: Vec<u64> = run.windows.iter().map(|window| window.start.as_duration().as_secs()).collect();
    assert_eq!(starts, [0, 1, 2, 3, 4]);
    for window in &run.windows {
        check_window_shape(window, Duration::from_millis(40), 0);
        assert_eq!(window.stats.video_gap_frames, 0);
        assert_eq!(window.stats.audio_gap_samples, 0, "window {}", window.index);
        assert!(window.degraded.is_none());
    }
    // The tone is really there: 440 Hz sine at volume 0.8, resampled to mono 16 kHz.
    let peak = run.windows[0].audio.iter().fold(0f32, |peak, sample| peak.max(sample.abs()));
    assert!((0.7..0.9).contains(&peak), "peak {peak}");
}

/// VP8 + Opus WebM, 640x480 at 30 fps and 48 kHz stereo, 5 s long.
fn make_webm(path: &Path) {
    let status = Command::new("gst-launch-1.0")
        .args(["-q", "webmmux", "name=mux", "!", "filesink"])
        .arg(format!("location={}", path.display()))
        .args([
            "videotestsrc",
            "num-buffers=150",
            "pattern=smpte",
            "!",
            "video/x-raw,width=640,height=480,framerate=30/1",
        ])
        .args(["!", "vp8enc", "deadline=1", "!", "queue", "!", "mux."])
        .args([
            "audiotestsrc",
            "num-buffers=250",
            "samplesperbuffer=960",
            "wave=sine",
            "freq=1000",
            "!",
            "audio/x-raw,rate=48000,channels=2",
        ])
        .args(["!", "opusenc", "!", "queue", "!", "mux."])
        .status()
        .expect("gst-launch-1.0 runs");
    assert!(status.success(), "making the test file failed");
}

#[test]
fn webm_file_gives_aligned_exact_windows_and_ends_at_eos() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("clip.webm");
    make_webm(&path);
    let source = source_from_toml(&format!("kind = \"uri\"\nuri = \"{}\"", path.display()));
    let (run, _handle) = drive(
        source,
        window_settings(Duration::from_secs(2), Duration::from_millis(500)),
        Duration::from_secs(120),
        |_, _| {},
        |_| false,
    );
    assert!(run.finished, "failed: {:?}", run.failed);
    // 5 s of media, 2 s windows every 0.5 s: starts 0, 0.5, ..., 3.0 (7 windows).
    let starts: Vec<u128> = run.windows.iter().map(|window| window.start.as_duration().as_millis()).collect();
    assert_eq!(starts, [0, 500, 1_000, 1_500, 2_000, 2_500, 3_000]);
    for window in &run.windows {
        check_window_shape(window, Duration::from_millis(34), 0);
        assert_eq!(window.stats.video_gap_frames, 0, "window {}", window.index);
    }
    // Windows after the codec's start-up have no audio gaps.
    assert!(run.windows[1..].iter().all(|window| window.stats.audio_gap_samples == 0));
}

#[test]
fn missing_file_fails_with_a_clear_message() {
    let source = source_from_toml("kind = \"uri\"\nuri = \"/nonexistent/clip.webm\"");
    let (run, _handle) = drive(
        source,
        window_settings(Duration::from_secs(2), Duration::from_secs(1)),
        Duration::from_secs(30),
        |_, _| {},
        |_| false,
    );
    let message = run.failed.expect("the source must fail");
    assert!(message.to_lowercase().contains("not found") || message.contains("No such file"), "{message}");
    assert!(run.windows.is_empty());
}

fn live_source(extra: &str) -> SourceSettings {
    let mut source = source_from_toml(&format!(
        "kind = \"test\"\nfps = 25\nsample_rate = 16000\nwidth = 320\nheight = 240\n{extra}"
    ));
    source.restart = RestartSettings {
        stall_timeout: Duration::from_secs(2),
        backoff_initial: Duration::from_millis(200),
        backoff_max: Duration::from_secs(2),
    };
    source
}

#[test]
fn live_source_windows_and_restart_after_an_injected_error() {
    let injected = AtomicBool::new(false);
    let injected_at = std::cell::Cell::new(None);
    let (run, handle) = drive(
        live_source(""),
        window_settings(Duration::from_secs(1), Duration::from_millis(500)),
        Duration::from_secs(30),
        |handle, run| {
            if run.windows.len() == 2 && !injected.swap(true, std::sync::atomic::Ordering::SeqCst) {
                handle.inject_error();
                injected_at.set(Some(Instant::now()));
            }
        },
        // Two windows from the second incarnation (index restarts at 0 after the restart).
        |run| run.windows.len() >= 5 && run.windows.iter().skip(2).filter(|window| window.index <= 1).count() >= 2,
    );
    assert!(injected.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(handle.restarts(), 1, "statuses: {:?}", run.statuses);
    let offline = run
        .statuses
        .iter()
        .position(|(status, detail)| *status == SourceStatus::Offline && detail.contains("injected"));
    let online_again =
        offline.and_then(|idx| run.statuses[idx..].iter().position(|(status, _)| *status == SourceStatus::Online));
    assert!(online_again.is_some(), "statuses: {:?}", run.statuses);
    for window in &run.windows {
        check_window_shape(window, Duration::from_millis(40), 0);
    }
    if let Some(at) = injected_at.get() {
        eprintln!("failure to restarted windows: {:?}", at.elapsed());
    }
    let stop_started = Instant::now();
    handle.join();
    eprintln!("clean stop took {:?}", stop_started.elapsed());
}

#[test]
fn live_source_that_ends_is_restarted() {
    let (run, handle) = drive(
        live_source("duration = 1.5"),
        window_settings(Duration::from_secs(1), Duration::from_millis(500)),
        Duration::from_secs(30),
        |_, _| {},
        |run| run.statuses.iter().filter(|(status, _)| *status == SourceStatus::Online).count() >= 2,
    );
    assert!(!run.finished, "a live source does not finish");
    assert!(handle.restarts() >= 1);
    assert!(run.statuses.iter().any(|(_, detail)| detail.contains("end of stream")), "{:?}", run.statuses);
}

#[test]
fn clean_stop_reports_offline_and_sends_nothing_after() {
    let (sender, receiver) = bounded(4096);
    let options = CaptureOptions { format: format(), mode: SinkMode { sync: false }, lossless: false, evidence: None };
    let handle = capture::spawn(0, live_source(""), options, sender, None).expect("spawn");
    // Wait for data, then stop.
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(10) {
        if let Some(CaptureEvent::Audio { .. }) = next(&receiver) {
            break;
        }
    }
    handle.join();
    let rest: Vec<CaptureEvent> = receiver.try_iter().collect();
    let last_two: Vec<String> = rest.iter().rev().take(2).map(|event| format!("{event:?}")).collect();
    assert!(
        matches!(rest.last(), Some(CaptureEvent::Status { status: SourceStatus::Offline, detail, .. }) if detail == "stopped"),
        "{last_two:?}"
    );
    // The channel is closed: the capture thread is gone.
    assert!(receiver.recv_timeout(Duration::from_millis(200)).is_err());
}

#[test]
fn video_only_and_audio_only_sources() {
    let mut video_only = live_source("audio = false\nis_live = false\nduration = 3");
    video_only.audio = false;
    let mut settings = window_settings(Duration::from_secs(1), Duration::from_secs(1));
    settings.audio = false;
    let (run, _handle) = drive(video_only, settings, Duration::from_secs(30), |_, _| {}, |_| false);
    assert!(run.finished);
    assert_eq!(run.windows.len(), 3);
    assert!(run.windows.iter().all(|window| window.frames.len() == FRAMES && window.audio.is_empty()));

    let audio_only = live_source("video = false\nis_live = false\nduration = 3");
    let mut settings = window_settings(Duration::from_secs(1), Duration::from_secs(1));
    settings.video = false;
    let (run, _handle) = drive(audio_only, settings, Duration::from_secs(30), |_, _| {}, |_| false);
    assert!(run.finished);
    assert_eq!(run.windows.len(), 3);
    assert!(run.windows.iter().all(|window| window.frames.is_empty() && window.audio.len() == RATE as usize));
}

const RTSP_FPS: u32 = 15;

/// An RTSP source on `server` (default latency: 200 ms; `protocols`: rtspsrc's, default UDP
/// with TCP as fallback), with the short stall timeout and backoff of `live_source`.
/// One RTSP test at a time: three servers encoding H.264 beside three decoding clients and
/// the other capture tests overload two cores, and the packets then come late.
static RTSP_ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn rtsp_turn() -> std::sync::MutexGuard<'static, ()> {
    RTSP_ONE_AT_A_TIME.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

fn rtsp_source(server: &common::RtspServer, protocols: Option<&str>) -> SourceSettings {
    let protocols = protocols.map(|protocols| format!("\nprotocols = \"{protocols}\"")).unwrap_or_default();
    let mut source = source_from_toml(&format!("kind = \"rtsp\"\nurl = \"{}\"{protocols}", server.url()));
    source.restart = RestartSettings {
        stall_timeout: Duration::from_secs(2),
        backoff_initial: Duration::from_millis(300),
        backoff_max: Duration::from_secs(2),
    };
    source
}

fn rtsp_media(width: u32, height: u32, audio_codec: &'static str, audio_rate: u32, freq: f64) -> common::RtspMedia {
    common::RtspMedia { width, height, fps: RTSP_FPS, audio_codec, audio_rate, freq, video_codec: "h264" }
}

/// A window of an RTSP source carries the server's media: exact shape, (almost) no gaps, a
/// picture that is not one colour (SMPTE bars), and the server's tone at its volume (0.5) and
/// frequency (counted by zero crossings, within 5 %).
fn check_rtsp_window(window: &Window, freq: f64) {
    // A new connection shows no picture until the stream's next keyframe (the server sends
    // one a second), so the first two windows of an incarnation (its first 1.5 s) may begin
    // with a hole: seen up to 400 ms. While the new server's encoders start on a busy
    // machine its first packets can come past the jitter buffer's latency and are dropped,
    // audio with video (seen once in CI: 392 ms of both in window 1). After that, packets
    // late past the jitter buffer are rare (seen: one frame in about thirty runs); a quarter
    // of a window's frames and 20 ms of its audio are the bounds, more is a capture fault.
    // Counts and sizes are exact throughout.
    let starting = window.index < 2;
    let holes = if starting { FRAMES } else { FRAMES / 4 };
    let audio_holes = if starting { RATE / 2 } else { RATE / 50 };
    check_window_shape(window, Duration::from_millis(1_000 / RTSP_FPS as u64 + 5), holes);
    assert!(window.stats.video_gap_frames as usize <= holes, "window {}: {:?}", window.index, window.stats);
    assert!(window.stats.audio_gap_samples <= audio_holes, "window {}: {:?}", window.index, window.stats);
    for frame in &window.frames {
        let colours: std::collections::BTreeSet<&[u8]> = frame.rgb.chunks_exact(3).collect();
        assert!(colours.len() >= 4, "window {}: {} colours", window.index, colours.len());
    }
    let peak = window.audio.iter().fold(0f32, |peak, sample| peak.max(sample.abs()));
    assert!((0.4..0.6).contains(&peak), "window {}: peak {peak}", window.index);
    let crossings = window.audio.windows(2).filter(|pair| (pair[0] < 0.0) != (pair[1] < 0.0)).count() as f64;
    // Over the samples heard: a hole is silence, with no crossings.
    let heard = window.audio.len().saturating_sub(window.stats.audio_gap_samples as usize);
    assert!(heard >= RATE as usize / 4, "window {}: {heard} samples heard", window.index);
    let seconds = heard as f64 / RATE as f64;
    let measured = crossings / 2.0 / seconds;
    assert!((measured / freq - 1.0).abs() < 0.05, "window {}: {measured} Hz, expected {freq}", window.index);
}

fn indexes(windows: &[Window]) -> Vec<u64> {
    windows.iter().map(|window| window.index).collect()
}

fn consecutive(windows: &[Window]) -> bool {
    windows.windows(2).all(|pair| pair[1].index == pair[0].index + 1)
}

#[test]
fn rtsp_source_gives_windows_of_its_video_and_audio() {
    let _turn = rtsp_turn();
    let server = common::RtspServer::start(rtsp_media(320, 240, "pcma", 8_000, 440.0));
    let (run, handle) = drive(
        rtsp_source(&server, None),
        window_settings(Duration::from_secs(1), Duration::from_millis(500)),
        Duration::from_secs(20),
        |_, _| {},
        |run| run.windows.len() >= 4,
    );
    assert_eq!(run.windows.len(), 4, "failed: {:?}, statuses: {:?}", run.failed, run.statuses);
    assert_eq!(run.statuses.first().map(|(status, _)| *status), Some(SourceStatus::Online), "{:?}", run.statuses);
    assert!(run.statuses.iter().all(|(status, _)| *status == SourceStatus::Online), "{:?}", run.statuses);
    // Consecutive: none dropped, none twice (the first index depends on when the first
    // buffer arrived, after the RTSP handshake).
    assert!(consecutive(&run.windows), "{:?}", indexes(&run.windows));
    for window in &run.windows {
        check_rtsp_window(window, 440.0);
    }
    assert_eq!(handle.restarts(), 0);
}

/// Serves `first` over `protocols`, SIGKILLs the server after two windows, starts it on the same port with
/// `second` once the source reports offline, and runs until two windows of the new
/// connection. Returns the run, the handle and how many windows came before the restart.
fn rtsp_server_killed_and_restarted(
    first: common::RtspMedia,
    second: common::RtspMedia,
    protocols: Option<&str>,
) -> (Run, capture::SourceHandle, usize) {
    let mut server = common::RtspServer::start(first);
    let source = rtsp_source(&server, protocols);
    // Statuses seen when the server was killed; windows seen when it was restarted.
    let killed_at = std::cell::Cell::new(None);
    let restarted_at = std::cell::Cell::new(None);
    let (run, handle) = drive(
        source,
        window_settings(Duration::from_secs(1), Duration::from_millis(500)),
        Duration::from_secs(40),
        |_, run| {
            if killed_at.get().is_none() && run.windows.len() >= 2 {
                server.kill();
                killed_at.set(Some(run.statuses.len()));
            }
            if let (Some(killed), None) = (killed_at.get(), restarted_at.get())
                && run.statuses[killed..].iter().any(|(status, _)| *status == SourceStatus::Offline)
            {
                server.restart(second);
                restarted_at.set(Some(run.windows.len()));
            }
        },
        |run| restarted_at.get().is_some_and(|restarted| run.windows.len() >= restarted + 2),
    );
    let restarted = restarted_at.get().unwrap_or_else(|| panic!("never restarted; statuses: {:?}", run.statuses));
    assert_eq!(run.windows.len(), restarted + 2, "failed: {:?}, statuses: {:?}", run.failed, run.statuses);
    // online (first connection), offline (the kill; one per failed attempt while the server
    // was down), online (the new connection), in that order and nothing else.
    let statuses: Vec<SourceStatus> = run.statuses.iter().map(|(status, _)| *status).collect();
    let failures = statuses.iter().filter(|status| **status == SourceStatus::Offline).count();
    let mut expected = vec![SourceStatus::Online];
    expected.extend(std::iter::repeat_n(SourceStatus::Offline, failures));
    expected.push(SourceStatus::Online);
    assert_eq!(statuses, expected, "{:?}", run.statuses);
    // Every failure was followed by a rebuild with backoff.
    assert_eq!(handle.restarts(), failures as u64, "{:?}", run.statuses);
    // Each connection's windows are consecutive, on its own running time.
    let (before, after) = run.windows.split_at(restarted);
    assert!(consecutive(before) && consecutive(after), "{:?} then {:?}", indexes(before), indexes(after));
    (run, handle, restarted)
}

#[test]
fn rtsp_server_killed_mid_run_goes_offline_and_recovers() {
    let _turn = rtsp_turn();
    let media = rtsp_media(320, 240, "pcma", 8_000, 440.0);
    let (run, _handle, restarted) = rtsp_server_killed_and_restarted(media, media, None);
    assert!(restarted >= 2);
    for window in &run.windows {
        check_rtsp_window(window, 440.0);
    }
}

#[test]
fn rtsp_server_back_with_other_formats_still_gives_exact_windows() {
    let _turn = rtsp_turn();
    // 640x480 with 8 kHz PCMA at 440 Hz, then 320x240 with 16 kHz L16 at 1000 Hz: the capture
    // converts both to the model's 64x48 and 16 kHz, and the tone shows which server spoke.
    // Over TCP (RTP interleaved on the RTSP connection), as many cameras are set up.
    let (run, _handle, restarted) = rtsp_server_killed_and_restarted(
        rtsp_media(640, 480, "pcma", 8_000, 440.0),
        rtsp_media(320, 240, "l16", 16_000, 1_000.0),
        Some("tcp"),
    );
    for window in &run.windows[..restarted] {
        check_rtsp_window(window, 440.0);
    }
    for window in &run.windows[restarted..] {
        check_rtsp_window(window, 1_000.0);
    }
}

/// What [`rtsp_evidence`] saw: the snapshot's and the clip's gst-discoverer reports, the
/// clip's path and length, the tone its audio peaks at, and the source's restarts.
struct RtspEvidence {
    still: String,
    clip: String,
    clip_path: String,
    seconds: f64,
    peak: f64,
    restarts: u64,
}

/// Runs an RTSP camera serving `media` through capture with evidence (stills 160 wide at
/// 5 fps, `copy`, pre_roll and post_roll 1 s) into a real evidence store, then asks it for
/// the snapshot and clip of an event from 2.5 s to 1.5 s ago.
fn rtsp_evidence(media: common::RtspMedia) -> RtspEvidence {
    use mbt_edge::config::{EvidenceSettings, SourceEvidence};
    use mbt_edge::events::{Event, EventKind, LabelScores};
    use mbt_edge::evidence::EvidenceStore;

    let _turn = rtsp_turn();
    let server = common::RtspServer::start(media);
    let dir = tempfile::tempdir().unwrap();
    let per_source = SourceEvidence {
        pre_roll: Duration::from_secs(1),
        post_roll: Duration::from_secs(1),
        ..SourceEvidence::default()
    };
    let mut source = rtsp_source(&server, None);
    source.evidence = per_source;
    let settings = EvidenceSettings {
        enabled: true,
        dir: dir.path().join("evidence"),
        max_bytes: 1 << 30,
        max_age: Duration::from_secs(3600),
        max_clip: Duration::from_secs(60),
        default: per_source,
    };
    let store = EvidenceStore::start(settings, std::slice::from_ref(&source)).unwrap();
    let (sender, receiver) = bounded(256);
    let evidence = capture::EvidenceFormat { width: 160, fps: 5, copy: true };
    let options =
        CaptureOptions { format: format(), mode: SinkMode { sync: false }, lossless: false, evidence: Some(evidence) };
    let handle = capture::spawn(0, source.clone(), options, sender, Some(store.media())).expect("spawn");
    // Six seconds of the camera after the latest incarnation's first buffer: the clip below
    // starts 3.5 s back, with a keyframe (one a second) before that held.
    let mut started = None;
    let mut statuses = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(40);
    while started.is_none_or(|at: Instant| at.elapsed() < Duration::from_secs(6)) {
        assert!(Instant::now() < deadline, "the camera never ran 6 s: {statuses:?}");
        match next(&receiver) {
            Some(CaptureEvent::Started { .. }) => started = Some(Instant::now()),
            Some(CaptureEvent::Status { status, detail, .. }) => statuses.push((status, detail)),
            _ => {}
        }
    }
    let now = time::OffsetDateTime::now_utc();
    let event = |kind: EventKind| Event {
        kind,
        id: "6f1e3a52-0c4b-4d8e-9a6f-2b7c1d9e8f00".into(),
        source: source.name.clone(),
        label: "tone".into(),
        score: 0.9,
        peak_score: 0.9,
        scores: LabelScores { fused: 0.9, audio: None, video: None },
        start_time: now - Duration::from_millis(2500),
        end_time: (kind == EventKind::End).then(|| now - Duration::from_millis(1500)),
        window_start: now - Duration::from_millis(3500),
        window_end: now - Duration::from_millis(2500),
        degraded: None,
    };
    let client = store.client();
    let snapshot = client.snapshot(&event(EventKind::Start)).expect("a snapshot");
    client.clip(&event(EventKind::End)).expect("a clip planned");
    let done = client.clips_done().recv_timeout(Duration::from_secs(30)).expect("the clip written");
    while receiver.try_recv().is_ok() {}
    let restarts = handle.restarts();
    handle.join();
    let info = done.result.expect("written");
    let evidence_dir = dir.path().join("evidence");
    let still = common::discover(&evidence_dir.join(&snapshot.path));
    let clip_file = evidence_dir.join(&done.path);
    let clip = common::discover(&clip_file);
    let seconds = common::discovered_seconds(&clip);
    assert!((info.duration.as_secs_f64() - seconds).abs() < 0.5, "{:?} vs {seconds}", info.duration);
    let raw =
        common::decode(&clip_file, "audio/x-raw,format=F32LE,channels=1,rate=16000", &dir.path().join("a.raw"), true);
    let samples: Vec<f32> = raw.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect();
    let middle = samples.len() / 2;
    let peak = common::spectral_peak(&samples[middle - 4000..middle + 4000], 16_000.0);
    store.stop();
    RtspEvidence { still, clip, clip_path: done.path, seconds, peak, restarts }
}

/// An RTSP camera's evidence: stills for snapshots at the evidence width, and a clip that is
/// the camera's own H.264 (the clip has the camera's 320 x 240 while the stills are 160
/// wide: nothing was decoded and encoded again) in MP4 with the audio in Opus, from the
/// keyframe before `pre_roll` to `post_roll` after the end, its audio the camera's tone.
#[test]
fn rtsp_evidence_keeps_the_cameras_h264_in_an_mp4_clip_with_its_sound() {
    let seen = rtsp_evidence(rtsp_media(320, 240, "pcma", 8_000, 440.0));
    assert!(seen.still.contains("Width: 160") && seen.still.contains("Height: 120"), "{}", seen.still);
    assert!(seen.clip_path.ends_with(".mp4"), "{}", seen.clip_path);
    assert!(seen.clip.contains("H.264"), "{}", seen.clip);
    assert!(seen.clip.contains("Width: 320") && seen.clip.contains("Height: 240"), "the camera's size: {}", seen.clip);
    assert!(seen.clip.contains("Opus"), "{}", seen.clip);
    // pre_roll + 1 s + post_roll = 3 s, from the keyframe before (the camera sends one a
    // second, so up to 1 s more), plus the last frame's 67 ms and Opus's last 20 ms frame and
    // its padding (CI saw 4.1007 s once).
    assert!((3.0..=4.15).contains(&seen.seconds), "clip {} s\n{}", seen.seconds, seen.clip);
    assert!((seen.peak - 440.0).abs() <= 10.0, "the clip's audio peaks at {} Hz", seen.peak);
    assert_eq!(seen.restarts, 0);
}

/// A camera that sends VP8, not H.264, with `copy` on: the H.264 branch takes nothing, the
/// source runs as any other (no failure, no restart), and the event's clip is a WebM made
/// from the stills, with the camera's tone.
#[test]
fn an_rtsp_camera_that_is_not_h264_keeps_running_and_its_clips_are_made_from_stills() {
    let mut media = rtsp_media(320, 240, "pcma", 8_000, 660.0);
    media.video_codec = "vp8";
    let seen = rtsp_evidence(media);
    assert_eq!(seen.restarts, 0);
    assert!(seen.clip_path.ends_with(".webm"), "{}", seen.clip_path);
    assert!(seen.clip.contains("VP8") && seen.clip.contains("Opus"), "{}", seen.clip);
    assert!(seen.clip.contains("Width: 160"), "made from the 160-wide stills: {}", seen.clip);
    assert!((2.5..=3.5).contains(&seen.seconds), "clip {} s\n{}", seen.seconds, seen.clip);
    assert!((seen.peak - 660.0).abs() <= 10.0, "the clip's audio peaks at {} Hz", seen.peak);
}

/// `max_fps` on a camera of variable frame rate (RTSP VP8 comes as framerate 0/1): the
/// model's branch gets at most that many frames a second, by their timestamps, in the
/// cadence of the limit, and the source keeps running. (`videorate max-rate`, used for it before, aborts
/// the whole process on such a stream in GStreamer 1.22.)
#[test]
fn max_fps_limits_a_variable_rate_camera_and_the_source_keeps_running() {
    let _turn = rtsp_turn();
    let mut media = rtsp_media(320, 240, "pcma", 8_000, 440.0);
    media.video_codec = "vp8";
    let server = common::RtspServer::start(media);
    let mut source = rtsp_source(&server, None);
    source.max_fps = Some(5);
    let (sender, receiver) = bounded(256);
    let options = CaptureOptions { format: format(), mode: SinkMode { sync: false }, lossless: false, evidence: None };
    let handle = capture::spawn(0, source, options, sender, None).expect("spawn");
    // Frames of the latest incarnation over 6 s after its first one.
    let mut frames: Vec<(u64, std::time::Duration)> = Vec::new();
    let mut first: Option<Instant> = None;
    let deadline = Instant::now() + Duration::from_secs(40);
    while first.is_none_or(|at| at.elapsed() < Duration::from_secs(6)) {
        assert!(Instant::now() < deadline, "the camera never ran 6 s: {} frames", frames.len());
        if let Some(CaptureEvent::Frame { generation, frame, .. }) = next(&receiver) {
            if frames.last().is_some_and(|(g, _)| *g != generation) {
                frames.clear();
            }
            first.get_or_insert_with(Instant::now);
            frames.push((generation, frame.pts.as_duration()));
        }
    }
    let restarts = handle.restarts();
    handle.join();
    assert_eq!(restarts, 0, "the source kept running");
    let span = (frames.last().unwrap().1 - frames[0].1).as_secs_f64();
    let rate = (frames.len() - 1) as f64 / span;
    // The camera sends 15 a second.
    assert!(span > 4.0 && (4.0..=5.5).contains(&rate), "{} frames in {span:.2} s: {rate:.2} a second", frames.len());
    for pair in frames.windows(2) {
        let gap = (pair[1].1 - pair[0].1).as_secs_f64();
        // Never closer than half a period (the probe keeps the cadence of a late frame's
        // slot), never a whole slot skipped (the camera sends three a slot).
        assert!(
            (0.1..=0.4).contains(&gap),
            "frames {gap:.3} s apart: {:?}",
            frames.iter().map(|f| f.1).collect::<Vec<_>>()
        );
    }
}
