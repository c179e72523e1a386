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

/// Shared by the model tests: fixed pseudo-random f32 inputs.
#[cfg(test)]
mod test_rng {
    /// A small deterministic generator (no dependency): values in [-1, 1).
    pub struct Lcg(pub u64);

    impl Lcg {
        pub fn next(&mut self) -> f32 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            ((self.0 >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        }
    }
}
