//! gst-launch descriptions of each source kind, ending in the two named appsinks with the
//! model's formats: RGB at the model's frame size, mono F32 at the model's sample rate. Pure
//! string building, unit-tested without GStreamer.

use crate::config::{SourceKind, SourceSettings, TestSource};

/// What the model wants out of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CaptureFormat {
    /// Frame width and height; `None` when the model or the source has no video.
    pub video: Option<(u32, u32)>,
    /// Sample rate; `None` when there is no audio.
    pub audio: Option<u32>,
}

/// The evidence branch of a source: JPEG stills (and, for RTSP with `copy`, the camera's
/// H.264) for snapshots and clips. `None` when the source keeps no evidence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EvidenceFormat {
    pub width: u32,
    pub fps: u32,
    /// rtsp: keep the camera's H.264 access units (no decode, no encode).
    pub copy: bool,
}

/// How the appsinks behave.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SinkMode {
    /// Play non-live media in real time (the daemon) or as fast as possible (classify/record).
    pub sync: bool,
}

/// The appsink element names.
pub const VIDEO_SINK: &str = "video";
pub const AUDIO_SINK: &str = "audio";
/// The evidence branch's appsinks: JPEG stills and the camera's H.264.
pub const JPEG_SINK: &str = "evidence_jpeg";
pub const H264_SINK: &str = "evidence_h264";
/// The queue in front of the H.264 depayloader: an error from it (a camera that sends
/// another codec) names it.
pub const H264_QUEUE: &str = "evidence_rtp";
/// The tee of an RTSP camera's video RTP, where `h264_branch()` is linked.
pub const RTP_TEE: &str = "evidence_rtp_tee";

/// The camera's H.264 kept as it comes: depayloaded and parsed only, never decoded.
pub fn h264_branch() -> String {
    format!(
        "queue name={H264_QUEUE} max-size-buffers=0 max-size-bytes=0 max-size-time=2000000000 leaky=downstream ! \
         rtph264depay ! h264parse config-interval=-1 ! video/x-h264,stream-format=byte-stream,alignment=au ! \
         appsink name={H264_SINK} sync=false max-buffers=64 drop=true enable-last-sample=false"
    )
}
/// The queue in front of the stills' scaling and encoding, where their rate is limited.
pub const STILL_QUEUE: &str = "evidence_stills";
/// The queue in front of the model's video scaling, where `max_fps` limits the rate.
pub const VIDEO_QUEUE: &str = "model_video";

/// The full pipeline description for `source`.
pub fn describe(
    source: &SourceSettings,
    format: CaptureFormat,
    mode: SinkMode,
    evidence: Option<EvidenceFormat>,
) -> String {
    let video = if source.video { format.video } else { None };
    let audio = if source.audio { format.audio } else { None };
    // With evidence, decoded video goes through a tee: one side to the model's frame size,
    // the other to JPEG stills at a size people can see, a few a second, never blocking the
    // model's side (a leaky queue of its own).
    let video_tail = video.map(|(width, height)| {
        let tail = video_tail(width, height, mode);
        match evidence {
            Some(evidence) => format!("tee name=evt  evt. ! {tail}  evt. ! {}", jpeg_tail(evidence)),
            None => tail,
        }
    });
    let audio_tail = audio.map(|rate| audio_tail(rate, mode));
    let mut branches: Vec<String> = Vec::new();
    match &source.kind {
        SourceKind::Test(test) => {
            if let Some(tail) = &video_tail {
                branches.push(format!("{} ! {tail}", test_video(test)));
            }
            if let Some(tail) = &audio_tail {
                branches.push(format!("{} ! {tail}", test_audio(test)));
            }
        }
        SourceKind::V4l2 { video_device, video_caps, audio_device } => {
            if let Some(tail) = &video_tail {
                let caps = video_caps.as_deref().map(|caps| format!(" ! {caps}")).unwrap_or_default();
                branches.push(format!("v4l2src device={}{caps} ! decodebin ! {tail}", quote(video_device)));
            }
            if let (Some(tail), Some(device)) = (&audio_tail, audio_device) {
                branches.push(format!("alsasrc device={} ! {tail}", quote(device)));
            }
        }
        SourceKind::Alsa { audio_device } => {
            if let Some(tail) = &audio_tail {
                branches.push(format!("alsasrc device={} ! {tail}", quote(audio_device)));
            }
        }
        SourceKind::Pulse { audio_device } => {
            if let Some(tail) = &audio_tail {
                let device =
                    audio_device.as_deref().map(|device| format!(" device={}", quote(device))).unwrap_or_default();
                branches.push(format!("pulsesrc{device} ! {tail}"));
            }
        }
        SourceKind::Rtsp { url, latency, protocols } => {
            let protocols = protocols.as_deref().map(|protocols| format!(" protocols={protocols}")).unwrap_or_default();
            branches.push(format!(
                "rtspsrc name=src location={} latency={}{protocols}",
                quote(url),
                latency.as_millis()
            ));
            match (&video_tail, evidence) {
                (Some(tail), Some(evidence)) if evidence.copy => {
                    // The camera's RTP goes through a tee; `capture` links `h264_branch()` to
                    // it once the stream's caps say H.264 (a branch that takes H.264 only,
                    // linked from the start, would refuse any other camera's stream).
                    branches.push(format!(
                        "src. ! application/x-rtp,media=video ! tee name={RTP_TEE} allow-not-linked=true  \
                         {RTP_TEE}. ! queue ! decodebin ! {tail}"
                    ));
                }
                (Some(tail), _) => {
                    branches.push(format!("src. ! application/x-rtp,media=video ! decodebin ! {tail}"));
                }
                (None, _) => {}
            }
            if let Some(tail) = &audio_tail {
                branches.push(format!("src. ! application/x-rtp,media=audio ! decodebin ! {tail}"));
            }
        }
        SourceKind::Uri { uri } => {
            branches.push(format!("uridecodebin name=src uri={}", quote(uri)));
            if let Some(tail) = &video_tail {
                branches.push(format!("src. ! video/x-raw ! {tail}"));
            }
            if let Some(tail) = &audio_tail {
                branches.push(format!("src. ! audio/x-raw ! {tail}"));
            }
        }
        SourceKind::Pipeline { video_pipeline, audio_pipeline, .. } => {
            if let (Some(tail), Some(head)) = (&video_tail, video_pipeline) {
                branches.push(format!("{head} ! {tail}"));
            }
            if let (Some(tail), Some(head)) = (&audio_tail, audio_pipeline) {
                branches.push(format!("{head} ! {tail}"));
            }
        }
    }
    branches.join("  ")
}

/// The model's frames. At most `max_fps` a second pass the queue: the same pad probe as the
/// stills' (`capture::limit_rate`), set where the pipeline is built, since `videorate max-rate`
/// aborts on a stream of variable frame rate (see [`jpeg_tail`]).
fn video_tail(width: u32, height: u32, mode: SinkMode) -> String {
    format!(
        "queue name={VIDEO_QUEUE} max-size-buffers=4 max-size-bytes=0 max-size-time=0 ! videoscale ! videoconvert ! \
         video/x-raw,format=RGB,width={width},height={height} ! \
         appsink name={VIDEO_SINK} sync={} max-buffers=4 drop=false enable-last-sample=false",
        mode.sync
    )
}

/// Stills at most `width` wide (a smaller camera keeps its size; the height keeps the aspect
/// ratio), JPEG-encoded by GStreamer. At most `fps` a second pass the queue: a pad probe
/// (`capture::limit_rate`) drops the others before they are scaled or encoded. Not
/// `videorate max-rate`: GStreamer 1.22's aborts the process on a stream of variable frame
/// rate (framerate 0/1, as RTSP VP8 cameras send).
fn jpeg_tail(evidence: EvidenceFormat) -> String {
    format!(
        "queue name={STILL_QUEUE} max-size-buffers=2 max-size-bytes=0 max-size-time=0 leaky=downstream ! \
         videoscale ! videoconvert ! \
         video/x-raw,format=I420,width=[16,{}],pixel-aspect-ratio=1/1 ! jpegenc quality=85 ! \
         appsink name={JPEG_SINK} sync=false max-buffers=4 drop=true enable-last-sample=false",
        evidence.width
    )
}

fn audio_tail(rate: u32, mode: SinkMode) -> String {
    format!(
        "queue max-size-buffers=0 max-size-bytes=0 max-size-time=1000000000 ! audioconvert ! audioresample ! \
         audio/x-raw,format=F32LE,layout=interleaved,channels=1,rate={rate} ! \
         appsink name={AUDIO_SINK} sync={} max-buffers=64 drop=false enable-last-sample=false",
        mode.sync
    )
}

fn test_video(test: &TestSource) -> String {
    let num_buffers = test
        .duration
        .map(|duration| format!(" num-buffers={}", (duration.as_secs_f64() * test.fps as f64).ceil() as u64))
        .unwrap_or_default();
    format!(
        "videotestsrc is-live={} pattern={}{num_buffers} {} ! video/x-raw,format=I420,width={},height={},framerate={}/1",
        test.is_live, test.pattern, test.video_extra, test.width, test.height, test.fps
    )
}

/// audiotestsrc makes 1024-sample buffers by default; the count below ends it after `duration`.
fn test_audio(test: &TestSource) -> String {
    const SAMPLES_PER_BUFFER: u64 = 1024;
    let num_buffers = test
        .duration
        .map(|duration| {
            let samples = (duration.as_secs_f64() * test.sample_rate as f64).ceil() as u64;
            format!(" num-buffers={}", samples.div_ceil(SAMPLES_PER_BUFFER))
        })
        .unwrap_or_default();
    format!(
        "audiotestsrc is-live={} wave={} freq={} volume={} samplesperbuffer={SAMPLES_PER_BUFFER}{num_buffers} {} ! \
         audio/x-raw,rate={},channels=1",
        test.is_live, test.wave, test.freq, test.volume, test.audio_extra, test.sample_rate
    )
}

/// Quotes a property value for gst-launch syntax.
fn quote(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::RestartSettings;

    fn source(kind: SourceKind) -> SourceSettings {
        SourceSettings {
            name: "s".into(),
            kind,
            video: true,
            audio: true,
            restart: RestartSettings {
                stall_timeout: Duration::from_secs(5),
                backoff_initial: Duration::from_secs(1),
                backoff_max: Duration::from_secs(60),
            },
            max_fps: None,
            evidence: crate::config::SourceEvidence::default(),
        }
    }

    fn check(kind: SourceKind, expected_parts: &[&str]) {
        let text = describe(
            &source(kind),
            CaptureFormat { video: Some((64, 48)), audio: Some(16_000) },
            SinkMode { sync: false },
            None,
        );
        for part in expected_parts {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
    }

    #[test]
    fn every_kind_ends_in_both_sinks_with_model_formats() {
        let tails =
            ["format=RGB,width=64,height=48", "appsink name=video", "channels=1,rate=16000", "appsink name=audio"];
        check(SourceKind::Uri { uri: "file:///x.webm".into() }, &tails);
        check(
            SourceKind::Rtsp {
                url: "rtsp://h/p".into(),
                latency: Duration::from_millis(200),
                protocols: Some("tcp".into()),
            },
            &tails,
        );
        check(
            SourceKind::V4l2 {
                video_device: "/dev/video0".into(),
                video_caps: None,
                audio_device: Some("hw:1".into()),
            },
            &tails,
        );
        check(
            SourceKind::Pipeline {
                video_pipeline: Some("videotestsrc".into()),
                audio_pipeline: Some("audiotestsrc".into()),
                live: true,
            },
            &tails,
        );
    }

    #[test]
    fn test_source_duration_sets_buffer_counts() {
        let test = TestSource {
            pattern: "ball".into(),
            wave: "sine".into(),
            freq: 440.0,
            volume: 0.5,
            is_live: false,
            width: 320,
            height: 240,
            fps: 25,
            sample_rate: 48_000,
            video_extra: String::new(),
            audio_extra: String::new(),
            duration: Some(Duration::from_secs(2)),
        };
        // 2 s at 25 fps = 50 frames; 96000 samples / 1024 = 94 buffers.
        check(SourceKind::Test(test), &["num-buffers=50", "num-buffers=94", "pattern=ball", "is-live=false"]);
    }

    fn rtsp() -> SourceKind {
        SourceKind::Rtsp { url: "rtsp://h/p".into(), latency: Duration::from_millis(200), protocols: None }
    }

    fn with_evidence(kind: SourceKind, copy: bool) -> String {
        describe(
            &source(kind),
            CaptureFormat { video: Some((64, 48)), audio: Some(16_000) },
            SinkMode { sync: false },
            Some(EvidenceFormat { width: 640, fps: 5, copy }),
        )
    }

    #[test]
    fn evidence_stills_are_jpeg_at_the_configured_width_beside_the_model_frames() {
        let text = with_evidence(SourceKind::Uri { uri: "file:///x.webm".into() }, true);
        for part in
            ["tee name=evt", "format=RGB,width=64,height=48", "width=[16,640],pixel-aspect-ratio=1/1", "jpegenc"]
        {
            assert!(text.contains(part), "{part:?} missing in {text}");
        }
        assert!(text.contains(&format!("queue name={STILL_QUEUE}")) && !text.contains("videorate"), "{text}");
        assert!(!text.contains(H264_SINK), "{text}");
    }

    #[test]
    fn rtsp_evidence_copies_the_cameras_h264_and_encodes_no_video() {
        let text = with_evidence(rtsp(), true);
        assert!(text.contains(&format!("tee name={RTP_TEE}")), "{text}");
        let branch = h264_branch();
        assert!(branch.contains("rtph264depay ! h264parse"), "{branch}");
        assert!(branch.contains(&format!("appsink name={H264_SINK}")), "{branch}");
        let text = format!("{text}  {branch}");
        for encoder in ["x264enc", "vp8enc", "openh264enc", "avenc_", "nvv4l2h264enc"] {
            assert!(!text.contains(encoder), "{encoder} in {text}");
        }
        // copy = false: stills only; the clip is made from them.
        let text = with_evidence(rtsp(), false);
        assert!(!text.contains(RTP_TEE) && text.contains(JPEG_SINK), "{text}");
    }

    #[test]
    fn quote_escapes() {
        assert_eq!(quote(r#"a"b\c"#), r#""a\"b\\c""#);
    }
}
