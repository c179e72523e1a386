//! `[evidence]` and each source's `[source.evidence]`: the snapshots and clips kept with events.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

use super::FieldError;
use super::units::{RawBytes, RawDuration, duration_in, parse_bytes};

/// `[evidence]`: a JPEG snapshot at each event's start and an audio-visual clip at its end.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEvidence {
    /// Keep snapshots and clips. Default true.
    pub enabled: Option<Spanned<bool>>,
    /// Where they are kept, one folder per source. Default: `evidence` in `[device] state_dir`
    /// (`/var/lib/mbt-edge/evidence`). Relative to this file's folder.
    pub dir: Option<Spanned<String>>,
    /// A clip starts this long before the event's start. Default 5 s.
    pub pre_roll: Option<Spanned<RawDuration>>,
    /// A clip ends this long after the event's end. Default 5 s.
    pub post_roll: Option<Spanned<RawDuration>>,
    /// Most width of snapshots and of the clips of raw sources, in pixels: larger frames are
    /// scaled down to it (the height keeps the aspect ratio), smaller ones keep their size.
    /// Default 640.
    pub snapshot_width: Option<Spanned<i64>>,
    /// Frames per second kept for snapshots and for the clips of raw sources. Default 5.
    pub fps: Option<Spanned<i64>>,
    /// Most bytes all evidence may take; the oldest files are deleted beyond it. Default "1GiB".
    pub max_bytes: Option<Spanned<RawBytes>>,
    /// Evidence older than this is deleted. Default "7d".
    pub max_age: Option<Spanned<RawDuration>>,
    /// Longest clip; a longer event's clip keeps its last `max_clip`. Default "2m".
    pub max_clip: Option<Spanned<RawDuration>>,
}

/// `[source.evidence]`: the same keys for one source, over `[evidence]`'s.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSourceEvidence {
    /// Keep evidence for this source. Default true; `[evidence] enabled = false` wins.
    pub enabled: Option<Spanned<bool>>,
    pub pre_roll: Option<Spanned<RawDuration>>,
    pub post_roll: Option<Spanned<RawDuration>>,
    pub snapshot_width: Option<Spanned<i64>>,
    pub fps: Option<Spanned<i64>>,
    /// rtsp: keep the camera's own H.264 for clips, without decoding or encoding it again
    /// (MP4). Default true; a camera that sends another codec (H.265, MJPEG, VP8) gets clips
    /// encoded from the stills (WebM) either way, and false asks for that for H.264 too.
    pub copy: Option<Spanned<bool>>,
}

/// The typed `[evidence]`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvidenceSettings {
    pub enabled: bool,
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub max_age: Duration,
    pub max_clip: Duration,
    /// What a source without `[source.evidence]` gets.
    pub default: SourceEvidence,
}

/// One source's evidence settings, `[evidence]` and `[source.evidence]` merged.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SourceEvidence {
    pub enabled: bool,
    pub pre_roll: Duration,
    pub post_roll: Duration,
    pub snapshot_width: u32,
    pub fps: u32,
    /// rtsp only: keep the camera's H.264.
    pub copy: bool,
}

impl Default for SourceEvidence {
    fn default() -> Self {
        SourceEvidence {
            enabled: true,
            pre_roll: Duration::from_secs(5),
            post_roll: Duration::from_secs(5),
            snapshot_width: 640,
            fps: 5,
            copy: true,
        }
    }
}

const MAX_ROLL: Duration = Duration::from_secs(60);

fn width(key: &str, value: &Spanned<i64>) -> Result<u32, FieldError> {
    let width = *value.get_ref();
    // Up to 1920: a snapshot must stay well inside an MQTT packet (the publisher's limit is 1 MiB).
    if !(16..=1920).contains(&width) || width % 2 != 0 {
        return Err(FieldError::new(key, Some(value.span()), format!("{width} is not an even width from 16 to 1920")));
    }
    Ok(width as u32)
}

fn fps(key: &str, value: &Spanned<i64>) -> Result<u32, FieldError> {
    let fps = *value.get_ref();
    if !(1..=30).contains(&fps) {
        return Err(FieldError::new(key, Some(value.span()), format!("{fps} is out of range; allowed: 1 to 30")));
    }
    Ok(fps as u32)
}

fn roll(key: &str, value: Option<&Spanned<RawDuration>>) -> Result<Option<Duration>, FieldError> {
    duration_in(key, value, Duration::ZERO, MAX_ROLL)
}

impl RawEvidence {
    /// `state_dir` is where `dir` defaults to (its `evidence` folder); `config_dir` anchors a
    /// relative `dir`.
    /// What a source without `[source.evidence]` gets.
    pub fn source_default(&self) -> Result<SourceEvidence, FieldError> {
        let base = SourceEvidence::default();
        Ok(SourceEvidence {
            enabled: self.enabled.as_ref().is_none_or(|enabled| *enabled.get_ref()),
            pre_roll: roll("evidence.pre_roll", self.pre_roll.as_ref())?.unwrap_or(base.pre_roll),
            post_roll: roll("evidence.post_roll", self.post_roll.as_ref())?.unwrap_or(base.post_roll),
            snapshot_width: self
                .snapshot_width
                .as_ref()
                .map(|value| width("evidence.snapshot_width", value))
                .transpose()?
                .unwrap_or(base.snapshot_width),
            fps: self.fps.as_ref().map(|value| fps("evidence.fps", value)).transpose()?.unwrap_or(base.fps),
            copy: true,
        })
    }

    pub fn validate(&self, config_dir: &Path, state_dir: &Path) -> Result<EvidenceSettings, FieldError> {
        let default = self.source_default()?;
        let dir = match &self.dir {
            Some(dir) if dir.get_ref().trim().is_empty() => {
                return Err(FieldError::new("evidence.dir", Some(dir.span()), "must not be empty"));
            }
            Some(dir) => config_dir.join(dir.get_ref()),
            None => state_dir.join("evidence"),
        };
        let max_bytes = match &self.max_bytes {
            Some(raw) => {
                let bytes = parse_bytes(raw.get_ref())
                    .map_err(|message| FieldError::new("evidence.max_bytes", Some(raw.span()), message))?;
                if bytes < 1 << 20 {
                    return Err(FieldError::new("evidence.max_bytes", Some(raw.span()), "must be at least 1MiB"));
                }
                bytes
            }
            None => 1 << 30,
        };
        let max_age = duration_in("evidence.max_age", self.max_age.as_ref(), Duration::from_secs(60), Duration::MAX)?
            .unwrap_or(Duration::from_secs(7 * 86400));
        let max_clip =
            duration_in("evidence.max_clip", self.max_clip.as_ref(), Duration::from_secs(1), Duration::from_secs(600))?
                .unwrap_or(Duration::from_secs(120));
        Ok(EvidenceSettings { enabled: default.enabled, dir, max_bytes, max_age, max_clip, default })
    }
}

impl RawSourceEvidence {
    /// This source's settings over `default`; `prefix` is the source's key (`source[2]`).
    pub fn merge(&self, prefix: &str, default: SourceEvidence) -> Result<SourceEvidence, FieldError> {
        let key = |name: &str| format!("{prefix}.evidence.{name}");
        Ok(SourceEvidence {
            // `[evidence] enabled = false` turns evidence off everywhere.
            enabled: default.enabled && self.enabled.as_ref().is_none_or(|enabled| *enabled.get_ref()),
            pre_roll: roll(&key("pre_roll"), self.pre_roll.as_ref())?.unwrap_or(default.pre_roll),
            post_roll: roll(&key("post_roll"), self.post_roll.as_ref())?.unwrap_or(default.post_roll),
            snapshot_width: self
                .snapshot_width
                .as_ref()
                .map(|value| width(&key("snapshot_width"), value))
                .transpose()?
                .unwrap_or(default.snapshot_width),
            fps: self.fps.as_ref().map(|value| fps(&key("fps"), value)).transpose()?.unwrap_or(default.fps),
            copy: self.copy.as_ref().map_or(default.copy, |copy| *copy.get_ref()),
        })
    }
}
