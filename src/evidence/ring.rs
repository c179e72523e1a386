//! One source's evidence ring: the last seconds of JPEG stills, H.264 access units and audio,
//! stamped in UTC, and the cutting of a clip's media out of it. Pure: no I/O, no clocks.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;

use time::OffsetDateTime;

use crate::capture::{ClipAudio, ClipMedia, ClipVideo};
use crate::media::EvidenceKind;

struct Unit {
    utc: OffsetDateTime,
    dts_before_pts: Duration,
    keyframe: bool,
    data: Vec<u8>,
}

/// What one source's evidence branch delivered lately.
#[derive(Default)]
pub struct Ring {
    jpeg: VecDeque<(OffsetDateTime, Arc<Vec<u8>>)>,
    h264: VecDeque<Unit>,
    audio: VecDeque<(OffsetDateTime, Vec<f32>)>,
    audio_rate: u32,
    bytes: usize,
}

fn after(from: OffsetDateTime, to: OffsetDateTime) -> Duration {
    Duration::try_from(to - from).unwrap_or_default()
}

impl Ring {
    pub fn push(&mut self, utc: OffsetDateTime, kind: EvidenceKind) {
        match kind {
            EvidenceKind::Jpeg(jpeg) => {
                self.bytes += jpeg.len();
                self.jpeg.push_back((utc, jpeg));
            }
            EvidenceKind::H264 { data, keyframe, dts_before_pts } => {
                // A clip must start at a keyframe: until the first one, units are useless.
                if self.h264.is_empty() && !keyframe {
                    return;
                }
                self.bytes += data.len();
                self.h264.push_back(Unit { utc, dts_before_pts, keyframe, data });
            }
            EvidenceKind::Audio { samples, rate } => {
                if rate != self.audio_rate {
                    self.bytes -= self.audio.iter().map(|(_, samples)| samples.len() * 4).sum::<usize>();
                    self.audio.clear();
                    self.audio_rate = rate;
                }
                self.bytes += samples.len() * 4;
                self.audio.push_back((utc, samples));
            }
        }
    }

    /// Bytes held.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// Whether this source delivers the camera's H.264 (its clips are MP4).
    pub fn copies_video(&self) -> bool {
        !self.h264.is_empty()
    }

    /// The newest time anything reached the ring.
    pub fn newest(&self) -> Option<OffsetDateTime> {
        let jpeg = self.jpeg.back().map(|item| item.0);
        let h264 = self.h264.back().map(|unit| unit.utc);
        let audio = self.audio.back().map(|(utc, samples)| utc_plus_samples(*utc, samples.len(), self.audio_rate));
        [jpeg, h264, audio].into_iter().flatten().max()
    }

    /// Drops what lies wholly before `from`; H.264 is kept from the last keyframe at or
    /// before it, so a clip starting at `from` can still be decoded, but never from before
    /// `hard_from` (a camera that sends keyframes rarely or never cannot hold memory).
    pub fn trim(&mut self, from: OffsetDateTime, hard_from: OffsetDateTime) {
        while self.jpeg.len() > 1 && self.jpeg[1].0 <= from {
            let (_, jpeg) = self.jpeg.pop_front().expect("len > 1");
            self.bytes -= jpeg.len();
        }
        if let Some(keep) = self.h264.iter().rposition(|unit| unit.keyframe && unit.utc <= from) {
            for unit in self.h264.drain(..keep) {
                self.bytes -= unit.data.len();
            }
        }
        while self.h264.front().is_some_and(|unit| unit.utc < hard_from) {
            let unit = self.h264.pop_front().expect("checked");
            self.bytes -= unit.data.len();
        }
        // What is left must start at a keyframe to be of use.
        while self.h264.front().is_some_and(|unit| !unit.keyframe) {
            let unit = self.h264.pop_front().expect("checked");
            self.bytes -= unit.data.len();
        }
        let rate = self.audio_rate;
        while self.audio.front().is_some_and(|(utc, samples)| utc_plus_samples(*utc, samples.len(), rate) <= from) {
            let (_, samples) = self.audio.pop_front().expect("checked");
            self.bytes -= samples.len() * 4;
        }
    }

    /// The still nearest to `at`, if one lies within `within` of it (a camera that died
    /// long ago gives no snapshot rather than an old one).
    pub fn still_near(&self, at: OffsetDateTime, within: Duration) -> Option<Arc<Vec<u8>>> {
        self.jpeg
            .iter()
            .min_by_key(|(utc, _)| (*utc - at).unsigned_abs())
            .filter(|(utc, _)| (*utc - at).unsigned_abs() <= within)
            .map(|(_, jpeg)| jpeg.clone())
    }

    /// The media from `from` to `to`. With H.264 the clip starts at the last keyframe at or
    /// before `from` (the first after it when none is held). `None` when nothing overlaps.
    pub fn cut(&self, from: OffsetDateTime, to: OffsetDateTime) -> Option<ClipMedia> {
        let newest = self.newest()?;
        let to = to.min(newest);
        let mut base = from;
        if !self.h264.is_empty() {
            let key = self
                .h264
                .iter()
                .rev()
                .find(|unit| unit.keyframe && unit.utc <= from)
                .or_else(|| self.h264.iter().find(|unit| unit.keyframe && unit.utc < to))?;
            base = key.utc;
        } else {
            let oldest = [self.jpeg.front().map(|item| item.0), self.audio.front().map(|item| item.0)]
                .into_iter()
                .flatten()
                .min()?;
            base = base.max(oldest);
        }
        if to <= base {
            return None;
        }
        let length = after(base, to);
        let video = if !self.h264.is_empty() {
            let units = self
                .h264
                .iter()
                .filter(|unit| unit.utc >= base && unit.utc < to)
                .map(|unit| {
                    let pts = after(base, unit.utc);
                    (pts, pts.saturating_sub(unit.dts_before_pts), unit.data.clone())
                })
                .collect();
            ClipVideo::H264 { units }
        } else if !self.jpeg.is_empty() {
            let frames: Vec<_> = self
                .jpeg
                .iter()
                .filter(|(utc, _)| *utc >= base && *utc < to)
                .map(|(utc, jpeg)| (after(base, *utc), jpeg.clone()))
                .collect();
            if frames.is_empty() { ClipVideo::None } else { ClipVideo::Jpeg { frames } }
        } else {
            ClipVideo::None
        };
        let audio = self.cut_audio(base, to);
        if matches!(video, ClipVideo::None) && audio.is_none() {
            return None;
        }
        Some(ClipMedia { video, audio, length })
    }

    /// The samples from `base` to `to`, placed by their timestamps: a hole (dropped buffers)
    /// is silence, so the audio stays in sync with the video after it.
    fn cut_audio(&self, base: OffsetDateTime, to: OffsetDateTime) -> Option<ClipAudio> {
        let rate = self.audio_rate;
        let first = self.audio.iter().find(|(utc, samples)| utc_plus_samples(*utc, samples.len(), rate) > base)?;
        let start = first.0.max(base);
        let offset = after(base, start);
        let total = (after(start, to).as_secs_f64() * rate as f64).round() as usize;
        if total == 0 {
            return None;
        }
        let mut out = vec![0.0f32; total];
        for (utc, samples) in &self.audio {
            let at = ((*utc - start).as_seconds_f64() * rate as f64).round() as i64;
            for (idx, sample) in samples.iter().enumerate() {
                let position = at + idx as i64;
                if position >= 0 && (position as usize) < total {
                    out[position as usize] = *sample;
                }
            }
        }
        Some(ClipAudio { offset, rate, samples: out })
    }
}

fn utc_plus_samples(utc: OffsetDateTime, samples: usize, rate: u32) -> OffsetDateTime {
    if rate == 0 {
        return utc;
    }
    utc + Duration::from_secs_f64(samples as f64 / rate as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t0() -> OffsetDateTime {
        OffsetDateTime::from_unix_timestamp(1_800_000_000).expect("valid")
    }

    fn at(seconds: f64) -> OffsetDateTime {
        t0() + Duration::from_secs_f64(seconds)
    }

    /// 10 s of stills at 5 fps and audio in 0.1 s chunks of 100 Hz (10 samples each).
    fn raw_ring() -> Ring {
        let mut ring = Ring::default();
        for frame in 0..50 {
            ring.push(at(frame as f64 * 0.2), EvidenceKind::Jpeg(Arc::new(vec![frame as u8])));
        }
        for chunk in 0..100 {
            let samples = (0..10).map(|idx| (chunk * 10 + idx) as f32).collect();
            ring.push(at(chunk as f64 * 0.1), EvidenceKind::Audio { samples, rate: 100 });
        }
        ring
    }

    #[test]
    fn a_cut_of_stills_and_audio_starts_at_from_and_keeps_samples_in_place() {
        let ring = raw_ring();
        let clip = ring.cut(at(2.0), at(5.0)).expect("overlaps");
        assert_eq!(clip.length, Duration::from_secs(3));
        let ClipVideo::Jpeg { frames } = &clip.video else { panic!("stills expected") };
        assert_eq!(frames.len(), 15);
        assert_eq!(frames[0].1.as_slice(), &[10]);
        assert_eq!(frames[0].0, Duration::ZERO);
        assert_eq!(clip.extension(), "webm");
        let audio = clip.audio.expect("audio");
        assert_eq!(audio.offset, Duration::ZERO);
        assert_eq!(audio.samples.len(), 300);
        assert_eq!(audio.samples[0], 200.0);
        assert_eq!(audio.samples[299], 499.0);
    }

    #[test]
    fn a_hole_in_the_audio_stays_silent_and_the_rest_keeps_its_time() {
        let mut ring = Ring::default();
        for chunk in [0, 1, 3] {
            ring.push(at(chunk as f64 * 0.1), EvidenceKind::Audio { samples: vec![1.0; 10], rate: 100 });
        }
        let audio = ring.cut(at(0.0), at(1.0)).expect("overlaps").audio.expect("audio");
        assert_eq!(audio.samples.len(), 40, "cut at the newest sample");
        assert!(audio.samples[..20].iter().all(|s| *s == 1.0));
        assert!(audio.samples[20..30].iter().all(|s| *s == 0.0));
        assert!(audio.samples[30..].iter().all(|s| *s == 1.0));
    }

    #[test]
    fn h264_clips_start_at_the_last_keyframe_before_from_and_trim_keeps_it() {
        let mut ring = Ring::default();
        // A delta unit before any keyframe is useless and not kept.
        ring.push(at(0.0), EvidenceKind::H264 { data: vec![9], keyframe: false, dts_before_pts: Duration::ZERO });
        for unit in 1..=40 {
            let keyframe = unit % 10 == 1;
            ring.push(
                at(unit as f64 * 0.1),
                EvidenceKind::H264 { data: vec![unit as u8], keyframe, dts_before_pts: Duration::ZERO },
            );
        }
        assert!(ring.copies_video());
        ring.trim(at(2.5), at(0.0));
        let clip = ring.cut(at(2.5), at(3.5)).expect("overlaps");
        assert_eq!(clip.extension(), "mp4");
        let ClipVideo::H264 { units } = &clip.video else { panic!("h264 expected") };
        // Keyframes at 0.1, 1.1, 2.1, 3.1: the clip starts at 2.1.
        assert_eq!(units[0].2, vec![21]);
        assert_eq!(units.len(), 14);
        assert!((clip.length.as_secs_f64() - 1.4).abs() < 1e-6, "{:?}", clip.length);
    }

    #[test]
    fn trim_drops_old_media_and_counts_bytes() {
        let mut ring = raw_ring();
        let before = ring.bytes();
        ring.trim(at(8.0), at(0.0));
        assert!(ring.bytes() < before / 4, "{} of {before}", ring.bytes());
        assert!(ring.cut(at(0.0), at(10.0)).expect("some left").length <= Duration::from_secs_f64(2.01));
        assert_eq!(ring.still_near(at(7.0), Duration::from_secs(2)).expect("a still").as_slice(), &[40]);
        assert!(ring.still_near(at(0.0), Duration::from_secs(2)).is_none(), "no still near 0 s is left");
        // A rate change drops the old audio and its bytes.
        ring.push(at(10.0), EvidenceKind::Audio { samples: vec![0.0; 8], rate: 200 });
        let stills: usize = ring.jpeg.iter().map(|(_, jpeg)| jpeg.len()).sum();
        assert_eq!(ring.bytes(), stills + 32);
    }

    #[test]
    fn a_camera_without_keyframes_cannot_pin_its_h264() {
        let mut ring = Ring::default();
        ring.push(at(0.0), EvidenceKind::H264 { data: vec![1; 100], keyframe: true, dts_before_pts: Duration::ZERO });
        for unit in 1..100 {
            let kind = EvidenceKind::H264 { data: vec![1; 100], keyframe: false, dts_before_pts: Duration::ZERO };
            ring.push(at(unit as f64 * 0.1), kind);
        }
        ring.trim(at(9.0), at(5.0));
        assert_eq!(ring.bytes(), 0, "nothing decodable is left once the keyframe is gone");
        assert!(!ring.copies_video());
    }
}
