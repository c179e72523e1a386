//! The model: ONNX file, its metadata and (later) the tract runtime. Only this module knows
//! tract.

mod metadata;

pub use metadata::{AudioRecipe, ModelError, ModelInfo, ModelMetadata, VideoRecipe};
