//! The model: ONNX file, its metadata and (later) the tract runtime. Only this module knows
//! tract.

mod f32fuse;
mod gpu_graph;
mod int8;
mod metadata;
mod runtime;

pub use f32fuse::fuse as fuse_f32;
pub use int8::fuse as fuse_int8;
pub use metadata::{AudioRecipe, ModelError, ModelInfo, ModelMetadata, VideoRecipe};
pub use runtime::{Logits, ModelRuntime, probabilities, select_backend};
