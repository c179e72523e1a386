//! The model: ONNX file, its metadata and the tract runtime, with our fused ops (f32 rows,
//! matmuls and attention products; int8 matmuls on AMX, VNNI or AVX2). Only this module knows
//! tract.
//!
//! The fused ops run on the best kernel path this CPU has (scalar, AVX2 + FMA, AVX-512, AMX:
//! `kernel.rs`); `MBT_EDGE_KERNEL=scalar|avx2|avx512|amx` forces one (refused with an error
//! when the CPU lacks it) and `MBT_EDGE_KERNEL=tract` leaves the graph to tract's own kernels.

mod f32fuse;
mod gather;
mod gpu_graph;
mod int8;
mod kernel;
mod metadata;
mod runtime;
mod streams;

pub use f32fuse::fuse as fuse_f32;
pub use int8::attention::{INT8_ATTENTION_ENV, Int8Attention};
pub use int8::fuse as fuse_int8;
pub use kernel::{KERNEL_ENV, Kernel, KernelError, Selection};
pub use metadata::{AudioRecipe, ModelError, ModelInfo, ModelMetadata, VideoRecipe};
pub use runtime::{Logits, ModelRuntime, probabilities, select_backend};
pub use streams::{PARALLEL_ENV, Parallelism, ParallelismError};

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
