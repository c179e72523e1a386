//! One window to one batch slot: the model's `video` and `audio` tensors for a window, with
//! a streaming log-mel per source so overlapping windows reuse the spectrogram rows they
//! share.

use std::collections::HashMap;
use std::sync::Arc;

use super::{FeatureError, LogMelStream, video_tensor};
use crate::model::{ModelMetadata, VideoRecipe};
use crate::window::{Degraded, Window};

/// Computes model inputs for the windows of any number of sources.
pub struct Featurizer {
    video: Option<VideoRecipe>,
    audio: Option<crate::model::AudioRecipe>,
    streams: HashMap<Arc<str>, LogMelStream>,
}

impl Featurizer {
    /// Checks the recipe once; fails for recipes this code cannot compute.
    pub fn new(metadata: &ModelMetadata) -> Result<Featurizer, FeatureError> {
        if let Some(audio) = &metadata.audio {
            LogMelStream::new(audio)?;
        }
        Ok(Featurizer { video: metadata.video.clone(), audio: metadata.audio.clone(), streams: HashMap::new() })
    }

    /// Floats in one window's `video` tensor (`F * 3 * H * W`); 0 without video.
    pub fn video_len(&self) -> usize {
        self.video.as_ref().map_or(0, |video| video.frames * 3 * video.height as usize * video.width as usize)
    }

    /// Floats in one window's `audio` tensor (`T * M`); 0 without audio.
    pub fn audio_len(&self) -> usize {
        self.audio.as_ref().map_or(0, |audio| audio.n_frames * audio.n_mels)
    }

    /// Writes `window`'s tensors into `video_out` (`video_len`) and `audio_out` (`audio_len`).
    /// A modality the window lacks (a one-sense source) or has lost (`window.degraded`) is
    /// written as zeros, the standardised mean, which is what models trained with modality
    /// dropout expect (models/METADATA.md).
    pub fn fill(&mut self, window: &Window, video_out: &mut [f32], audio_out: &mut [f32]) {
        if let Some(video) = &self.video {
            if window.frames.is_empty() || window.degraded == Some(Degraded::VideoLost) {
                video_out.fill(0.0);
            } else {
                video_tensor(&window.frames, video, video_out);
            }
        }
        if let Some(audio) = &self.audio {
            if window.audio.is_empty() || window.degraded == Some(Degraded::AudioLost) {
                audio_out.fill(0.0);
            } else {
                let stream = self
                    .streams
                    .entry(window.source.clone())
                    .or_insert_with(|| LogMelStream::new(audio).expect("the recipe was checked in Featurizer::new"));
                stream.window(window.first_sample, &window.audio, audio_out);
            }
        }
    }

    /// Forgets a source's cached spectrogram rows (its pipeline restarted).
    pub fn reset(&mut self, source: &str) {
        self.streams.remove(source);
    }
}
