//! `RawConfig`: a serde mirror of config.toml. The doc comments are the user documentation of
//! each key; `default_*` functions give the defaults. Nothing here is validated: see
//! `validate.rs`.

use serde::Deserialize;

pub use super::events::RawEvents;
pub use super::evidence::{RawEvidence, RawSourceEvidence};
pub use super::mqtt::{RawMqtt, RawSpool};
pub use super::units::RawDuration;
use toml::Spanned;

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub device: RawDevice,
    pub model: Spanned<RawModel>,
    #[serde(default)]
    pub window: RawWindow,
    /// `[[source]]` tables, one per camera/microphone pair.
    #[serde(default, rename = "source")]
    pub sources: Vec<Spanned<RawSource>>,
    #[serde(default)]
    pub log: RawLog,
    /// Event engine thresholds (`[events]`, `[events.labels."<label>"]`).
    #[serde(default)]
    pub events: RawEvents,
    /// MQTT broker and topics.
    #[serde(default)]
    pub mqtt: RawMqtt,
    /// The on-disk event spool.
    #[serde(default)]
    pub spool: RawSpool,
    /// The health and metrics HTTP endpoint.
    #[serde(default)]
    pub metrics: RawMetrics,
    /// Snapshots and clips kept with events.
    #[serde(default)]
    pub evidence: RawEvidence,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMetrics {
    /// Serve the page, the JSON API, `GET /metrics` (Prometheus text) and `GET /health`.
    /// Default true.
    pub enabled: Option<Spanned<bool>>,
    /// Address and port to listen on. Default `127.0.0.1:9464` (loopback only).
    pub listen: Option<Spanned<String>>,
    /// A file holding the token every client but `/health` must send; required when
    /// `listen` is not a loopback address. Relative to this file's folder.
    pub token_file: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDevice {
    /// Device id used in MQTT topics; default: the hostname.
    pub id: Option<Spanned<String>>,
    /// Where the daemon keeps its own state (`controls.json`: labels switched off and
    /// thresholds set from Home Assistant or MQTT). Default: the folder above `[spool] dir`
    /// (`/var/lib/mbt-edge`, the unit's StateDirectory). Relative to this file's folder.
    pub state_dir: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawModel {
    /// Path of the ONNX model, relative to the config file's folder when not absolute.
    /// Labels and preprocessing come from the model's metadata.
    pub path: Spanned<String>,
    /// `auto` (CUDA when built with it and a driver is present, else CPU), `cpu` or `cuda`.
    #[serde(default = "default_runtime")]
    pub runtime: Spanned<String>,
    /// Inference threads (tract's multithreaded matrix products). Default 2.
    #[serde(default = "default_threads")]
    pub threads: Spanned<i64>,
    /// Most windows run as one batch when several sources are ready together. Default 4.
    #[serde(default = "default_max_batch")]
    pub max_batch: Spanned<i64>,
}

fn default_runtime() -> Spanned<String> {
    Spanned::new(0..0, "auto".to_string())
}
fn default_threads() -> Spanned<i64> {
    Spanned::new(0..0, 2)
}
fn default_max_batch() -> Spanned<i64> {
    Spanned::new(0..0, 4)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWindow {
    /// Window length; default: the model's window.
    pub seconds: Option<Spanned<RawDuration>>,
    /// A window is classified every `hop`. Default 1 s.
    pub hop: Option<Spanned<RawDuration>>,
    /// How far one modality may run ahead of the other before old data is dropped. Default 30 s.
    pub max_lead: Option<Spanned<RawDuration>>,
    /// How long to wait for a lagging modality of a live source before the window goes out
    /// with the gap filled. Default 2 s.
    pub max_wait: Option<Spanned<RawDuration>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    /// Log filter, `RUST_LOG` syntax (e.g. `info`, `mbt_edge=debug`). `--log-level` wins.
    pub level: Option<Spanned<String>>,
}

/// One `[[source]]`. Which keys are allowed depends on `kind`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSource {
    /// Unique name; used in MQTT topics.
    pub name: Option<Spanned<String>>,
    /// `v4l2`, `alsa`, `pulse`, `rtsp`, `uri`, `test` or `pipeline`.
    pub kind: Option<Spanned<String>>,
    /// Capture video (default true when the model has a video input).
    pub video: Option<Spanned<bool>>,
    /// Capture audio (default true when the model has an audio input).
    pub audio: Option<Spanned<bool>>,
    /// Cap on the captured frame rate.
    pub max_fps: Option<Spanned<i64>>,
    /// No buffer for this long counts as a failure and restarts the source. Default 5 s.
    pub stall_timeout: Option<Spanned<RawDuration>>,
    /// First wait before a restart; doubled (with jitter) on each failure. Default 1 s.
    pub backoff_initial: Option<Spanned<RawDuration>>,
    /// Longest wait between restarts. Default 60 s.
    pub backoff_max: Option<Spanned<RawDuration>>,
    /// `[source.evidence]`: this source's snapshots and clips, over `[evidence]`.
    pub evidence: Option<Spanned<RawSourceEvidence>>,

    // v4l2
    /// v4l2: camera device, e.g. `/dev/video0`.
    pub video_device: Option<Spanned<String>>,
    /// v4l2: caps to ask the camera for, e.g. `image/jpeg,width=1280,height=720`.
    pub video_caps: Option<Spanned<String>>,
    /// v4l2 and alsa: ALSA device of the microphone, e.g. `hw:1,0`; pulse: source name.
    pub audio_device: Option<Spanned<String>>,

    // rtsp
    /// rtsp: `rtsp://user:pass@host/path`.
    pub url: Option<Spanned<String>>,
    /// rtsp: jitter buffer latency. Default 200 ms.
    pub latency: Option<Spanned<RawDuration>>,
    /// rtsp: `tcp`, `udp` or `udp-mcast` (rtspsrc's protocols).
    pub protocols: Option<Spanned<String>>,

    // uri
    /// uri: anything uridecodebin reads: `file:///...`, `http://...`. A plain path is taken as a file.
    pub uri: Option<Spanned<String>>,

    // test
    /// test: videotestsrc pattern (`smpte`, `ball`, `snow`, `red`, ...). Default `smpte`.
    pub pattern: Option<Spanned<String>>,
    /// test: audiotestsrc wave (`sine`, `square`, `white-noise`, ...). Default `sine`.
    pub wave: Option<Spanned<String>>,
    /// test: tone frequency in Hz. Default 440.
    pub freq: Option<Spanned<f64>>,
    /// test: volume 0..=1. Default 0.8.
    pub volume: Option<Spanned<f64>>,
    /// test: run in real time (default true); false runs as fast as possible.
    pub is_live: Option<Spanned<bool>>,
    /// test: native width of the generated video. Default 640.
    pub width: Option<Spanned<i64>>,
    /// test: native height. Default 480.
    pub height: Option<Spanned<i64>>,
    /// test: native frame rate. Default 30.
    pub fps: Option<Spanned<i64>>,
    /// test: native audio sample rate. Default 48000.
    pub sample_rate: Option<Spanned<i64>>,
    /// test: extra videotestsrc properties, e.g. `"foreground-color=0xff00ff00 motion=sweep"`.
    pub video_extra: Option<Spanned<String>>,
    /// test: extra audiotestsrc properties.
    pub audio_extra: Option<Spanned<String>>,
    /// test: end after this long (EOS). Default: never.
    pub duration: Option<Spanned<RawDuration>>,

    // pipeline
    /// pipeline: a gst-launch description of the video branch; the daemon appends the
    /// conversion to the model's frame format. E.g. `nvv4l2camerasrc ! nvvidconv`.
    pub video_pipeline: Option<Spanned<String>>,
    /// pipeline: a gst-launch description of the audio branch, e.g. `alsasrc device=hw:1`.
    pub audio_pipeline: Option<Spanned<String>>,
    /// pipeline: the pipeline is live (a device; restarted when it ends). Default true; set
    /// false for finite generated or file-based pipelines, which then end at their EOS.
    pub live: Option<Spanned<bool>>,
}

impl RawSource {
    /// Names and spans of the keys that are set, for the per-kind allow lists.
    pub fn set_keys(&self) -> Vec<(&'static str, std::ops::Range<usize>)> {
        let mut keys = Vec::new();
        macro_rules! collect {
            ($($field:ident),*) => {
                $( if let Some(value) = &self.$field { keys.push((stringify!($field), value.span())); } )*
            };
        }
        collect!(
            video_device,
            video_caps,
            audio_device,
            url,
            latency,
            protocols,
            uri,
            pattern,
            wave,
            freq,
            volume,
            is_live,
            width,
            height,
            fps,
            sample_rate,
            video_extra,
            audio_extra,
            duration,
            video_pipeline,
            audio_pipeline,
            live
        );
        keys
    }
}
