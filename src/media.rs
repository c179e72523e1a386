//! Plain media data passed between stages: pipeline timestamps, video frames and audio
//! chunks. No GStreamer types here, so `window`, `features` and tests can use them freely.

use std::time::Duration;

/// Running time of a capture pipeline: time since it went to PLAYING, on the pipeline's clock.
/// Both appsinks of one pipeline stamp buffers in this time base; it restarts at zero when a
/// source is rebuilt.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RunningTime(pub Duration);

impl RunningTime {
    pub const ZERO: RunningTime = RunningTime(Duration::ZERO);

    pub fn from_nanos(nanos: u64) -> Self {
        RunningTime(Duration::from_nanos(nanos))
    }

    pub fn from_secs_f64(seconds: f64) -> Self {
        RunningTime(Duration::from_secs_f64(seconds.max(0.0)))
    }

    pub fn as_duration(self) -> Duration {
        self.0
    }

    pub fn as_nanos(self) -> u128 {
        self.0.as_nanos()
    }

    pub fn saturating_sub(self, duration: Duration) -> RunningTime {
        RunningTime(self.0.saturating_sub(duration))
    }

    /// Signed difference `self - other`.
    pub fn signed_diff(self, other: RunningTime) -> time::Duration {
        let a = self.0.as_nanos() as i128;
        let b = other.0.as_nanos() as i128;
        time::Duration::nanoseconds_i128(a - b)
    }
}

impl std::ops::Add<Duration> for RunningTime {
    type Output = RunningTime;
    fn add(self, rhs: Duration) -> RunningTime {
        RunningTime(self.0 + rhs)
    }
}

/// One RGB frame, 8 bits per channel, rows packed without padding, at the model's frame size.
#[derive(Debug, Clone, PartialEq)]
pub struct VideoFrame {
    pub pts: RunningTime,
    /// Buffer duration when the source states it.
    pub duration: Option<Duration>,
    pub width: u32,
    pub height: u32,
    /// `height * width * 3` bytes, row-major RGB.
    pub rgb: Vec<u8>,
}

impl VideoFrame {
    /// A frame of one colour, for tests and gap fill.
    pub fn solid(pts: RunningTime, width: u32, height: u32, rgb: [u8; 3]) -> Self {
        let pixels = (width * height) as usize;
        let mut data = Vec::with_capacity(pixels * 3);
        for _ in 0..pixels {
            data.extend_from_slice(&rgb);
        }
        VideoFrame { pts, duration: None, width, height, rgb: data }
    }

    pub fn end(&self) -> RunningTime {
        self.pts + self.duration.unwrap_or(Duration::ZERO)
    }
}

/// Mono f32 samples at the model's sample rate, starting at `pts`.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioChunk {
    pub pts: RunningTime,
    pub samples: Vec<f32>,
}

/// Which stream of a source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Modality {
    Video,
    Audio,
}

/// What a source's evidence branch hands to the evidence store: a JPEG still, an access unit
/// of the camera's own H.264, or a copy of the audio the model hears. Stamped in UTC (the
/// pipeline's running time plus the incarnation's UTC origin), so the store can cut any
/// span without knowing incarnations.
#[derive(Debug, Clone)]
pub struct EvidenceMedia {
    pub source: std::sync::Arc<str>,
    pub utc: time::OffsetDateTime,
    pub kind: EvidenceKind,
}

#[derive(Debug, Clone)]
pub enum EvidenceKind {
    /// A JPEG at the source's `snapshot_width`.
    Jpeg(std::sync::Arc<Vec<u8>>),
    /// One H.264 access unit, byte-stream with the parameter sets before every keyframe.
    /// `dts_before_pts` is how far its decode time lies before `utc` (B-frames).
    H264 { data: Vec<u8>, keyframe: bool, dts_before_pts: Duration },
    /// Mono f32 samples at `rate`.
    Audio { samples: Vec<f32>, rate: u32 },
}
