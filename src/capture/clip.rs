//! Writing an evidence clip: the media the evidence store cut from its ring pushed through
//! `appsrc`s into a muxer and a file. Runs on the evidence store's clip thread, never on a
//! capture streaming thread.
//!
//! - Stills (raw sources): JPEG -> `jpegdec` -> VP8, audio -> Opus, in WebM.
//! - The camera's H.264 (RTSP with `copy`): kept as it is (`h264parse` only), audio -> Opus,
//!   in MP4 (`faststart`, so a browser plays it while it loads).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

/// The clip's video, with each frame's time from the clip's start.
pub enum ClipVideo {
    None,
    Jpeg {
        frames: Vec<(Duration, Arc<Vec<u8>>)>,
    },
    /// Access units from a keyframe on: (pts, dts, bytes).
    H264 {
        units: Vec<(Duration, Duration, Vec<u8>)>,
    },
}

/// Mono f32 audio from `offset` after the clip's start.
pub struct ClipAudio {
    pub offset: Duration,
    pub rate: u32,
    pub samples: Vec<f32>,
}

pub struct ClipMedia {
    pub video: ClipVideo,
    pub audio: Option<ClipAudio>,
    /// Where the clip's last frame ends (the last frame lasts until then).
    pub length: Duration,
}

impl ClipMedia {
    /// `webm` or `mp4`, by the video it holds.
    pub fn extension(&self) -> &'static str {
        match self.video {
            ClipVideo::H264 { .. } => "mp4",
            _ => "webm",
        }
    }
}

/// Longest a clip may take to write.
const WRITE_TIMEOUT: Duration = Duration::from_secs(60);

/// Writes `media` to `path` (the muxer by `media.extension()`), waiting for the muxer to
/// finish the file.
pub fn write_clip(media: ClipMedia, path: &Path) -> anyhow::Result<()> {
    super::init()?;
    let location = path.to_str().ok_or_else(|| anyhow!("{} is not UTF-8", path.display()))?;
    let (mux, video_branch) = match &media.video {
        ClipVideo::None => ("webmmux name=mux", None),
        ClipVideo::Jpeg { .. } => (
            "webmmux name=mux",
            Some(
                "appsrc name=v format=time caps=image/jpeg ! jpegdec ! videoconvert ! \
                 vp8enc deadline=1 cpu-used=8 threads=1 target-bitrate=1000000 keyframe-max-dist=30 ! \
                 queue ! mux.",
            ),
        ),
        ClipVideo::H264 { .. } => (
            "mp4mux name=mux faststart=true",
            Some(
                "appsrc name=v format=time caps=video/x-h264,stream-format=byte-stream,alignment=au ! h264parse ! queue ! mux.",
            ),
        ),
    };
    let mut description = format!("{mux} ! filesink location=\"{}\"", location.replace('"', "\\\""));
    if let Some(branch) = video_branch {
        description.push_str("  ");
        description.push_str(branch);
    }
    if let Some(audio) = &media.audio {
        description.push_str(&format!(
            "  appsrc name=a format=time caps=audio/x-raw,format=F32LE,layout=interleaved,channels=1,rate={} ! \
             audioconvert ! audioresample ! audio/x-raw,rate=48000 ! opusenc bitrate=48000 ! queue ! mux.",
            audio.rate
        ));
    }
    let pipeline = gst::parse::launch(&description)
        .context("building the clip pipeline")?
        .downcast::<gst::Pipeline>()
        .map_err(|_| anyhow!("the clip description is not a pipeline"))?;
    let result = run(&pipeline, media);
    let _ = pipeline.set_state(gst::State::Null);
    result
}

fn appsrc(pipeline: &gst::Pipeline, name: &str) -> anyhow::Result<gst_app::AppSrc> {
    pipeline
        .by_name(name)
        .and_then(|element| element.downcast::<gst_app::AppSrc>().ok())
        .ok_or_else(|| anyhow!("the clip pipeline has no appsrc {name:?}"))
}

fn run(pipeline: &gst::Pipeline, media: ClipMedia) -> anyhow::Result<()> {
    pipeline.set_state(gst::State::Playing).context("starting the clip pipeline")?;
    let ns = |duration: Duration| gst::ClockTime::from_nseconds(duration.as_nanos() as u64);
    match media.video {
        ClipVideo::None => {}
        ClipVideo::Jpeg { frames } => {
            let source = appsrc(pipeline, "v")?;
            for (idx, (at, jpeg)) in frames.iter().enumerate() {
                let until = frames.get(idx + 1).map_or(media.length, |next| next.0);
                let mut buffer = gst::Buffer::from_slice(jpeg.as_ref().clone());
                let buffer_ref = buffer.get_mut().expect("a new buffer is writable");
                buffer_ref.set_pts(ns(*at));
                buffer_ref.set_duration(ns(until.saturating_sub(*at)));
                source.push_buffer(buffer).map_err(|err| anyhow!("pushing a frame: {err:?}"))?;
            }
            source.end_of_stream().map_err(|err| anyhow!("ending the video: {err:?}"))?;
        }
        ClipVideo::H264 { units } => {
            let source = appsrc(pipeline, "v")?;
            for (idx, (pts, dts, data)) in units.into_iter().enumerate() {
                let mut buffer = gst::Buffer::from_mut_slice(data);
                let buffer_ref = buffer.get_mut().expect("a new buffer is writable");
                buffer_ref.set_pts(ns(pts));
                buffer_ref.set_dts(ns(dts));
                if idx > 0 {
                    // h264parse marks keyframes itself; the first unit is one by construction.
                    buffer_ref.set_flags(gst::BufferFlags::empty());
                }
                source.push_buffer(buffer).map_err(|err| anyhow!("pushing an access unit: {err:?}"))?;
            }
            source.end_of_stream().map_err(|err| anyhow!("ending the video: {err:?}"))?;
        }
    }
    if let Some(audio) = media.audio {
        let source = appsrc(pipeline, "a")?;
        // 100 ms buffers, timestamped by sample count from the audio's offset.
        let per_buffer = (audio.rate as usize / 10).max(1);
        for (idx, chunk) in audio.samples.chunks(per_buffer).enumerate() {
            let start = audio.offset + Duration::from_secs_f64((idx * per_buffer) as f64 / audio.rate as f64);
            let bytes: Vec<u8> = chunk.iter().flat_map(|sample| sample.to_le_bytes()).collect();
            let mut buffer = gst::Buffer::from_mut_slice(bytes);
            let buffer_ref = buffer.get_mut().expect("a new buffer is writable");
            buffer_ref.set_pts(ns(start));
            buffer_ref.set_duration(ns(Duration::from_secs_f64(chunk.len() as f64 / audio.rate as f64)));
            source.push_buffer(buffer).map_err(|err| anyhow!("pushing audio: {err:?}"))?;
        }
        source.end_of_stream().map_err(|err| anyhow!("ending the audio: {err:?}"))?;
    }
    let bus = pipeline.bus().ok_or_else(|| anyhow!("clip pipeline without a bus"))?;
    let deadline = Instant::now() + WRITE_TIMEOUT;
    while Instant::now() < deadline {
        let Some(message) = bus.timed_pop(gst::ClockTime::from_mseconds(100)) else { continue };
        match message.view() {
            gst::MessageView::Eos(_) => return Ok(()),
            gst::MessageView::Error(error) => bail!("{} ({:?})", error.error(), error.debug()),
            _ => {}
        }
    }
    bail!("the clip was not finished within {WRITE_TIMEOUT:?}")
}
