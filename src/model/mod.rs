//! The model: ONNX file, its metadata and (later) the tract runtime. Only this module knows
//! tract.

mod gpu_graph;
mod int8;
mod metadata;
mod runtime;

pub use int8::fuse as fuse_int8;
pub use metadata::{AudioRecipe, ModelError, ModelInfo, ModelMetadata, VideoRecipe};
pub use runtime::{Logits, ModelRuntime, probabilities, select_backend};
