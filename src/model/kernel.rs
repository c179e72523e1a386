//! Which code path the fused ops run on, and how they split their work over the model's
//! threads.
//!
//! [`Kernel`] names the paths: `scalar` (portable Rust), `avx2` (AVX2 + FMA intrinsics, and
//! the int8 weight matmuls on AVX-VNNI's 256-bit `vpdpbusd` where the CPU has it, else on
//! `vpmaddwd`), `avx512` (AVX-512F intrinsics, and int8 on AVX-512 VNNI, else `vpmaddwd`) and
//! `amx` (the int8 weight matmuls on AMX tiles, the f32 ops on AVX-512); `int8.rs`'s
//! `Int8Path::for_kernel` maps a path to its int8 code. By default the
//! model takes the best path this CPU has ([`Kernel::best`]); the environment variable
//! `MBT_EDGE_KERNEL` (`scalar|avx2|avx512|amx`, or `tract` to leave the graph to tract's own
//! kernels, or `auto`) forces one ([`Selection::from_env`]). A forced path
//! the CPU lacks is refused with an error naming the missing feature, never executed. The fuse
//! functions take the path as a parameter, so tests force each path side by side without
//! touching the process environment.
//!
//! Threads: the runtime creates one rayon pool per model (tract's `Executor`, `[model]
//! threads` wide) and runs each plan inside it, so tract's matrix products and the fused ops
//! share the same threads; [`split_rows`] hands contiguous row ranges of an op's output to the
//! pool's threads. No thread is spawned per call; small ops run inline.

use tract_linalg::multithread::{Executor, current_tract_executor};

/// The environment variable that forces a kernel path.
pub const KERNEL_ENV: &str = "MBT_EDGE_KERNEL";

/// A code path of the fused ops.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    Scalar,
    Avx2,
    Avx512,
    Amx,
}

/// What the runtime does with a model: fuse on a kernel path, or leave it to tract.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Selection {
    Fused(Kernel),
    Tract,
}

/// A forced path that cannot be used here.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KernelError {
    #[error("{KERNEL_ENV}={value:?} is not a kernel path; use scalar, avx2, avx512, amx, tract or auto")]
    Unknown { value: String },
    #[error("{KERNEL_ENV}={kernel} but this CPU lacks {missing}")]
    Unsupported { kernel: &'static str, missing: &'static str },
}

impl Kernel {
    /// Every path, slowest first.
    pub const ALL: [Kernel; 4] = [Kernel::Scalar, Kernel::Avx2, Kernel::Avx512, Kernel::Amx];

    pub fn name(self) -> &'static str {
        match self {
            Kernel::Scalar => "scalar",
            Kernel::Avx2 => "avx2",
            Kernel::Avx512 => "avx512",
            Kernel::Amx => "amx",
        }
    }

    /// The CPU feature this path needs and this CPU lacks, if any.
    pub fn missing(self) -> Option<&'static str> {
        match self {
            Kernel::Scalar => None,
            Kernel::Avx2 => (!has_avx2_fma()).then_some("AVX2 and FMA"),
            Kernel::Avx512 => (!has_avx512f()).then_some("AVX-512F"),
            Kernel::Amx => {
                if !has_avx512f() {
                    Some("AVX-512F")
                } else if !super::int8::available() {
                    Some("AMX-INT8 (or the OS's grant of the tile state)")
                } else {
                    None
                }
            }
        }
    }

    pub fn supported(self) -> bool {
        self.missing().is_none()
    }

    /// The fastest path this CPU has, or `None` where only the scalar one runs (tract's own
    /// SIMD kernels then beat our portable code, so the graph is left to tract).
    pub fn best() -> Option<Kernel> {
        [Kernel::Amx, Kernel::Avx512, Kernel::Avx2].into_iter().find(|k| k.supported())
    }

    /// The path the f32 ops take: AMX only changes the int8 matmuls.
    pub(super) fn f32_path(self) -> Kernel {
        match self {
            Kernel::Amx => Kernel::Avx512,
            other => other,
        }
    }
}

impl std::fmt::Display for Kernel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl Selection {
    /// The selection `MBT_EDGE_KERNEL` asks for (unset, empty or `auto`: the best path).
    pub fn from_env() -> Result<Selection, KernelError> {
        Selection::parse(std::env::var(KERNEL_ENV).ok().as_deref())
    }

    /// `value` as `MBT_EDGE_KERNEL` would give it; refuses a path this CPU lacks.
    pub fn parse(value: Option<&str>) -> Result<Selection, KernelError> {
        let value = value.map(str::trim).unwrap_or("");
        let kernel = match value.to_ascii_lowercase().as_str() {
            "" | "auto" => return Ok(Kernel::best().map_or(Selection::Tract, Selection::Fused)),
            "tract" => return Ok(Selection::Tract),
            "scalar" => Kernel::Scalar,
            "avx2" => Kernel::Avx2,
            "avx512" => Kernel::Avx512,
            "amx" => Kernel::Amx,
            _ => return Err(KernelError::Unknown { value: value.to_string() }),
        };
        match kernel.missing() {
            Some(missing) => Err(KernelError::Unsupported { kernel: kernel.name(), missing }),
            None => Ok(Selection::Fused(kernel)),
        }
    }
}

fn has_avx2_fma() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

fn has_avx512f() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Below this many multiply-adds (or element operations for row ops) an op runs on the
/// calling thread: waking another thread costs a few microseconds.
pub(super) const MIN_PARALLEL_WORK: usize = 1 << 18;

/// Runs `f(first_row, rows_out)` over `out` cut into contiguous ranges of whole rows of
/// `row_len` values, one range per thread of the current tract executor (the model's pool),
/// or all on this thread when the pool has one thread or `work` is below
/// [`MIN_PARALLEL_WORK`]. `row_len` must be non-zero.
pub(super) fn split_rows<T: Send>(out: &mut [T], row_len: usize, work: usize, f: impl Fn(usize, &mut [T]) + Sync) {
    if row_len == 0 || out.is_empty() {
        return f(0, out);
    }
    let rows = out.len() / row_len;
    let per = rows_per_part(rows, work).max(1);
    run_parts(out.chunks_mut(per * row_len).enumerate().collect(), |(ix, chunk)| f(ix * per, chunk));
}

/// Rows per part when `rows` rows of `work` multiply-adds in all are split over the current
/// executor's threads: all of them (one part) on one thread or for small work.
pub(super) fn rows_per_part(rows: usize, work: usize) -> usize {
    rows.div_ceil(threads_for(work).clamp(1, rows.max(1)))
}

/// The threads of the current executor that `work` multiply-adds are worth: 1 on one thread
/// or below [`MIN_PARALLEL_WORK`].
pub(super) fn threads_for(work: usize) -> usize {
    match current_tract_executor() {
        Executor::MultiThread(pool) if work >= MIN_PARALLEL_WORK => pool.current_num_threads().max(1),
        _ => 1,
    }
}

/// Runs `f` on each part, one per thread of the current tract executor: the first on this
/// thread, the others stolen by the pool's threads; returns once all are done.
pub(super) fn run_parts<P: Send>(parts: Vec<P>, f: impl Fn(P) + Sync) {
    let pool = match current_tract_executor() {
        Executor::MultiThread(pool) if parts.len() > 1 => pool,
        _ => return parts.into_iter().for_each(f),
    };
    let f = &f;
    // `scope` from inside the pool (the runtime runs plans there) lets this thread work on
    // the first part while the others are stolen; it returns once all parts are done.
    pool.scope(|scope| {
        let mut parts = parts.into_iter();
        let first = parts.next();
        for part in parts {
            scope.spawn(move |_| f(part));
        }
        if let Some(part) = first {
            f(part);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use tract_linalg::multithread::multithread_tract_scope;

    #[test]
    fn env_values_parse_and_unsupported_paths_are_refused() {
        assert_eq!(Selection::parse(Some("tract")), Ok(Selection::Tract));
        assert_eq!(Selection::parse(Some(" Scalar ")), Ok(Selection::Fused(Kernel::Scalar)));
        let auto = Kernel::best().map_or(Selection::Tract, Selection::Fused);
        assert_eq!(Selection::parse(None), Ok(auto));
        assert_eq!(Selection::parse(Some("auto")), Ok(auto));
        assert_eq!(Selection::parse(Some("sse9")), Err(KernelError::Unknown { value: "sse9".into() }));
        for kernel in Kernel::ALL {
            match (Selection::parse(Some(kernel.name())), kernel.missing()) {
                (Ok(selection), None) => assert_eq!(selection, Selection::Fused(kernel)),
                (Err(KernelError::Unsupported { kernel: name, missing }), Some(lacks)) => {
                    assert_eq!((name, missing), (kernel.name(), lacks));
                }
                (other, missing) => panic!("{kernel}: {other:?} with missing {missing:?}"),
            }
        }
    }

    #[test]
    fn split_rows_covers_every_row_once_on_a_pool() {
        let pool = Executor::multithread(3);
        for rows in [1usize, 2, 5, 7, 1000] {
            let mut out = vec![0u32; rows * 4];
            multithread_tract_scope(pool.clone(), || {
                split_rows(&mut out, 4, MIN_PARALLEL_WORK, |first, chunk| {
                    for (ix, row) in chunk.chunks_mut(4).enumerate() {
                        row.iter_mut().for_each(|v| *v += (first + ix) as u32 + 1);
                    }
                })
            });
            let want: Vec<u32> = (0..rows).flat_map(|r| [r as u32 + 1; 4]).collect();
            assert_eq!(out, want, "{rows} rows");
        }
    }
}
