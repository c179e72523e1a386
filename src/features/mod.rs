//! The features stage: a window's frames and samples to the model's `video` and `audio`
//! tensors, exactly as models/METADATA.md ("Pixels", "Log-mel recipe") defines them.
//!
//! This is the one implementation of the recipe: `mbt-edge record` writes what it computes
//! and training reads that, so the Python code in models/mbt/logmel.py exists only for the
//! parity test here. Pure code: no I/O, no threads, no clocks; every function writes into a
//! buffer the caller owns (one slot of the batch tensor), so nothing is copied twice.

mod featurizer;
mod logmel;
#[cfg(test)]
mod parity;
mod video;

pub use featurizer::Featurizer;
pub use logmel::{LogMel, LogMelStream};
pub use video::video_tensor;

/// A recipe this code cannot compute; found once, when the model is loaded.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FeatureError {
    #[error("audio.window {0:?} is not supported (only \"hann\", the periodic Hann window)")]
    UnsupportedWindow(String),
    #[error("audio.mel_scale {0:?} is not supported (only \"htk\")")]
    UnsupportedMelScale(String),
    #[error("audio.{field} = {value} is not usable: {allowed}")]
    InvalidAudioRecipe { field: &'static str, value: String, allowed: &'static str },
}
