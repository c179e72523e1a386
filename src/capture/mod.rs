//! Capture: one GStreamer pipeline per source, each with a video and an audio appsink, and a
//! supervisor thread that rebuilds a failed live source with exponential backoff and jitter.
//!
//! Only this module touches GStreamer. Appsink callbacks copy the buffer into a plain
//! [`VideoFrame`] / [`AudioChunk`] and hand it off on a channel; nothing heavy runs on a
//! streaming thread. Timestamps are converted to the pipeline's running time, so the two
//! streams of a source share one clock.

mod clip;
mod describe;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow};
use crossbeam_channel::{Sender, TrySendError};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;
use gstreamer_video::prelude::*;
use time::OffsetDateTime;

pub use clip::{ClipAudio, ClipMedia, ClipVideo, write_clip};
pub use describe::{
    AUDIO_SINK, CaptureFormat, EvidenceFormat, H264_QUEUE, H264_SINK, JPEG_SINK, RTP_TEE, STILL_QUEUE, SinkMode,
    VIDEO_QUEUE, VIDEO_SINK, describe, h264_branch,
};

use crate::config::SourceSettings;
pub use crate::media::Modality;
use crate::media::{AudioChunk, EvidenceKind, EvidenceMedia, RunningTime, VideoFrame};
use crate::telemetry;

/// A source's health as users see it on the status topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SourceStatus {
    /// Every enabled stream is flowing.
    Online,
    /// One of two streams has stalled; the other still flows.
    Degraded,
    /// Not running: starting, failed and waiting to restart, or stopped.
    Offline,
}

impl SourceStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SourceStatus::Online => "online",
            SourceStatus::Degraded => "degraded",
            SourceStatus::Offline => "offline",
        }
    }
}

/// What capture hands to the window stage. `generation` counts pipeline incarnations of a
/// source: running time restarts at zero with each one.
#[derive(Debug)]
pub enum CaptureEvent {
    /// A new incarnation is playing; `utc_origin` is the UTC time at running time zero.
    Started {
        source_idx: usize,
        generation: u64,
        utc_origin: OffsetDateTime,
    },
    Frame {
        source_idx: usize,
        generation: u64,
        frame: VideoFrame,
        arrival: RunningTime,
    },
    Audio {
        source_idx: usize,
        generation: u64,
        chunk: AudioChunk,
        arrival: RunningTime,
    },
    /// One stream of an incarnation ended normally (end of a file).
    StreamEnded {
        source_idx: usize,
        generation: u64,
        modality: Modality,
    },
    /// The incarnation is gone (failure or stop); its partial windows are discarded.
    Stopped {
        source_idx: usize,
        generation: u64,
    },
    Status {
        source_idx: usize,
        status: SourceStatus,
        detail: String,
    },
    /// A non-live source played to its end; nothing more will come from it.
    Finished {
        source_idx: usize,
    },
    /// The source gave up (a file that cannot be read); `message` says why.
    Failed {
        source_idx: usize,
        message: String,
    },
}

/// Options of one capture run.
#[derive(Debug, Clone, Copy)]
pub struct CaptureOptions {
    pub format: CaptureFormat,
    pub mode: SinkMode,
    /// Block the streaming thread when the consumer is behind (files: nothing is lost)
    /// instead of dropping (live sources must not stall their device).
    pub lossless: bool,
    /// The evidence branch, if the source keeps evidence (the daemon only).
    pub evidence: Option<EvidenceFormat>,
}

/// Controls a running source.
pub struct SourceHandle {
    control: Arc<Control>,
    thread: Option<JoinHandle<()>>,
}

struct Control {
    stop: AtomicBool,
    inject_error: AtomicBool,
    restarts: AtomicU64,
}

impl SourceHandle {
    /// Asks the supervisor to stop the pipeline; `join` waits for it.
    pub fn stop(&self) {
        self.control.stop.store(true, Ordering::SeqCst);
    }

    /// Posts an error on the pipeline's bus, as a failing element would (diagnostics, tests).
    pub fn inject_error(&self) {
        self.control.inject_error.store(true, Ordering::SeqCst);
    }

    /// How many times the pipeline was rebuilt after a failure.
    pub fn restarts(&self) -> u64 {
        self.control.restarts.load(Ordering::SeqCst)
    }

    pub fn join(mut self) {
        self.stop();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }

    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|thread| thread.is_finished())
    }
}

impl Drop for SourceHandle {
    fn drop(&mut self) {
        self.control.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// Initialises GStreamer once; safe to call many times.
pub fn init() -> anyhow::Result<()> {
    gst::init().context("initialising GStreamer")
}

/// Starts `source` on its own supervisor thread. With `options.evidence`, the evidence
/// branch's stills (and H.264) and a copy of the audio go to `evidence`, dropped when it is
/// full: evidence never slows capture.
pub fn spawn(
    source_idx: usize,
    source: SourceSettings,
    options: CaptureOptions,
    events: Sender<CaptureEvent>,
    evidence: Option<Sender<EvidenceMedia>>,
) -> anyhow::Result<SourceHandle> {
    init()?;
    let control = Arc::new(Control {
        stop: AtomicBool::new(false),
        inject_error: AtomicBool::new(false),
        restarts: AtomicU64::new(0),
    });
    let thread_control = control.clone();
    let thread = std::thread::Builder::new()
        .name(format!("capture-{}", source.name))
        .spawn(move || Supervisor { source_idx, source, options, events, evidence, control: thread_control }.run())
        .context("spawning the capture thread")?;
    Ok(SourceHandle { control, thread: Some(thread) })
}

struct Supervisor {
    source_idx: usize,
    source: SourceSettings,
    options: CaptureOptions,
    events: Sender<CaptureEvent>,
    evidence: Option<Sender<EvidenceMedia>>,
    control: Arc<Control>,
}

/// How one incarnation ended.
enum Outcome {
    Stopped,
    Finished,
    Failed(String),
}

/// How far one stream of a lossless source may run ahead of the other before it waits.
const LOSSLESS_LEAD: Duration = Duration::from_secs(2);
/// A stream never waits longer than this for the other (a file whose other stream stops
/// early must still play to its end).
const LOSSLESS_MAX_WAIT: Duration = Duration::from_secs(5);

/// A pipeline that ran this long without failing resets the backoff.
const HEALTHY_RUN: Duration = Duration::from_secs(30);

impl Supervisor {
    fn run(self) {
        let mut backoff = self.source.restart.backoff_initial;
        let mut generation = 0;
        loop {
            generation += 1;
            let started = Instant::now();
            let outcome = self.run_once(generation);
            let _ = self.events.send(CaptureEvent::Stopped { source_idx: self.source_idx, generation });
            match outcome {
                Outcome::Stopped => {
                    self.status(SourceStatus::Offline, "stopped");
                    return;
                }
                Outcome::Finished => {
                    self.status(SourceStatus::Offline, "end of stream");
                    let _ = self.events.send(CaptureEvent::Finished { source_idx: self.source_idx });
                    return;
                }
                Outcome::Failed(reason) => {
                    self.status(SourceStatus::Offline, &reason);
                    if !self.source.kind.is_live() {
                        // A file that fails will fail again: report and give up.
                        let _ = self.events.send(CaptureEvent::Failed { source_idx: self.source_idx, message: reason });
                        return;
                    }
                    if started.elapsed() >= HEALTHY_RUN {
                        backoff = self.source.restart.backoff_initial;
                    }
                    let wait = jittered(backoff);
                    telemetry::source_failed(&self.source.name, &reason, wait);
                    if self.sleep_unless_stopped(wait) {
                        self.status(SourceStatus::Offline, "stopped");
                        return;
                    }
                    backoff = (backoff * 2).min(self.source.restart.backoff_max);
                    self.control.restarts.fetch_add(1, Ordering::SeqCst);
                    telemetry::source_restarted(&self.source.name, generation + 1);
                }
            }
        }
    }

    fn status(&self, status: SourceStatus, detail: &str) {
        let _ =
            self.events.send(CaptureEvent::Status { source_idx: self.source_idx, status, detail: detail.to_string() });
    }

    /// Sleeps `wait` in small steps; true when asked to stop meanwhile.
    fn sleep_unless_stopped(&self, wait: Duration) -> bool {
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            if self.control.stop.load(Ordering::SeqCst) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20).min(deadline.saturating_duration_since(Instant::now())));
        }
        self.control.stop.load(Ordering::SeqCst)
    }

    fn run_once(&self, generation: u64) -> Outcome {
        let evidence_format = self.options.evidence.filter(|_| self.evidence.is_some());
        let description = describe(&self.source, self.options.format, self.options.mode, evidence_format);
        tracing::debug!(source = %self.source.name, generation, pipeline = %description, "building pipeline");
        let pipeline = match gst::parse::launch(&description) {
            Ok(element) => match element.downcast::<gst::Pipeline>() {
                Ok(pipeline) => pipeline,
                Err(_) => return Outcome::Failed("the description is not a pipeline".into()),
            },
            Err(err) => return Outcome::Failed(format!("cannot build the pipeline: {err}")),
        };
        let video = self.options.format.video.is_some() && self.source.video;
        let audio = self.options.format.audio.is_some() && self.source.audio;
        let shared = Arc::new(Shared {
            source_idx: self.source_idx,
            source_name: self.source.name.clone(),
            generation,
            events: self.events.clone(),
            lossless: self.options.lossless,
            epoch: Instant::now(),
            last_video_ms: AtomicU64::new(0),
            last_audio_ms: AtomicU64::new(0),
            video_position_ns: AtomicU64::new(if video { 0 } else { u64::MAX }),
            audio_position_ns: AtomicU64::new(if audio { 0 } else { u64::MAX }),
            stopping: Arc::new(AtomicBool::new(false)),
            started: OnceLock::new(),
            pipeline: pipeline.downgrade(),
            evidence: self.evidence.clone().filter(|_| evidence_format.is_some()),
            evidence_source: self.source.name.as_str().into(),
            audio_rate: self.options.format.audio.unwrap_or(0),
        });
        if video && let Err(err) = attach(&pipeline, VIDEO_SINK, Modality::Video, shared.clone()) {
            return Outcome::Failed(err.to_string());
        }
        if video
            && let Some(fps) = self.source.max_fps
            && let Err(err) = limit_rate(&pipeline, VIDEO_QUEUE, fps)
        {
            return Outcome::Failed(err.to_string());
        }
        if audio && let Err(err) = attach(&pipeline, AUDIO_SINK, Modality::Audio, shared.clone()) {
            return Outcome::Failed(err.to_string());
        }
        if let Some(evidence) = evidence_format {
            let source_kind_copies =
                evidence.copy && matches!(self.source.kind, crate::config::SourceKind::Rtsp { .. });
            if video && let Err(err) = attach_evidence(&pipeline, JPEG_SINK, shared.clone()) {
                return Outcome::Failed(err.to_string());
            }
            if video && let Err(err) = limit_rate(&pipeline, STILL_QUEUE, evidence.fps) {
                return Outcome::Failed(err.to_string());
            }
            if video
                && source_kind_copies
                && let Err(err) = copy_if_h264(&pipeline, shared.clone())
            {
                return Outcome::Failed(err.to_string());
            }
        }
        let outcome = self.watch(&pipeline, &shared, video, audio);
        // Release a streaming thread that waits in `throttle`.
        shared.stopping.store(true, Ordering::SeqCst);
        // Nothing waits on this bus any more; Null stops the streaming threads.
        let _ = pipeline.set_state(gst::State::Null);
        outcome
    }

    fn watch(&self, pipeline: &gst::Pipeline, shared: &Shared, video: bool, audio: bool) -> Outcome {
        let Some(bus) = pipeline.bus() else { return Outcome::Failed("pipeline without a bus".into()) };
        if let Err(err) = pipeline.set_state(gst::State::Playing) {
            // The reason is on the bus ("Resource not found", ...).
            let reason = bus
                .timed_pop_filtered(gst::ClockTime::from_mseconds(500), &[gst::MessageType::Error])
                .and_then(|message| match message.view() {
                    gst::MessageView::Error(error) => Some(error_text(error)),
                    _ => None,
                })
                .unwrap_or_else(|| format!("cannot start: {err}"));
            return Outcome::Failed(reason);
        }
        let stall = self.source.restart.stall_timeout;
        let mut video_ended = !video;
        let mut audio_ended = !audio;
        let mut status = SourceStatus::Offline;
        loop {
            if self.control.stop.load(Ordering::SeqCst) {
                return Outcome::Stopped;
            }
            if self.control.inject_error.swap(false, Ordering::SeqCst) {
                let error = gst::message::Error::builder(gst::CoreError::Failed, "error injected on request")
                    .src(pipeline)
                    .build();
                let _ = bus.post(error);
            }
            if let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(50)) {
                match message.view() {
                    gst::MessageView::Error(error) => return Outcome::Failed(error_text(error)),
                    gst::MessageView::Warning(warning) => {
                        tracing::warn!(source = %self.source.name, warning = %warning.error(), debug = ?warning.debug(), "pipeline warning");
                    }
                    gst::MessageView::Eos(_) => {
                        if self.source.kind.is_live() {
                            return Outcome::Failed("end of stream on a live source".into());
                        }
                        return Outcome::Finished;
                    }
                    gst::MessageView::Application(app)
                        if app.structure().is_some_and(|s| s.name() == "mbt-edge-stream-ended") =>
                    {
                        let modality = app.structure().and_then(|s| s.get::<bool>("video").ok());
                        match modality {
                            Some(true) => video_ended = true,
                            Some(false) => audio_ended = true,
                            None => {}
                        }
                        if video_ended && audio_ended && !self.source.kind.is_live() {
                            return Outcome::Finished;
                        }
                    }
                    _ => {}
                }
            }
            // Stall detection, on the supervisor's own monotonic clock.
            let now_ms = shared.epoch.elapsed().as_millis() as u64;
            let stalled = |last: &AtomicU64, ended: bool| {
                let last = last.load(Ordering::Relaxed);
                !ended && now_ms.saturating_sub(last) > stall.as_millis() as u64
            };
            let video_stalled = video && stalled(&shared.last_video_ms, video_ended);
            let audio_stalled = audio && stalled(&shared.last_audio_ms, audio_ended);
            let flowing = (video && !video_stalled && !video_ended) || (audio && !audio_stalled && !audio_ended);
            if (video_stalled || audio_stalled) && !flowing {
                let which = match (video_stalled, audio_stalled) {
                    (true, true) => "video and audio",
                    (true, false) => "video",
                    _ => "audio",
                };
                return Outcome::Failed(format!("no {which} for {stall:?}"));
            }
            // A live stream that ended (a microphone or camera gone while the other goes on)
            // is lost like a stalled one once `stall_timeout` has passed without its data (a
            // pipeline whose streams end a moment apart is not "degraded" in between).
            let live = self.source.kind.is_live();
            let gone = |last: &AtomicU64, ended: bool| {
                live && ended && now_ms.saturating_sub(last.load(Ordering::Relaxed)) > stall.as_millis() as u64
            };
            let video_lost = video && (video_stalled || gone(&shared.last_video_ms, video_ended));
            let audio_lost = audio && (audio_stalled || gone(&shared.last_audio_ms, audio_ended));
            let new_status = if video_lost || audio_lost {
                SourceStatus::Degraded
            } else if shared.started.get().is_some() {
                SourceStatus::Online
            } else {
                status
            };
            if new_status != status {
                status = new_status;
                let detail = match (video_lost, video_stalled, audio_stalled) {
                    (true, true, _) => "video stalled",
                    (true, false, _) => "video ended",
                    (false, _, true) => "audio stalled",
                    _ if audio_lost => "audio ended",
                    _ => "playing",
                };
                self.status(status, detail);
            }
        }
    }
}

fn error_text(error: &gst::message::Error) -> String {
    let source = error.src().map(|src| src.path_string().to_string()).unwrap_or_default();
    match error.debug() {
        Some(debug) => format!("{} ({source}: {debug})", error.error()),
        None => format!("{} ({source})", error.error()),
    }
}

/// State the appsink callbacks of one incarnation share with the supervisor.
struct Shared {
    source_idx: usize,
    source_name: String,
    generation: u64,
    events: Sender<CaptureEvent>,
    lossless: bool,
    epoch: Instant,
    last_video_ms: AtomicU64,
    last_audio_ms: AtomicU64,
    /// Latest running time (ns) each stream has delivered; `u64::MAX` once it ended. Lossless
    /// sources keep the two within `LOSSLESS_LEAD` of each other (see `throttle`).
    video_position_ns: AtomicU64,
    audio_position_ns: AtomicU64,
    stopping: Arc<AtomicBool>,
    /// Set by the first buffer of either stream; sends `Started` exactly once, before any data.
    /// Holds the UTC time at running time zero.
    started: OnceLock<OffsetDateTime>,
    pipeline: gst::glib::WeakRef<gst::Pipeline>,
    /// Where the evidence branch's media go (and a copy of the audio); `None` without one.
    evidence: Option<Sender<EvidenceMedia>>,
    /// The source's name as every evidence message carries it (shared, not copied per buffer).
    evidence_source: Arc<str>,
    /// The audio appsink's rate.
    audio_rate: u32,
}

impl Shared {
    fn ensure_started(&self, running_time: RunningTime) -> OffsetDateTime {
        *self.started.get_or_init(|| {
            let utc_origin = OffsetDateTime::now_utc() - running_time.as_duration();
            let _ = self.events.send(CaptureEvent::Started {
                source_idx: self.source_idx,
                generation: self.generation,
                utc_origin,
            });
            utc_origin
        })
    }

    /// Hands evidence media on without waiting; a full store drops it (counted).
    fn send_evidence(&self, utc: OffsetDateTime, kind: EvidenceKind) {
        let Some(evidence) = &self.evidence else { return };
        let media = EvidenceMedia { source: self.evidence_source.clone(), utc, kind };
        if let Err(TrySendError::Full(_)) = evidence.try_send(media) {
            telemetry::evidence_media_dropped(&self.source_name);
        }
    }

    fn send(&self, event: CaptureEvent, modality: Modality) {
        if self.lossless {
            let _ = self.events.send(event);
            return;
        }
        match self.events.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => telemetry::capture_buffer_dropped(&self.source_name, modality),
            Err(TrySendError::Disconnected(_)) => {}
        }
    }

    fn touch(&self, modality: Modality) {
        let now = self.epoch.elapsed().as_millis() as u64;
        match modality {
            Modality::Video => self.last_video_ms.store(now, Ordering::Relaxed),
            Modality::Audio => self.last_audio_ms.store(now, Ordering::Relaxed),
        }
    }

    /// Lossless (file) sources: a stream that runs more than `LOSSLESS_LEAD` ahead of the
    /// other waits, so the window builder never has to buffer the difference. Decoders of one
    /// file feed both streams; waiting here is the backpressure a demuxer's queues expect.
    fn throttle(&self, modality: Modality, position: RunningTime) {
        let (own, other) = match modality {
            Modality::Video => (&self.video_position_ns, &self.audio_position_ns),
            Modality::Audio => (&self.audio_position_ns, &self.video_position_ns),
        };
        let position_ns = position.as_nanos() as u64;
        own.fetch_max(position_ns, Ordering::SeqCst);
        if !self.lossless {
            return;
        }
        let lead_ns = LOSSLESS_LEAD.as_nanos() as u64;
        let waited = Instant::now();
        while position_ns > other.load(Ordering::SeqCst).saturating_add(lead_ns)
            && !self.stopping.load(Ordering::SeqCst)
            && waited.elapsed() < LOSSLESS_MAX_WAIT
        {
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    fn stream_ended(&self, modality: Modality) {
        match modality {
            Modality::Video => self.video_position_ns.store(u64::MAX, Ordering::SeqCst),
            Modality::Audio => self.audio_position_ns.store(u64::MAX, Ordering::SeqCst),
        }
        let _ = self.events.send(CaptureEvent::StreamEnded {
            source_idx: self.source_idx,
            generation: self.generation,
            modality,
        });
        if let Some(pipeline) = self.pipeline.upgrade() {
            let structure =
                gst::Structure::builder("mbt-edge-stream-ended").field("video", modality == Modality::Video).build();
            let _ = pipeline.post_message(gst::message::Application::new(structure));
        }
    }
}

/// The appsink `name` of `pipeline`.
fn appsink(pipeline: &gst::Pipeline, name: &str) -> anyhow::Result<gst_app::AppSink> {
    pipeline
        .by_name(name)
        .ok_or_else(|| anyhow!("the pipeline has no element named {name:?}"))?
        .downcast::<gst_app::AppSink>()
        .map_err(|_| anyhow!("element {name:?} is not an appsink"))
}

/// A sample's buffer, its time segment, and the buffer's running time in that segment.
fn sample_timing(
    sample: &gst::Sample,
) -> anyhow::Result<(&gst::BufferRef, &gst::FormattedSegment<gst::ClockTime>, gst::ClockTime)> {
    let buffer = sample.buffer().ok_or_else(|| anyhow!("sample without a buffer"))?;
    let pts = buffer.pts().ok_or_else(|| anyhow!("buffer without a timestamp"))?;
    let segment = sample
        .segment()
        .and_then(|segment| segment.downcast_ref::<gst::ClockTime>())
        .ok_or_else(|| anyhow!("sample without a time segment"))?;
    let running = segment.to_running_time(pts).ok_or_else(|| anyhow!("timestamp outside the segment"))?;
    Ok((buffer, segment, running))
}

fn attach(pipeline: &gst::Pipeline, name: &str, modality: Modality, shared: Arc<Shared>) -> anyhow::Result<()> {
    let sink = appsink(pipeline, name)?;
    let eos_shared = shared.clone();
    let callbacks = gst_app::AppSinkCallbacks::builder()
        .new_sample(move |sink| {
            let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
            if let Err(err) = on_sample(sink, &sample, modality, &shared) {
                tracing::warn!(source = %shared.source_name, ?modality, error = %err, "dropping a buffer that cannot be read");
            }
            Ok(gst::FlowSuccess::Ok)
        })
        .eos(move |_| eos_shared.stream_ended(modality))
        .build();
    sink.set_callbacks(callbacks);
    Ok(())
}

/// Copies one sample into plain data and hands it off. Runs on a streaming thread: cheap.
fn on_sample(sink: &gst_app::AppSink, sample: &gst::Sample, modality: Modality, shared: &Shared) -> anyhow::Result<()> {
    let (buffer, _, running) = sample_timing(sample)?;
    let running = RunningTime::from_nanos(running.nseconds());
    let arrival = sink.current_running_time().map(|time| RunningTime::from_nanos(time.nseconds())).unwrap_or(running);
    let utc_origin = shared.ensure_started(arrival);
    shared.touch(modality);
    shared.throttle(modality, running);
    let event = match modality {
        Modality::Video => {
            let caps = sample.caps().ok_or_else(|| anyhow!("video sample without caps"))?;
            let info = gst_video::VideoInfo::from_caps(caps).context("reading video caps")?;
            let frame =
                gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, &info).context("mapping the frame")?;
            let (width, height) = (info.width(), info.height());
            let row_bytes = width as usize * 3;
            let stride = frame.plane_stride()[0] as usize;
            let data = frame.plane_data(0).context("reading the frame")?;
            let mut rgb = Vec::with_capacity(row_bytes * height as usize);
            for row in 0..height as usize {
                rgb.extend_from_slice(&data[row * stride..row * stride + row_bytes]);
            }
            let duration = buffer.duration().map(|duration| Duration::from_nanos(duration.nseconds()));
            CaptureEvent::Frame {
                source_idx: shared.source_idx,
                generation: shared.generation,
                frame: VideoFrame { pts: running, duration, width, height, rgb },
                arrival,
            }
        }
        Modality::Audio => {
            let map = buffer.map_readable().context("mapping audio")?;
            let samples: Vec<f32> = map
                .as_slice()
                .chunks_exact(4)
                .map(|bytes| f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
                .collect();
            if shared.evidence.is_some() {
                let kind = EvidenceKind::Audio { samples: samples.clone(), rate: shared.audio_rate };
                shared.send_evidence(utc_origin + running.as_duration(), kind);
            }
            CaptureEvent::Audio {
                source_idx: shared.source_idx,
                generation: shared.generation,
                chunk: AudioChunk { pts: running, samples },
                arrival,
            }
        }
    };
    shared.send(event, modality);
    Ok(())
}

/// Lets at most `fps` frames a second into the queue `name` (the stills', or the model's with
/// `max_fps`), by their timestamps: the rest are dropped before anything scales or encodes
/// them.
fn limit_rate(pipeline: &gst::Pipeline, name: &str, fps: u32) -> anyhow::Result<()> {
    let queue = pipeline.by_name(name).ok_or_else(|| anyhow!("the pipeline has no element {name:?}"))?;
    let pad = queue.static_pad("sink").ok_or_else(|| anyhow!("{name} has no sink pad"))?;
    let period = 1_000_000_000 / u64::from(fps.max(1));
    // The next timestamp (ns) a still may have; 0 lets the first one in.
    let next = AtomicU64::new(0);
    pad.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        let Some(pts) = info.buffer().and_then(|buffer| buffer.pts()) else { return gst::PadProbeReturn::Ok };
        let pts = pts.nseconds();
        let due = next.load(Ordering::Relaxed);
        // A timestamp far before the due one: a new segment (a restart of a file, a seek).
        if pts >= due || due - pts > 10 * period {
            // Keep the cadence: the next one is due a period after this one's slot.
            next.store(pts + period - (pts.saturating_sub(due) % period).min(period / 2), Ordering::Relaxed);
            gst::PadProbeReturn::Ok
        } else {
            // Consumed here with a success (gstreamer-rs: `Drop` of a borrowed buffer makes
            // GStreamer unref a null pointer).
            drop(info.take_buffer());
            info.flow_res = Ok(gst::FlowSuccess::Ok);
            gst::PadProbeReturn::Handled
        }
    });
    Ok(())
}

/// Links the copy branch (`h264_branch`) to the camera's RTP tee when the stream's caps say
/// H.264, from the caps event on, so it gets every buffer; another codec (H.265, MJPEG, VP8)
/// gets no branch, and clips are made from the stills.
fn copy_if_h264(pipeline: &gst::Pipeline, shared: Arc<Shared>) -> anyhow::Result<()> {
    let tee = pipeline.by_name(RTP_TEE).ok_or_else(|| anyhow!("the pipeline has no element {RTP_TEE:?}"))?;
    let pad = tee.static_pad("sink").ok_or_else(|| anyhow!("{RTP_TEE} has no sink pad"))?;
    let weak_pipeline = pipeline.downgrade();
    let weak_tee = tee.downgrade();
    let linked = AtomicBool::new(false);
    pad.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
        let Some(gst::PadProbeData::Event(event)) = &info.data else { return gst::PadProbeReturn::Ok };
        let gst::EventView::Caps(caps) = event.view() else { return gst::PadProbeReturn::Ok };
        let h264 = caps
            .caps()
            .structure(0)
            .and_then(|structure| structure.get::<&str>("encoding-name").ok())
            .is_some_and(|name| name.eq_ignore_ascii_case("H264"));
        if !h264 {
            tracing::info!(source = %shared.source_name, caps = %caps.caps(), "the camera's video is not H.264: clips are made from stills");
            return gst::PadProbeReturn::Ok;
        }
        if linked.swap(true, Ordering::SeqCst) {
            return gst::PadProbeReturn::Ok;
        }
        let (Some(pipeline), Some(tee)) = (weak_pipeline.upgrade(), weak_tee.upgrade()) else {
            return gst::PadProbeReturn::Ok;
        };
        let result = (|| -> anyhow::Result<()> {
            let branch = gst::parse::bin_from_description(&h264_branch(), true).context("building the H.264 branch")?;
            pipeline.add(&branch).context("adding the H.264 branch")?;
            attach_evidence(&pipeline, H264_SINK, shared.clone())?;
            let sink = branch.static_pad("sink").ok_or_else(|| anyhow!("the H.264 branch has no sink pad"))?;
            let source = tee.request_pad_simple("src_%u").ok_or_else(|| anyhow!("no pad from {RTP_TEE}"))?;
            branch.sync_state_with_parent().context("starting the H.264 branch")?;
            source.link(&sink).map_err(|err| anyhow!("linking the H.264 branch: {err:?}"))?;
            Ok(())
        })();
        if let Err(err) = result {
            tracing::warn!(source = %shared.source_name, error = %err, "clips are made from stills");
        }
        gst::PadProbeReturn::Ok
    });
    Ok(())
}

/// The evidence branch's appsinks: copy the encoded bytes, stamp them in UTC, hand them on.
fn attach_evidence(pipeline: &gst::Pipeline, name: &'static str, shared: Arc<Shared>) -> anyhow::Result<()> {
    let sink = appsink(pipeline, name)?;
    let callbacks = gst_app::AppSinkCallbacks::builder()
        .new_sample(move |sink| {
            let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
            if let Err(err) = on_evidence(&sample, name, &shared) {
                tracing::debug!(source = %shared.source_name, error = %err, "dropping an evidence buffer");
            }
            Ok(gst::FlowSuccess::Ok)
        })
        .build();
    sink.set_callbacks(callbacks);
    Ok(())
}

fn on_evidence(sample: &gst::Sample, name: &str, shared: &Shared) -> anyhow::Result<()> {
    let (buffer, segment, running) = sample_timing(sample)?;
    // Until the model's streams have started the incarnation, there is no UTC origin yet.
    let Some(origin) = shared.started.get() else { return Ok(()) };
    let utc = *origin + Duration::from_nanos(running.nseconds());
    let data = buffer.map_readable().context("mapping evidence")?.as_slice().to_vec();
    let kind = if name == JPEG_SINK {
        EvidenceKind::Jpeg(Arc::new(data))
    } else {
        let dts_before_pts = buffer
            .dts()
            .and_then(|dts| segment.to_running_time(dts))
            .map(|dts| Duration::from_nanos(running.nseconds().saturating_sub(dts.nseconds())))
            .unwrap_or_default();
        EvidenceKind::H264 { data, keyframe: !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT), dts_before_pts }
    };
    shared.send_evidence(utc, kind);
    Ok(())
}

/// `base` scaled by a random factor in [0.75, 1.25) so that many boxes don't retry in step.
fn jittered(base: Duration) -> Duration {
    let factor: f64 = 0.75 + rand::random::<f64>() * 0.5;
    base.mul_f64(factor)
}
