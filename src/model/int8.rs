//! One fused op for the int8 weight matmuls of `avsynth/quantize.py`'s models: on Intel AMX,
//! VNNI (512 or 256 bits) or AVX2.
//!
//! tract runs each quantised matmul of such a model as about ten ops: the activation quantiser
//! (`Mul`, `Add`, `Max`, `Min`, `Cast` to u8), the int8 einsum (its AMX kernel calls
//! per 16x16 tile, re-configuring the tiles each call), `Cast` to f32, then the per-channel
//! `Mul` and the bias `Add`. [`fuse`] replaces every such chain in a decluttered model by one
//! [`Int8Linear`] node, and all matmuls reading the same quantised tensor (Q, K and V) by one
//! node with an output each: quantise the rows once into a u8 buffer, run `tdpbusd` over 32x32
//! output blocks with the tiles configured once per call and the weights packed once at load,
//! and one pass per block turns the i32 sums into f32 (zero-point correction, channel scale,
//! bias). The arithmetic is tract's: the same u8 values, exact i32 sums, then the `Mul` and
//! the `Add` as two f32 roundings, so the outputs are bit-identical (unit tests below).
//!
//! On CPUs without AMX but with VNNI the same op runs `vpdpbusd`, which sums four u8 x s8
//! products into an i32 lane without saturating (exact): [`Int8Path::Vnni512`] (AVX-512 VNNI:
//! Ice Lake and later Xeons, AMD Zen 4) on zmm with a 12-row x 32-channel micro-kernel, and
//! [`Int8Path::Vnni256`] (AVX-VNNI: Alder Lake and later, N100-class) on ymm, 6 rows x 16
//! channels. The u8 rows are quantised as for AMX (k padded to a multiple of 4: the pad
//! meets zero weights, so whatever it holds adds nothing), the weights packed once at load as quads of k in panels of 16
//! channels (one zmm, two ymm), the rows split over the model's threads; exact i32 sums and
//! the same two roundings, so bit-identical to tract.
//!
//! On CPUs with neither (AMD Zen 2/3, older Intel) the same op runs [`Int8Path::Avx2`]: the
//! u8 activations widened to i16 pairs, the weights packed once at load as i16 pairs in
//! panels of 16 channels, and `vpmaddwd` (two u8 x s8 products summed into an i32 lane,
//! exact: at most 2 x 255 x 128) with `vpaddd`, a 6-row x 16-channel micro-kernel, the rows
//! split over the model's threads. Exact i32 sums and the same two
//! roundings, so bit-identical to tract too. (`vpmaddubsw` would take u8 x s8 directly, but
//! sums each pair in saturating i16: 2 x 255 x 127 overflows it, and onnxruntime's outputs on
//! such CPUs then depend on the weights' luck.)
//!
//! A graph without such chains (any f32 model) is left untouched.

use std::sync::Arc;

pub(super) mod attention;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::Cost;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::cast::Cast;
use tract_onnx::tract_core::ops::einsum::EinSum;

/// Which code an [`Int8Linear`] runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Path {
    /// `tdpbusd` tiles: needs [`available`].
    Amx,
    /// `vpdpbusd` on zmm registers (AVX-512 VNNI): needs [`vnni512_available`].
    Vnni512,
    /// `vpdpbusd` on ymm registers (AVX-VNNI: Alder Lake and later, N100-class): needs
    /// [`vnni256_available`].
    Vnni256,
    /// `vpmaddwd` on i16 pairs: needs AVX2 ([`avx2_available`]).
    Avx2,
    /// Plain Rust (tests; slower than tract's own kernels, so the runtime never picks it).
    Portable,
}

impl Int8Path {
    /// Every path, fastest first.
    pub const ALL: [Int8Path; 5] =
        [Int8Path::Amx, Int8Path::Vnni512, Int8Path::Vnni256, Int8Path::Avx2, Int8Path::Portable];

    /// The int8 path that goes with the f32 ops' `kernel`: AMX with `amx`; on `avx512`
    /// VNNI-512, else (Skylake-SP-class) the AVX2 pairs; on `avx2` AVX-VNNI, else the pairs;
    /// none with `scalar` (tract's own kernels then).
    pub fn for_kernel(kernel: super::kernel::Kernel) -> Option<Int8Path> {
        use super::kernel::Kernel;
        let first = |paths: &[Int8Path]| paths.iter().copied().find(|p| p.supported());
        match kernel {
            Kernel::Amx => first(&[Int8Path::Amx]),
            Kernel::Avx512 => first(&[Int8Path::Vnni512, Int8Path::Avx2]),
            Kernel::Avx2 => first(&[Int8Path::Vnni256, Int8Path::Avx2]),
            Kernel::Scalar => None,
        }
    }

    /// Whether this CPU runs the path.
    pub fn supported(self) -> bool {
        match self {
            Int8Path::Amx => available(),
            Int8Path::Vnni512 => vnni512_available(),
            Int8Path::Vnni256 => vnni256_available(),
            Int8Path::Avx2 => avx2_available(),
            Int8Path::Portable => true,
        }
    }
}

/// Whether this machine has AVX-512F with AVX-512 VNNI, for [`Int8Path::Vnni512`].
pub fn vnni512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512vnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this machine has AVX2 with AVX-VNNI, for [`Int8Path::Vnni256`].
pub fn vnni256_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("avxvnni")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether this machine has AVX2, for [`Int8Path::Avx2`].
pub fn avx2_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Channels per panel of [`Int8Path::Avx2`]'s packed weights: two ymm registers of i32 sums.
const PAIR_PANEL: usize = 16;
/// Rows per micro-kernel call of [`Int8Path::Avx2`]: 6 rows x 2 registers = 12 accumulators.
#[cfg(target_arch = "x86_64")]
const PAIR_MR: usize = 6;
/// Channels per panel of the VNNI paths' packed weights: one zmm (two ymm) of i32 sums.
const QUAD_PANEL: usize = 16;
/// Rows per micro-kernel call of [`Int8Path::Vnni512`] (12 rows x 2 panels = 24 zmm
/// accumulators) and of [`Int8Path::Vnni256`] (6 rows x 2 ymm = 12 of its 16 registers).
#[cfg(target_arch = "x86_64")]
const QUAD_MR_512: usize = 12;
#[cfg(target_arch = "x86_64")]
const QUAD_MR_256: usize = 6;

/// Whether this machine runs [`Int8Linear`] on AMX (x86_64 with AMX-INT8, tile state granted).
pub fn available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        tract_linalg::x86_64::amx::has_amx_int8()
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// K and N granularity of the AMX path: one tile row is 64 bytes of K; output blocks are 32x32.
const K_BLOCK: usize = 64;
const N_BLOCK: usize = 32;

/// Weights of one or more matmuls sharing an input, concatenated along N and packed for
/// `tdpbusd`: per 16 output channels and per 64 values of K, one 1 KiB tile of 16 rows
/// (4 consecutive k) x 16 channels x 4 bytes.
#[derive(Debug)]
struct Weights {
    k: usize,
    n: usize,
    /// Row-major `[k][n]`, for the portable path.
    plain: Vec<i8>,
    /// The AMX tiles (x86-64 and [`Int8Path::Amx`] only, else empty).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    packed: Vec<i8>,
    /// [`Int8Path::Avx2`]'s weights (else empty): per panel of [`PAIR_PANEL`] channels, per
    /// pair of k (`k` rounded up to even, zero past it), 16 channels x 2 i16 `(w[2p][c],
    /// w[2p+1][c])`, 64 bytes.
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    pairs: Vec<i16>,
    /// The VNNI paths' weights (else empty): per panel of [`QUAD_PANEL`] channels, per quad
    /// of k (`k` rounded up to a multiple of 4, zero past it), 16 channels x 4 s8 `w[4q..4q+4][c]`,
    /// 64 bytes (one zmm, or two ymm of 8 channels each).
    #[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
    quads: Vec<i8>,
    /// Zero point of the input times the column sums of the weights.
    zp_colsum: Vec<i32>,
    scale: Vec<f32>,
    bias: Vec<f32>,
}

impl Weights {
    fn new(k: usize, plain: Vec<i8>, zp: u8, scale: Vec<f32>, bias: Vec<f32>, path: Int8Path) -> Weights {
        let n = scale.len();
        debug_assert_eq!(plain.len(), k * n);
        let mut packed = vec![0i8; if path == Int8Path::Amx { k * n } else { 0 }];
        let k_blocks = if path == Int8Path::Amx { k / K_BLOCK } else { 0 };
        let pairs = if path == Int8Path::Avx2 { interleave(&plain, k, n, PAIR_PANEL, 2, i16::from) } else { vec![] };
        for group in 0..n / 16 {
            for kb in 0..k_blocks {
                let tile = &mut packed[(group * k_blocks + kb) * 1024..][..1024];
                for row in 0..16 {
                    for col in 0..16 {
                        for t in 0..4 {
                            let kk = kb * K_BLOCK + row * 4 + t;
                            tile[row * 64 + col * 4 + t] = plain[kk * n + group * 16 + col];
                        }
                    }
                }
            }
        }
        let quads = if matches!(path, Int8Path::Vnni512 | Int8Path::Vnni256) {
            interleave(&plain, k, n, QUAD_PANEL, 4, |w| w)
        } else {
            vec![]
        };
        let zp_colsum =
            (0..n).map(|col| (0..k).map(|kk| plain[kk * n + col] as i32).sum::<i32>() * zp as i32).collect();
        Weights { k, n, plain, packed, pairs, quads, zp_colsum, scale, bias }
    }
}

/// `[k][n]` weights as the AVX2 and VNNI kernels read them: per panel of `panel` channels, per
/// group of `group` consecutive k (`k` rounded up to a multiple of `group`, zero past it), the
/// panel's channels one after the other, each with its `group` values of k.
fn interleave<T: Copy + Default>(
    plain: &[i8],
    k: usize,
    n: usize,
    panel: usize,
    group: usize,
    convert: impl Fn(i8) -> T,
) -> Vec<T> {
    let groups = k.div_ceil(group);
    let mut out = vec![T::default(); n.div_ceil(panel) * groups * panel * group];
    for col in 0..n {
        let (p, c) = (col / panel, col % panel);
        for kk in 0..k {
            out[((p * groups + kk / group) * panel + c) * group + kk % group] = convert(plain[kk * n + col]);
        }
    }
    out
}

/// `y_j = (Σ_k (q(x)_k - zp) w_kj) * scale_j + bias_j` for each output `j`, with
/// `q(x) = Cast<u8>(Min(Max(x * inv_scale + offset, lo), hi))`, over the last axis of `x`.
#[derive(Clone, Debug)]
pub struct Int8Linear {
    inv_scale: f32,
    offset: f32,
    lo: f32,
    hi: f32,
    /// N of each output, in order; their weights are concatenated in `weights`.
    outputs: Vec<usize>,
    weights: Arc<Weights>,
    path: Int8Path,
}

impl PartialEq for Int8Linear {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && self.outputs == other.outputs
            && [self.inv_scale, self.offset, self.lo, self.hi].map(f32::to_bits)
                == [other.inv_scale, other.offset, other.lo, other.hi].map(f32::to_bits)
            && self.path == other.path
    }
}

impl Eq for Int8Linear {}

impl Op for Int8Linear {
    fn name(&self) -> StaticName {
        "Int8Linear".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        Ok(vec![format!(
            "k: {} outputs: {:?} path: {:?} inv_scale: {} offset: {}",
            self.weights.k, self.outputs, self.path, self.inv_scale, self.offset
        )])
    }

    op_as_typed_op!();
}

impl EvalOp for Int8Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let x = inputs[0].try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        let shape = inputs[0].shape();
        let k = self.weights.k;
        ensure!(shape.last() == Some(&k), "Int8Linear: input shape {shape:?}, K = {k}");
        let rows = x.len() / k;
        let mut outputs: Vec<Tensor> = self
            .outputs
            .iter()
            .map(|&n| {
                let mut out_shape = shape.to_vec();
                *out_shape.last_mut().unwrap() = n;
                // SAFETY: both paths below write every value of each output (all rows, all
                // columns) before it is read; with no rows there is nothing to read.
                unsafe { Tensor::uninitialized::<f32>(&out_shape) }
            })
            .collect::<TractResult<_>>()?;
        {
            let mut views: Vec<_> = outputs.iter_mut().map(|t| t.try_as_plain_ram_mut()).collect::<TractResult<_>>()?;
            let mut slices: Vec<&mut [f32]> =
                views.iter_mut().map(|v| v.as_slice_mut::<f32>()).collect::<TractResult<_>>()?;
            if rows > 0 {
                #[cfg(target_arch = "x86_64")]
                if matches!(self.path, Int8Path::Vnni512 | Int8Path::Vnni256) && self.path.supported() {
                    // SAFETY: `supported` confirmed the path's VNNI (and AVX-512F or AVX2 with
                    // it); the matcher built this op for it (weights packed as quads, each N a
                    // multiple of 16).
                    unsafe { self.run_quads(x, rows, &mut slices) };
                    return Ok(outputs.into_iter().map(|t| t.into_tvalue()).collect());
                }
                #[cfg(target_arch = "x86_64")]
                if self.path == Int8Path::Avx2 && avx2_available() {
                    // SAFETY: `avx2_available` confirmed AVX2; the matcher built this op for
                    // the AVX2 path (weights packed as pairs, each N a multiple of 16).
                    unsafe { self.run_pairs(x, rows, &mut slices) };
                    return Ok(outputs.into_iter().map(|t| t.into_tvalue()).collect());
                }
                #[cfg(target_arch = "x86_64")]
                if self.path == Int8Path::Amx && available() {
                    // SAFETY: `available` confirmed AMX-INT8 (and AVX-512F with it) and the
                    // OS's grant of the tile state; the matcher only built this op with k a
                    // non-zero multiple of 64 and each N a multiple of 32 (`amx`).
                    unsafe { self.run_amx(x, rows, &mut slices) };
                    return Ok(outputs.into_iter().map(|t| t.into_tvalue()).collect());
                }
                self.run_portable(x, rows, &mut slices);
            }
        }
        Ok(outputs.into_iter().map(|t| t.into_tvalue()).collect())
    }
}

impl TypedOp for Int8Linear {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let fact = inputs[0];
        ensure!(fact.datum_type == f32::datum_type(), "Int8Linear takes f32");
        let rank = fact.rank();
        ensure!(rank >= 1 && fact.shape[rank - 1] == self.weights.k.to_dim(), "Int8Linear: K mismatch");
        Ok(self
            .outputs
            .iter()
            .map(|&n| {
                let mut shape = fact.shape.to_tvec();
                shape[rank - 1] = n.to_dim();
                f32::fact(shape)
            })
            .collect())
    }

    /// One multiply-add per input value and output column (`streams.rs` reads it).
    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let columns: usize = self.outputs.iter().sum();
        Ok(tvec!((Cost::FMA(u8::datum_type()), inputs[0].shape.volume() * columns)))
    }
}

impl Int8Linear {
    fn quantize(&self, x: f32) -> u8 {
        (x * self.inv_scale + self.offset).max(self.lo).min(self.hi) as u8
    }

    /// Which output, and which column in it, the global column `col` is.
    fn locate(&self, mut col: usize) -> (usize, usize) {
        for (ix, &n) in self.outputs.iter().enumerate() {
            if col < n {
                return (ix, col);
            }
            col -= n;
        }
        unreachable!("column beyond the weights")
    }

    fn run_portable(&self, x: &[f32], rows: usize, outputs: &mut [&mut [f32]]) {
        let w = &self.weights;
        let mut q = vec![0u8; w.k];
        let mut acc = vec![0i32; w.n];
        for row in 0..rows {
            for (q, &x) in q.iter_mut().zip(&x[row * w.k..][..w.k]) {
                *q = self.quantize(x);
            }
            acc.iter_mut().for_each(|a| *a = 0);
            for (kk, &q) in q.iter().enumerate() {
                for (a, &w) in acc.iter_mut().zip(&w.plain[kk * w.n..][..w.n]) {
                    *a = a.wrapping_add(q as i32 * w as i32);
                }
            }
            for (col, &a) in acc.iter().enumerate() {
                let (o, c) = self.locate(col);
                let n = self.outputs[o];
                outputs[o][row * n + c] = (a.wrapping_sub(w.zp_colsum[col]) as f32) * w.scale[col] + w.bias[col];
            }
        }
    }

    /// # Safety
    /// AMX-INT8 with the tile state granted, AVX-512F; `self` built by the matcher with
    /// `amx` (k a non-zero multiple of 64, each output's N a multiple of 32); `x` of `rows * k`
    /// values, each output of `rows * n`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn run_amx(&self, x: &[f32], rows: usize, outputs: &mut [&mut [f32]]) {
        let w = &*self.weights;
        let k = w.k;
        let padded_rows = rows.div_ceil(N_BLOCK) * N_BLOCK;
        QUANTISED.with_borrow_mut(|a| {
            a.clear();
            a.resize(padded_rows * k, 0);
            // SAFETY: AVX-512F per this function's contract.
            unsafe { self.quantize_avx512(&x[..rows * k], &mut a[..rows * k]) };
            let config = TileConfig::new();
            let mut block = Block([0; N_BLOCK * N_BLOCK]);
            let k_blocks = k / K_BLOCK;
            // SAFETY: AMX per this function's contract; `config` is a valid palette-1 config.
            unsafe {
                std::arch::asm!("ldtilecfg [{}]", in(reg) &config, options(nostack, readonly));
            }
            let mut col0 = 0;
            for (o, &n) in self.outputs.iter().enumerate() {
                for local in (0..n).step_by(N_BLOCK) {
                    let col = col0 + local;
                    let b0 = w.packed[(col / 16) * k_blocks * 1024..].as_ptr();
                    let b1 = w.packed[(col / 16 + 1) * k_blocks * 1024..].as_ptr();
                    for row0 in (0..padded_rows).step_by(N_BLOCK) {
                        let a0 = a[row0 * k..].as_ptr();
                        let a1 = a[(row0 + 16) * k..].as_ptr();
                        // SAFETY: tiles configured above; `a` holds `padded_rows` (a multiple
                        // of 32) rows of k bytes, so rows row0..row0 + 32 exist; the weights
                        // hold `k_blocks` (>= 1, the matcher) tiles for each 16-column group
                        // and `col + 32 <= n_total`; `block` holds 32 x 32 i32.
                        unsafe { tile_block(a0, a1, k, b0, b1, k_blocks, block.0.as_mut_ptr()) };
                        let zp = &w.zp_colsum[col..col + N_BLOCK];
                        let scale = &w.scale[col..col + N_BLOCK];
                        let bias = &w.bias[col..col + N_BLOCK];
                        let out = &mut outputs[o][row0 * n + local..];
                        // SAFETY: AVX-512F per this function's contract; `epilogue` checks
                        // the slices' lengths.
                        unsafe { epilogue(&block, N_BLOCK.min(rows - row0), zp, scale, bias, out, n) };
                    }
                }
                col0 += n;
            }
            // SAFETY: AMX per this function's contract; releases the tiles configured above.
            unsafe {
                std::arch::asm!("tilerelease", options(nostack, nomem));
            }
        })
    }
}

#[cfg(target_arch = "x86_64")]
impl Int8Linear {
    /// `f(x, rows, outputs)` on the rows split over the model's threads (`x` and each output
    /// cut to the part's rows), each part quantising its own rows.
    fn split(
        &self,
        x: &[f32],
        rows: usize,
        outputs: &mut [&mut [f32]],
        f: impl Fn(&[f32], usize, &mut [&mut [f32]]) + Sync,
    ) {
        let w = &*self.weights;
        let per = super::kernel::rows_per_part(rows, rows * w.k * w.n).max(1);
        let mut parts: Vec<(usize, Vec<&mut [f32]>)> = (0..rows.div_ceil(per)).map(|ix| (ix * per, vec![])).collect();
        for (out, &n) in outputs.iter_mut().zip(&self.outputs) {
            for (part, chunk) in parts.iter_mut().zip(out.chunks_mut(per * n)) {
                part.1.push(chunk);
            }
        }
        super::kernel::run_parts(parts, |(first, mut outs)| {
            let here = per.min(rows - first);
            f(&x[first * w.k..][..here * w.k], here, &mut outs)
        });
    }

    /// [`Int8Path::Avx2`] over the model's threads.
    ///
    /// # Safety
    /// AVX2 present; `self` built by the matcher for [`Int8Path::Avx2`] (see [`Self::pairs_rows`]).
    unsafe fn run_pairs(&self, x: &[f32], rows: usize, outputs: &mut [&mut [f32]]) {
        // SAFETY: AVX2 and the matcher's shapes per this function's contract; `pairs_rows`
        // checks the lengths.
        self.split(x, rows, outputs, |x, rows, outs| unsafe { self.pairs_rows(x, rows, outs) });
    }

    /// [`Int8Path::Vnni512`] or [`Int8Path::Vnni256`] (`self.path`) over the model's threads.
    ///
    /// # Safety
    /// The path's CPU features present ([`Int8Path::supported`]); `self` built by the matcher
    /// for it (see [`Self::quads_rows`]).
    unsafe fn run_quads(&self, x: &[f32], rows: usize, outputs: &mut [&mut [f32]]) {
        // SAFETY: the path's features and the matcher's shapes per this function's contract;
        // `quads_rows` checks the lengths.
        self.split(x, rows, outputs, |x, rows, outs| unsafe { self.quads_rows(x, rows, outs) });
    }

    /// `rows` rows of `x` into `outputs` on a VNNI path: the rows quantised to u8 (`k` padded
    /// to a multiple of 4; the pad meets the zero weights past k, so it adds nothing whatever
    /// it holds), then for each block of rows
    /// (their bytes stay in L2 while every panel of weights passes over them) and each panel
    /// pair (or the last single panel), micro-kernels of up to 12 (512) or 6 (256) rows.
    ///
    /// # Safety
    /// The path's CPU features present; the weights packed as quads; every output's N a
    /// multiple of [`QUAD_PANEL`] (the matcher).
    unsafe fn quads_rows(&self, x: &[f32], rows: usize, outputs: &mut [&mut [f32]]) {
        let w = &*self.weights;
        let (k, k_quads) = (w.k, w.k.div_ceil(4));
        let stride = k_quads * 4;
        let wide = self.path == Int8Path::Vnni512;
        assert!(x.len() == rows * k && w.quads.len() == w.n.div_ceil(QUAD_PANEL) * k_quads * QUAD_PANEL * 4);
        for (out, &n) in outputs.iter().zip(&self.outputs) {
            assert!(n.is_multiple_of(QUAD_PANEL) && out.len() == rows * n);
        }
        let mr = if wide { QUAD_MR_512 } else { QUAD_MR_256 };
        let block = ((256 << 10) / stride / mr * mr).clamp(mr, 8 * mr);
        let panel_bytes = k_quads * QUAD_PANEL * 4;
        QUANTISED.with_borrow_mut(|q| {
            // Not cleared: the k values of every row are written below, and the pad bytes
            // after them (left from an earlier call) meet zero weights.
            q.resize(rows * stride, 0);
            for (x, q) in x.chunks_exact(k).zip(q.chunks_exact_mut(stride)) {
                // SAFETY: the path's features per this function's contract (AVX-512F with
                // VNNI-512, AVX2 with AVX-VNNI); `q` is at least as long as `x`.
                unsafe { if wide { self.quantize_avx512(x, q) } else { self.quantize_u8_avx2(x, q) } }
            }
            for r0 in (0..rows).step_by(block) {
                let mc = (rows - r0).min(block);
                let mut col0 = 0;
                for (out, &n) in outputs.iter_mut().zip(&self.outputs) {
                    let e = Epilogue { zp: &w.zp_colsum, scale: &w.scale, bias: &w.bias, rows: &[] };
                    let wp = &w.quads[(col0 / QUAD_PANEL) * panel_bytes..][..n / QUAD_PANEL * panel_bytes];
                    // SAFETY: the path's features per this function's contract; `q` holds
                    // rows r0..r0 + mc of `stride` bytes, `out` (stride n) as many rows.
                    unsafe {
                        quads_product(
                            self.path,
                            &q[r0 * stride..][..mc * stride],
                            k_quads,
                            wp,
                            &e.at(col0, n, 0, 0),
                            &mut out[r0 * n..][..mc * n],
                            n,
                        )
                    };
                    col0 += n;
                }
            }
        })
    }

    /// `rows` rows of `x` into `outputs` (each `rows` rows of its N).
    ///
    /// # Safety
    /// AVX2 present; the weights packed for [`Int8Path::Avx2`]; every output's N a multiple
    /// of [`PAIR_PANEL`] (the matcher).
    #[target_feature(enable = "avx2")]
    unsafe fn pairs_rows(&self, x: &[f32], rows: usize, outputs: &mut [&mut [f32]]) {
        let w = &*self.weights;
        let (k, k_pairs) = (w.k, w.k.div_ceil(2));
        let stride = k_pairs * 2;
        assert!(x.len() == rows * k && w.pairs.len() == w.n.div_ceil(PAIR_PANEL) * k_pairs * PAIR_PANEL * 2);
        for (out, &n) in outputs.iter().zip(&self.outputs) {
            assert!(n.is_multiple_of(PAIR_PANEL) && out.len() == rows * n);
        }
        // Rows per block: their i16 values (up to 256 KiB) stay in L2 while every panel of
        // weights passes over them.
        let block = ((256 << 10) / (stride * 2) / PAIR_MR * PAIR_MR).clamp(PAIR_MR, 72);
        QUANTISED_PAIRS.with_borrow_mut(|q| {
            q.clear();
            q.resize(rows * stride, 0);
            for (x, q) in x.chunks_exact(k).zip(q.chunks_exact_mut(stride)) {
                // SAFETY: AVX2 per this function's contract; `q` is at least as long as `x`.
                unsafe { self.quantize_avx2(x, q) };
            }
            for r0 in (0..rows).step_by(block) {
                let mc = (rows - r0).min(block);
                let mut col0 = 0;
                for (out, &n) in outputs.iter_mut().zip(&self.outputs) {
                    for local in (0..n).step_by(PAIR_PANEL) {
                        let col = col0 + local;
                        let wp = w.pairs[(col / PAIR_PANEL) * k_pairs * PAIR_PANEL * 2..].as_ptr();
                        let mut r = r0;
                        while r < r0 + mc {
                            let count = (r0 + mc - r).min(PAIR_MR);
                            let a = q[r * stride..].as_ptr();
                            let y = out[r * n + local..].as_mut_ptr();
                            let e = Epilogue {
                                zp: &w.zp_colsum[col..],
                                scale: &w.scale[col..],
                                bias: &w.bias[col..],
                                rows: &[],
                            };
                            // SAFETY: rows r..r + count of `q` (stride `stride`, k_pairs pairs
                            // each) and of the output (16 columns from `local`, stride n, in
                            // bounds: n is a multiple of 16); the panel holds k_pairs x 32
                            // i16; `e` holds 16 values each (col + 16 <= N in all).
                            unsafe {
                                match count {
                                    6 => pairs_kernel::<6>(a, stride, k_pairs, wp, &e, y, n),
                                    5 => pairs_kernel::<5>(a, stride, k_pairs, wp, &e, y, n),
                                    4 => pairs_kernel::<4>(a, stride, k_pairs, wp, &e, y, n),
                                    3 => pairs_kernel::<3>(a, stride, k_pairs, wp, &e, y, n),
                                    2 => pairs_kernel::<2>(a, stride, k_pairs, wp, &e, y, n),
                                    _ => pairs_kernel::<1>(a, stride, k_pairs, wp, &e, y, n),
                                }
                            }
                            r += count;
                        }
                    }
                    col0 += n;
                }
            }
        })
    }

    /// 16 values from `x` through [`Int8Linear::quantize`], as the u16 words of `packus_epi32`
    /// (per 128-bit lane: values 0-3 8-11 | 4-7 12-15).
    ///
    /// # Safety
    /// AVX2 present; `x` readable for 16 floats.
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize16_avx2(&self, x: *const f32) -> std::arch::x86_64::__m256i {
        use std::arch::x86_64::*;
        let (inv, off, lo, hi) = (
            _mm256_set1_ps(self.inv_scale),
            _mm256_set1_ps(self.offset),
            _mm256_set1_ps(self.lo),
            _mm256_set1_ps(self.hi),
        );
        // max(v, lo) and min(v, hi) with the variable first: a NaN gives the bound, as
        // f32::max / f32::min do. Mul then Add, two roundings, as tract.
        let clip = |v: __m256| _mm256_min_ps(_mm256_max_ps(_mm256_add_ps(_mm256_mul_ps(v, inv), off), lo), hi);
        // SAFETY: `x` readable for 16 floats per this function's contract: two loads of 8.
        let (a, b) = unsafe { (_mm256_loadu_ps(x), _mm256_loadu_ps(x.add(8))) };
        _mm256_packus_epi32(_mm256_cvttps_epi32(clip(a)), _mm256_cvttps_epi32(clip(b)))
    }

    /// [`Int8Linear::quantize`] over `x` into `q` as i16, 16 lanes at a time; `q[x.len()..]`
    /// (the pad of an odd k) set to 0.
    ///
    /// # Safety
    /// AVX2 present; `q` at least as long as `x`.
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(&self, x: &[f32], q: &mut [i16]) {
        use std::arch::x86_64::*;
        assert!(q.len() >= x.len());
        let whole = x.len() / 16 * 16;
        for (x, q) in x[..whole].chunks_exact(16).zip(q[..whole].chunks_exact_mut(16)) {
            // SAFETY: AVX2 per this function's contract; chunks of exactly 16 values: 64 bytes
            // read, 32 written.
            unsafe {
                let words = self.quantize16_avx2(x.as_ptr());
                // Words 0-3 8-11 4-7 12-15 (as 64-bit quarters), put back in order.
                let packed = _mm256_permute4x64_epi64::<0b11_01_10_00>(words);
                _mm256_storeu_si256(q.as_mut_ptr() as *mut __m256i, packed);
            }
        }
        for (q, &x) in q[whole..].iter_mut().zip(&x[whole..]) {
            *q = self.quantize(x) as i16;
        }
        q[x.len()..].iter_mut().for_each(|q| *q = 0);
    }

    /// [`Int8Linear::quantize`] over `x` into `q` as u8, 16 lanes at a time.
    ///
    /// # Safety
    /// AVX2 present; `q` at least as long as `x`.
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_u8_avx2(&self, x: &[f32], q: &mut [u8]) {
        use std::arch::x86_64::*;
        assert!(q.len() >= x.len());
        let whole = x.len() / 16 * 16;
        for (x, q) in x[..whole].chunks_exact(16).zip(q[..whole].chunks_exact_mut(16)) {
            // SAFETY: AVX2 per this function's contract; chunks of exactly 16 values: 64 bytes
            // read, 16 written.
            unsafe {
                let words = self.quantize16_avx2(x.as_ptr());
                // Those words as bytes (twice per lane): dwords 0-3 8-11 0-3 8-11 | 4-7 12-15
                // ..., put back in order.
                let bytes = _mm256_packus_epi16(words, words);
                let ordered = _mm256_permutevar8x32_epi32(bytes, _mm256_setr_epi32(0, 4, 1, 5, 0, 0, 0, 0));
                _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, _mm256_castsi256_si128(ordered));
            }
        }
        for (q, &x) in q[whole..].iter_mut().zip(&x[whole..]) {
            *q = self.quantize(x);
        }
    }
}

/// The per-channel terms of 16 output columns: `(acc - zp) * scale + bias`, or with a scale
/// per row as well (`rows`, one per row of the micro-kernel: the int8 attention products,
/// whose rows are quantised each with its own scale) `((acc - zp) * scale) * rows[r]`; an
/// empty `bias` adds nothing.
#[cfg(target_arch = "x86_64")]
struct Epilogue<'a> {
    zp: &'a [i32],
    scale: &'a [f32],
    bias: &'a [f32],
    rows: &'a [f32],
}

#[cfg(target_arch = "x86_64")]
impl Epilogue<'_> {
    /// The terms of `cols` columns from column `col` and of `count` rows from row `row`
    /// (each slice's length checked).
    fn at(&self, col: usize, cols: usize, row: usize, count: usize) -> Epilogue<'_> {
        assert!(self.zp.len() >= col + cols && self.scale.len() >= col + cols);
        assert!(self.bias.is_empty() || self.bias.len() >= col + cols);
        assert!(self.rows.is_empty() || self.rows.len() >= row + count);
        Epilogue {
            zp: &self.zp[col..],
            scale: &self.scale[col..],
            bias: if self.bias.is_empty() { &[] } else { &self.bias[col..] },
            rows: if self.rows.is_empty() { &[] } else { &self.rows[row..] },
        }
    }
}

/// `R` rows x 16 channels: `a` the rows' i16 activations (stride `sa`, `k_pairs` pairs), `w` a
/// panel of [`Weights::pairs`]; the i32 sums through `e` into `y` (row stride `ys`).
///
/// # Safety
/// AVX2 present; `a` readable for `R` rows of `2 * k_pairs` i16 at stride `sa`; `w` for
/// `k_pairs * 32` i16; `e`'s slices at least 16 long; `y` writable for `R` rows of 16 f32 at
/// stride `ys`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn pairs_kernel<const R: usize>(
    a: *const i16,
    sa: usize,
    k_pairs: usize,
    w: *const i16,
    e: &Epilogue,
    y: *mut f32,
    ys: usize,
) {
    use std::arch::x86_64::*;
    assert!(e.zp.len() >= 16 && e.scale.len() >= 16);
    // SAFETY: the contract above covers every offset: rows `r < R`, pairs `p < k_pairs`, the
    // panel's 32 i16 per pair, 16 columns of y.
    unsafe {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for p in 0..k_pairs {
            let w0 = _mm256_loadu_si256(w.add(p * 32) as *const __m256i);
            let w1 = _mm256_loadu_si256(w.add(p * 32 + 16) as *const __m256i);
            for (r, acc) in acc.iter_mut().enumerate() {
                let pair = (a.add(r * sa + 2 * p) as *const i32).read_unaligned();
                let v = _mm256_set1_epi32(pair);
                acc[0] = _mm256_add_epi32(acc[0], _mm256_madd_epi16(v, w0));
                acc[1] = _mm256_add_epi32(acc[1], _mm256_madd_epi16(v, w1));
            }
        }
        store16_avx2(&acc, e, y, ys);
    }
}

/// `R` rows x 16 channels of i32 sums (two ymm per row) through `e` into `y` (row stride
/// `ys`): `(acc - zp) * scale + bias`, the product and the sum rounded separately as tract does.
///
/// # Safety
/// AVX2 present; `e`'s slices at least 16 long; `y` writable for `R` rows of 16 f32 at stride
/// `ys`.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn store16_avx2<const R: usize>(
    acc: &[[std::arch::x86_64::__m256i; 2]; R],
    e: &Epilogue,
    y: *mut f32,
    ys: usize,
) {
    use std::arch::x86_64::*;
    assert!(e.zp.len() >= 16 && e.scale.len() >= 16 && (e.bias.is_empty() || e.bias.len() >= 16));
    assert!(e.rows.is_empty() || e.rows.len() >= R);
    // SAFETY: the contract above and the asserts: 16 values of each of e's slices (R of
    // `rows`), R rows of 16 f32 of y.
    unsafe {
        for half in 0..2 {
            let zp = _mm256_loadu_si256(e.zp[half * 8..].as_ptr() as *const __m256i);
            let scale = _mm256_loadu_ps(e.scale[half * 8..].as_ptr());
            for (r, acc) in acc.iter().enumerate() {
                let mut v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(acc[half], zp)), scale);
                if !e.rows.is_empty() {
                    v = _mm256_mul_ps(v, _mm256_set1_ps(e.rows[r]));
                }
                if !e.bias.is_empty() {
                    v = _mm256_add_ps(v, _mm256_loadu_ps(e.bias[half * 8..].as_ptr()));
                }
                _mm256_storeu_ps(y.add(r * ys + half * 8), v);
            }
        }
    }
}

/// `y = a . w` through `e` on a VNNI `path`: `a` rows of `4 * k_quads` u8 (one after the
/// other), `w` the quads of `y`'s columns (a multiple of [`QUAD_PANEL`], from `w[0]`), `y` as
/// many rows at row stride `ys` (its first `16 x panels` columns written); `e` from the first
/// column (and, with row scales, from the first row). Per pair of panels (or the last single
/// one) on [`Int8Path::Vnni512`], per panel on [`Int8Path::Vnni256`], the rows by micro-kernels
/// of [`QUAD_MR_512`] or [`QUAD_MR_256`].
///
/// # Safety
/// `path` is [`Int8Path::Vnni512`] or [`Int8Path::Vnni256`] and its CPU features are present
/// (the lengths are checked here).
#[cfg(target_arch = "x86_64")]
unsafe fn quads_product(path: Int8Path, a: &[u8], k_quads: usize, w: &[i8], e: &Epilogue, y: &mut [f32], ys: usize) {
    let stride = k_quads * 4;
    let panel_bytes = k_quads * QUAD_PANEL * 4;
    let (wide, mr) = match path {
        Int8Path::Vnni512 => (true, QUAD_MR_512),
        Int8Path::Vnni256 => (false, QUAD_MR_256),
        other => unreachable!("quads_product on {other:?}"),
    };
    if stride == 0 || panel_bytes == 0 {
        return;
    }
    let (rows, cols) = (a.len() / stride, w.len() / panel_bytes * QUAD_PANEL);
    assert!(a.len() == rows * stride && w.len() == cols / QUAD_PANEL * panel_bytes);
    assert!(rows == 0 || y.len() >= (rows - 1) * ys + cols);
    let mut local = 0;
    while local < cols {
        let panels = if wide && cols - local >= 2 * QUAD_PANEL { 2 } else { 1 };
        let wp = w[(local / QUAD_PANEL) * panel_bytes..].as_ptr();
        let mut r = 0;
        while r < rows {
            let count = (rows - r).min(mr);
            let e = e.at(local, panels * QUAD_PANEL, r, count);
            let (a, y) = (a[r * stride..].as_ptr(), y[r * ys + local..].as_mut_ptr());
            // SAFETY: rows r..r + count of `a` (stride `stride`, k_quads quads each) and of
            // `y` (16 x `panels` columns from `local`, stride ys: the asserts above);
            // `panels` panels of k_quads x 64 bytes from `wp`; `e` checked by `at`; the
            // path's features per this function's contract.
            unsafe {
                if wide {
                    quads_512(count, panels, a, stride, k_quads, wp, panel_bytes, &e, y, ys)
                } else {
                    quads_256(count, a, stride, k_quads, wp, &e, y, ys)
                }
            }
            r += count;
        }
        local += panels * QUAD_PANEL;
    }
}

/// `count` (1..=12) rows x `P` (1 or 2) panels of 16 channels on AVX-512 VNNI: `a` the rows'
/// u8 activations (stride `sa`, `k_quads` quads), `w` the first panel of [`Weights::quads`]
/// (the next `ws` bytes on); the i32 sums through `e` into `y` (row stride `ys`).
///
/// # Safety
/// AVX-512F and AVX-512 VNNI present; `a` readable for `count` rows of `4 * k_quads` bytes at
/// stride `sa`; `w` for `panels` panels of `k_quads * 64` bytes `ws` apart; `e`'s slices at
/// least `16 * panels` long; `y` writable for `count` rows of `16 * panels` f32 at stride `ys`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn quads_512(
    count: usize,
    panels: usize,
    a: *const u8,
    sa: usize,
    k_quads: usize,
    w: *const i8,
    ws: usize,
    e: &Epilogue,
    y: *mut f32,
    ys: usize,
) {
    macro_rules! go {
        ($($r:literal)*) => {
            match (count, panels) {
                $(($r, 2) => quads_kernel_512::<$r, 2>(a, sa, k_quads, w, ws, e, y, ys),)*
                $(($r, _) => quads_kernel_512::<$r, 1>(a, sa, k_quads, w, ws, e, y, ys),)*
                _ => unreachable!("{count} rows"),
            }
        };
    }
    // SAFETY: the contract above, for the kernel of these rows and panels.
    unsafe { go!(1 2 3 4 5 6 7 8 9 10 11 12) }
}

/// [`quads_512`] for `R` rows and `P` panels.
///
/// # Safety
/// As [`quads_512`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx512f,avx512vnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn quads_kernel_512<const R: usize, const P: usize>(
    a: *const u8,
    sa: usize,
    k_quads: usize,
    w: *const i8,
    ws: usize,
    e: &Epilogue,
    y: *mut f32,
    ys: usize,
) {
    use std::arch::x86_64::*;
    assert!(e.zp.len() >= 16 * P && e.scale.len() >= 16 * P && (e.bias.is_empty() || e.bias.len() >= 16 * P));
    assert!(e.rows.is_empty() || e.rows.len() >= R);
    // SAFETY: the contract above covers every offset: rows `r < R`, quads `q < k_quads`, 64
    // bytes per quad of each of the `P` panels, 16 x P columns of y.
    unsafe {
        let mut acc = [[_mm512_setzero_si512(); P]; R];
        for q in 0..k_quads {
            let mut wv = [_mm512_setzero_si512(); P];
            for (j, wv) in wv.iter_mut().enumerate() {
                *wv = _mm512_loadu_si512(w.add(j * ws + q * 64) as *const _);
            }
            for (r, acc) in acc.iter_mut().enumerate() {
                let quad = _mm512_set1_epi32((a.add(r * sa + 4 * q) as *const i32).read_unaligned());
                for (acc, wv) in acc.iter_mut().zip(&wv) {
                    *acc = _mm512_dpbusd_epi32(*acc, quad, *wv);
                }
            }
        }
        for j in 0..P {
            let zp = _mm512_loadu_si512(e.zp[j * 16..].as_ptr() as *const _);
            let scale = _mm512_loadu_ps(e.scale[j * 16..].as_ptr());
            for (r, acc) in acc.iter().enumerate() {
                let mut v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[j], zp)), scale);
                if !e.rows.is_empty() {
                    v = _mm512_mul_ps(v, _mm512_set1_ps(e.rows[r]));
                }
                if !e.bias.is_empty() {
                    v = _mm512_add_ps(v, _mm512_loadu_ps(e.bias[j * 16..].as_ptr()));
                }
                _mm512_storeu_ps(y.add(r * ys + j * 16), v);
            }
        }
    }
}

/// `count` (1..=6) rows x 16 channels on AVX-VNNI (ymm): as [`quads_512`] with one panel.
///
/// # Safety
/// AVX2 and AVX-VNNI present; `a` readable for `count` rows of `4 * k_quads` bytes at stride
/// `sa`; `w` for `k_quads * 64` bytes; `e`'s slices at least 16 long; `y` writable for `count`
/// rows of 16 f32 at stride `ys`.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,avxvnni")]
#[allow(clippy::too_many_arguments)]
unsafe fn quads_256(
    count: usize,
    a: *const u8,
    sa: usize,
    k_quads: usize,
    w: *const i8,
    e: &Epilogue,
    y: *mut f32,
    ys: usize,
) {
    // SAFETY: the contract above, for the kernel of these rows.
    unsafe {
        match count {
            6 => quads_kernel_256::<6>(a, sa, k_quads, w, e, y, ys),
            5 => quads_kernel_256::<5>(a, sa, k_quads, w, e, y, ys),
            4 => quads_kernel_256::<4>(a, sa, k_quads, w, e, y, ys),
            3 => quads_kernel_256::<3>(a, sa, k_quads, w, e, y, ys),
            2 => quads_kernel_256::<2>(a, sa, k_quads, w, e, y, ys),
            _ => quads_kernel_256::<1>(a, sa, k_quads, w, e, y, ys),
        }
    }
}

/// [`quads_256`] for `R` rows.
///
/// # Safety
/// As [`quads_256`].
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,avxvnni")]
unsafe fn quads_kernel_256<const R: usize>(
    a: *const u8,
    sa: usize,
    k_quads: usize,
    w: *const i8,
    e: &Epilogue,
    y: *mut f32,
    ys: usize,
) {
    use std::arch::x86_64::*;
    // SAFETY: the contract above covers every offset: rows `r < R`, quads `q < k_quads`, the
    // panel's 64 bytes per quad, 16 columns of y.
    unsafe {
        let mut acc = [[_mm256_setzero_si256(); 2]; R];
        for q in 0..k_quads {
            let w0 = _mm256_loadu_si256(w.add(q * 64) as *const __m256i);
            let w1 = _mm256_loadu_si256(w.add(q * 64 + 32) as *const __m256i);
            for (r, acc) in acc.iter_mut().enumerate() {
                let quad = _mm256_set1_epi32((a.add(r * sa + 4 * q) as *const i32).read_unaligned());
                acc[0] = _mm256_dpbusd_avx_epi32(acc[0], quad, w0);
                acc[1] = _mm256_dpbusd_avx_epi32(acc[1], quad, w1);
            }
        }
        store16_avx2(&acc, e, y, ys);
    }
}

impl Int8Linear {
    /// [`Int8Linear::quantize`] over `x` into `q`, 16 lanes at a time.
    ///
    /// # Safety
    /// AVX-512F present; `q` at least as long as `x`.
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    unsafe fn quantize_avx512(&self, x: &[f32], q: &mut [u8]) {
        use std::arch::x86_64::*;
        let (inv, off, lo, hi) = (
            _mm512_set1_ps(self.inv_scale),
            _mm512_set1_ps(self.offset),
            _mm512_set1_ps(self.lo),
            _mm512_set1_ps(self.hi),
        );
        let whole = x.len() / 16 * 16;
        for (x, q) in x[..whole].chunks_exact(16).zip(q[..whole].chunks_exact_mut(16)) {
            // SAFETY: `x` and `q` chunks of exactly 16 values: 64 bytes read, 16 written.
            unsafe {
                let v = _mm512_loadu_ps(x.as_ptr());
                // max(v, lo) and min(v, hi) with the variable first: a NaN gives the bound,
                // as f32::max / f32::min do.
                let v = _mm512_min_ps(_mm512_max_ps(_mm512_add_ps(_mm512_mul_ps(v, inv), off), lo), hi);
                let bytes = _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(v));
                _mm_storeu_si128(q.as_mut_ptr() as *mut __m128i, bytes);
            }
        }
        for (q, &x) in q[whole..].iter_mut().zip(&x[whole..]) {
            *q = self.quantize(x);
        }
    }
}

/// The first `rows` rows of a 32x32 i32 block to f32 into `out` (row stride `n`):
/// `(acc - zp) * scale + bias`, the product and the sum rounded separately as tract does.
///
/// # Safety
/// AVX-512F present (the lengths are checked here).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn epilogue(block: &Block, rows: usize, zp: &[i32], scale: &[f32], bias: &[f32], out: &mut [f32], n: usize) {
    use std::arch::x86_64::*;
    assert!(zp.len() >= N_BLOCK && scale.len() >= N_BLOCK && bias.len() >= N_BLOCK);
    assert!(rows == 0 || out.len() >= (rows - 1) * n + N_BLOCK);
    // SAFETY: the asserts above: 32 values of zp, scale and bias, `rows <= 32` rows of the
    // block, and `rows` rows of 32 values of `out` at stride n; `block` is 64-byte aligned
    // (aligned loads at multiples of 16 i32).
    unsafe {
        for half in 0..2 {
            let zp = _mm512_loadu_si512(zp[half * 16..].as_ptr() as *const _);
            let scale = _mm512_loadu_ps(scale[half * 16..].as_ptr());
            let bias = _mm512_loadu_ps(bias[half * 16..].as_ptr());
            for r in 0..rows {
                let acc = _mm512_load_si512(block.0[r * N_BLOCK + half * 16..].as_ptr() as *const _);
                let y = _mm512_add_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc, zp)), scale), bias);
                _mm512_storeu_ps(out.as_mut_ptr().add(r * n + half * 16), y);
            }
        }
    }
}

thread_local! {
    /// [`Int8Path::Avx2`]'s quantised rows as i16 (reused between calls).
    static QUANTISED_PAIRS: std::cell::RefCell<Vec<i16>> = const { std::cell::RefCell::new(Vec::new()) };
    /// The quantised rows, padded to a multiple of 32 rows (reused between calls).
    static QUANTISED: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct Block([i32; N_BLOCK * N_BLOCK]);

/// `ldtilecfg` operand: palette 1, tiles 0-7 of 16 rows x 64 bytes.
#[cfg(target_arch = "x86_64")]
#[repr(C, align(64))]
struct TileConfig {
    palette: u8,
    start_row: u8,
    reserved: [u8; 14],
    colsb: [u16; 16],
    rows: [u8; 16],
    reserved2: [u8; 16],
}

#[cfg(target_arch = "x86_64")]
impl TileConfig {
    fn new() -> TileConfig {
        let mut config = TileConfig {
            palette: 1,
            start_row: 0,
            reserved: [0; 14],
            colsb: [0; 16],
            rows: [0; 16],
            reserved2: [0; 16],
        };
        for tile in 0..8 {
            config.colsb[tile] = 64;
            config.rows[tile] = 16;
        }
        config
    }
}

/// One 32x32 i32 block of `A . B` into `c` (row stride 32): `a0`, `a1` the two 16-row halves
/// of A (u8, row stride `stride_a` bytes), `b0`, `b1` the packed tiles of two 16-column groups
/// of B (s8), `k_blocks` tiles of 64 k each. Tiles must be configured (`ldtilecfg`).
///
/// # Safety
/// AMX-INT8, tiles configured as [`TileConfig::new`]; `k_blocks >= 1` (the loop runs once
/// before it tests the count); `a0` and `a1` readable for 16 rows of `64 * k_blocks` bytes at
/// stride `stride_a`, `b0` and `b1` for `k_blocks` KiB, `c` writable for 32 x 32 i32.
#[cfg(target_arch = "x86_64")]
#[inline]
unsafe fn tile_block(
    a0: *const u8,
    a1: *const u8,
    stride_a: usize,
    b0: *const i8,
    b1: *const i8,
    k_blocks: usize,
    c: *mut i32,
) {
    // SAFETY: the contract above covers every tile load and store.
    unsafe {
        std::arch::asm!(
            "tilezero tmm0",
            "tilezero tmm1",
            "tilezero tmm2",
            "tilezero tmm3",
            "mov {s}, 64",
            "2:",
            "tileloadd tmm4, [{a0} + {sa}*1]",
            "tileloadd tmm5, [{a1} + {sa}*1]",
            "tileloadd tmm6, [{b0} + {s}*1]",
            "tileloadd tmm7, [{b1} + {s}*1]",
            "tdpbusd tmm0, tmm4, tmm6",
            "tdpbusd tmm1, tmm4, tmm7",
            "tdpbusd tmm2, tmm5, tmm6",
            "tdpbusd tmm3, tmm5, tmm7",
            "add {a0}, 64",
            "add {a1}, 64",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {kb}",
            "jnz 2b",
            "mov {s}, 128",
            "tilestored [{c} + {s}*1], tmm0",
            "lea {t}, [{c} + 64]",
            "tilestored [{t} + {s}*1], tmm1",
            "lea {t}, [{c} + 2048]",
            "tilestored [{t} + {s}*1], tmm2",
            "lea {t}, [{c} + 2112]",
            "tilestored [{t} + {s}*1], tmm3",
            a0 = inout(reg) a0 => _,
            a1 = inout(reg) a1 => _,
            b0 = inout(reg) b0 => _,
            b1 = inout(reg) b1 => _,
            kb = inout(reg) k_blocks => _,
            sa = in(reg) stride_a,
            c = in(reg) c,
            s = out(reg) _,
            t = out(reg) _,
            options(nostack),
        );
    }
}

/// The non-const input of a binary op `kind` whose other input is a constant, and that constant.
fn bin_with_const<'m>(model: &'m TypedModel, node: &TypedNode, kind: &str) -> Option<(OutletId, &'m Arc<Tensor>)> {
    let op = node.op_as::<TypedBinOp>()?;
    if op.0.name() != kind || node.inputs.len() != 2 {
        return None;
    }
    for (var, konst) in [(0, 1), (1, 0)] {
        if let Some(value) = model.outlet_fact(node.inputs[konst]).ok()?.konst.as_ref() {
            return Some((node.inputs[var], value));
        }
    }
    None
}

fn scalar_f32(t: &Tensor) -> Option<f32> {
    if t.len() != 1 || t.datum_type() != f32::datum_type() {
        return None;
    }
    t.cast_to_scalar::<f32>().ok()
}

/// The only consumer of `node`'s single output, if there is exactly one.
fn single_successor(model: &TypedModel, node: usize) -> Option<&TypedNode> {
    let node = model.node(node);
    if node.outputs.len() != 1 || node.outputs[0].successors.len() != 1 {
        return None;
    }
    Some(model.node(node.outputs[0].successors[0].node))
}

fn const_of(model: &TypedModel, outlet: OutletId) -> Option<Arc<Tensor>> {
    model.outlet_fact(outlet).ok()?.konst.clone()
}

/// One quantised matmul chain after the u8 cast: `(weights [k][n], zp, scale, bias, output)`.
type Chain = (Vec<i8>, u8, Vec<f32>, Vec<f32>, OutletId);

fn match_chain(model: &TypedModel, einsum: &TypedNode, input: OutletId, k: usize) -> Option<Chain> {
    let op = einsum.op_as::<EinSum>()?;
    if format!("{op:?}") != "EinSum amk,kn,,,,,,,->amn (I32)" || einsum.inputs.len() != 9 {
        return None;
    }
    if einsum.inputs[0] != input {
        return None;
    }
    let w = const_of(model, einsum.inputs[1])?;
    if w.datum_type() != i8::datum_type() || w.rank() != 2 || w.shape()[0] != k {
        return None;
    }
    let n = w.shape()[1];
    let params: Vec<Arc<Tensor>> = (2..9).map(|ix| const_of(model, einsum.inputs[ix])).collect::<Option<_>>()?;
    // bias, a0, a_scale, b0, b_scale, c0, c_scale: only a0 (the input's zero point) may be set.
    let is_int = |t: &Tensor, v: i64| t.len() == 1 && t.cast_to_scalar::<i64>().ok() == Some(v);
    let is_float = |t: &Tensor, v: f32| t.len() == 1 && t.cast_to_scalar::<f32>().ok() == Some(v);
    if !(is_int(&params[0], 0)
        && params[1].datum_type() == u8::datum_type()
        && params[1].len() == 1
        && is_float(&params[2], 1.0)
        && is_int(&params[3], 0)
        && is_float(&params[4], 1.0)
        && is_int(&params[5], 0)
        && is_float(&params[6], 1.0))
    {
        return None;
    }
    let zp = *params[1].try_as_plain_ram().ok()?.to_scalar::<u8>().ok()?;
    let cast = single_successor(model, einsum.id)?;
    if cast.op_as::<Cast>()?.to != f32::datum_type() {
        return None;
    }
    let mul = single_successor(model, cast.id)?;
    let (_, scale) = bin_with_const(model, mul, "Mul")?;
    let add = single_successor(model, mul.id)?;
    let (_, bias) = bin_with_const(model, add, "Add")?;
    let per_channel = |t: &Tensor| -> Option<Vec<f32>> {
        if t.datum_type() != f32::datum_type() || t.shape().iter().rev().skip(1).any(|&d| d != 1) {
            return None;
        }
        let values = t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec();
        match values.len() {
            1 => Some(vec![values[0]; n]),
            len if len == n => Some(values),
            _ => None,
        }
    };
    let (scale, bias) = (per_channel(scale)?, per_channel(bias)?);
    let out_fact = model.outlet_fact(OutletId::new(add.id, 0)).ok()?;
    if out_fact.datum_type != f32::datum_type() || out_fact.rank() != 3 {
        return None;
    }
    let weights = w.try_as_plain_ram().ok()?.as_slice::<i8>().ok()?.to_vec();
    Some((weights, zp, scale, bias, OutletId::new(add.id, 0)))
}

/// Matmuls reading one quantised tensor, or one row range of it (tract splits the fusion
/// layers' matmuls over the token axis): one [`Int8Linear`] on `x` (sliced like the u8 tensor).
struct Group {
    slice: Option<Slice>,
    op: Int8Linear,
    replaced: Vec<OutletId>,
}

/// The groups reading the u8 cast `cast_u8` and their f32 input, if every consumer of the
/// cast is such a matmul (or a row slice feeding only such matmuls).
fn match_groups(model: &TypedModel, cast_u8: &TypedNode, path: Int8Path) -> Option<(OutletId, Vec<Group>)> {
    let amx = path == Int8Path::Amx;
    if cast_u8.op_as::<Cast>()?.to != u8::datum_type() {
        return None;
    }
    let min = model.node(cast_u8.inputs[0].node);
    let (max_out, hi) = bin_with_const(model, min, "Min")?;
    let max = model.node(max_out.node);
    let (add_out, lo) = bin_with_const(model, max, "Max")?;
    let add = model.node(add_out.node);
    let (mul_out, offset) = bin_with_const(model, add, "Add")?;
    let mul = model.node(mul_out.node);
    let (x, inv_scale) = bin_with_const(model, mul, "Mul")?;
    let (hi, lo, offset, inv_scale) = (scalar_f32(hi)?, scalar_f32(lo)?, scalar_f32(offset)?, scalar_f32(inv_scale)?);
    // `as u8` is tract's cast only where the clipped values are in [0, 256).
    if !(lo >= 0.0 && hi < 256.0 && lo <= hi) {
        return None;
    }
    let x_fact = model.outlet_fact(x).ok()?;
    if x_fact.datum_type != f32::datum_type() || x_fact.rank() != 3 {
        return None;
    }
    let k = x_fact.shape[2].to_usize().ok()?;
    if (amx && !amx_takes_k(k)) || (path != Int8Path::Portable && k == 0) {
        return None;
    }
    let mut sets: Vec<(Option<Slice>, Vec<Chain>)> = vec![(None, vec![])];
    for succ in &cast_u8.outputs[0].successors {
        let node = model.node(succ.node);
        if let Some(slice) = node.op_as::<Slice>() {
            if slice.axis >= 2 || node.outputs[0].successors.is_empty() {
                return None;
            }
            let chains = node.outputs[0]
                .successors
                .iter()
                .map(|s| match_chain(model, model.node(s.node), OutletId::new(node.id, 0), k))
                .collect::<Option<Vec<_>>>()?;
            sets.push((Some(slice.clone()), chains));
        } else {
            sets[0].1.push(match_chain(model, node, OutletId::new(cast_u8.id, 0), k)?);
        }
    }
    let mut groups = vec![];
    for (slice, chains) in sets {
        if chains.is_empty() {
            continue;
        }
        let whole = |n: usize| match path {
            Int8Path::Amx => n.is_multiple_of(N_BLOCK),
            Int8Path::Avx2 => n > 0 && n.is_multiple_of(PAIR_PANEL),
            Int8Path::Vnni512 | Int8Path::Vnni256 => n > 0 && n.is_multiple_of(QUAD_PANEL),
            Int8Path::Portable => true,
        };
        if chains.iter().any(|c| c.1 != chains[0].1 || !whole(c.2.len())) {
            return None;
        }
        let zp = chains[0].1;
        let n_total: usize = chains.iter().map(|c| c.2.len()).sum();
        let mut plain = vec![0i8; k * n_total];
        let (mut scale, mut bias, mut outputs, mut replaced) = (vec![], vec![], vec![], vec![]);
        let mut col0 = 0;
        for (w, _, s, b, out) in chains {
            let n = s.len();
            for kk in 0..k {
                plain[kk * n_total + col0..][..n].copy_from_slice(&w[kk * n..][..n]);
            }
            scale.extend(s);
            bias.extend(b);
            outputs.push(n);
            replaced.push(out);
            col0 += n;
        }
        let weights = Arc::new(Weights::new(k, plain, zp, scale, bias, path));
        let op = Int8Linear { inv_scale, offset, lo, hi, outputs, weights, path };
        groups.push(Group { slice, op, replaced });
    }
    (!groups.is_empty()).then_some((x, groups))
}

/// Whether the AMX path can run an inner dimension of `k`: whole tiles of 64, and at least
/// one, since `tile_block` runs its loop once before testing the count (`dec; jnz`): with
/// k = 0 it would never end.
fn amx_takes_k(k: usize) -> bool {
    k > 0 && k.is_multiple_of(K_BLOCK)
}

/// Replaces each quantised weight-matmul group of a decluttered model by one [`Int8Linear`]
/// on `path`; returns how many were replaced. The op checks the CPU again before each AMX or
/// AVX2 call (and runs the portable code where it lacks them).
pub fn fuse(model: &mut TypedModel, path: Int8Path) -> TractResult<usize> {
    let mut fused = 0;
    loop {
        let mut found = None;
        for id in model.eval_order()? {
            if let Some(groups) = match_groups(model, model.node(id), path) {
                found = Some((id, groups));
                break;
            }
        }
        let Some((id, (x, groups))) = found else { break };
        let name = model.node(id).name.clone();
        let mut patch = TypedModelPatch::default();
        let tap = patch.tap_model(model, x)?;
        for (ix, group) in groups.into_iter().enumerate() {
            let input = match group.slice {
                Some(slice) => patch.wire_node(format!("{name}.int8_slice{ix}"), slice, &[tap])?[0],
                None => tap,
            };
            let outs = patch.wire_node(format!("{name}.int8_linear{ix}"), group.op, &[input])?;
            for (old, new) in group.replaced.iter().zip(outs) {
                patch.shunt_outside(model, *old, new)?;
            }
            fused += 1;
        }
        patch.apply(model)?;
        model.compact()?;
    }
    Ok(fused)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_rng::Lcg;
    use tract_onnx::tract_core::ops::{cast::cast, einsum::EinSum, math};

    fn konst(model: &mut TypedModel, name: &str, t: Tensor) -> OutletId {
        model.add_const(name, t).unwrap()
    }

    /// tract's form of `quantize.py`'s chain: x -> u8 quantiser -> one int8 matmul per
    /// `ns` entry (per-channel scale, bias), every output a model output.
    fn chain(shape: [usize; 3], ns: &[(Option<(usize, usize)>, usize)], seed: u64) -> TypedModel {
        let mut rng = Lcg(seed);
        let k = shape[2];
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).unwrap();
        let scalar = |v: f32| tensor3(&[[[v]]]);
        let inv = konst(&mut model, "inv", scalar(31.3));
        let off = konst(&mut model, "off", scalar(121.5));
        let lo = konst(&mut model, "lo", scalar(0.0));
        let hi = konst(&mut model, "hi", scalar(255.25));
        let y = model.wire_node("q.mul", math::mul(), &[x, inv]).unwrap()[0];
        let y = model.wire_node("q.add", math::add(), &[y, off]).unwrap()[0];
        let y = model.wire_node("q.max", math::max(), &[y, lo]).unwrap()[0];
        let y = model.wire_node("q.min", math::min(), &[y, hi]).unwrap()[0];
        let q = model.wire_node("q.cast", cast(u8::datum_type()), &[y]).unwrap()[0];
        let zero_i32 = konst(&mut model, "zero_i32", tensor0(0i32));
        let one = konst(&mut model, "one", tensor0(1f32));
        let zp = konst(&mut model, "zp", tensor0(121u8));
        let mut outputs = vec![];
        for (ix, &(rows, n)) in ns.iter().enumerate() {
            let input = match rows {
                Some((start, end)) => {
                    let slice = Slice::new(1, start, end);
                    model.wire_node(format!("slice{ix}"), slice, &[q]).unwrap()[0]
                }
                None => q,
            };
            let w: Vec<i8> = (0..k * n).map(|_| (rng.next() * 127.0) as i8).collect();
            let w = konst(&mut model, &format!("w{ix}"), tensor1(&w).into_shape(&[k, n]).unwrap());
            let einsum = EinSum::newq("amk,kn,,,,,,,->amn".parse().unwrap(), i32::datum_type(), i32::datum_type());
            let acc = model
                .wire_node(format!("mm{ix}"), einsum, &[input, w, zero_i32, zp, one, zero_i32, one, zero_i32, one])
                .unwrap()[0];
            let f = model.wire_node(format!("mm{ix}.cast"), cast(f32::datum_type()), &[acc]).unwrap()[0];
            let scale: Vec<f32> = (0..n).map(|_| (rng.next().abs() + 0.5) * 3e-5).collect();
            let scale = konst(&mut model, &format!("scale{ix}"), tensor1(&scale).into_shape(&[1, 1, n]).unwrap());
            let bias: Vec<f32> = (0..n).map(|_| rng.next() * 0.02).collect();
            let bias = konst(&mut model, &format!("bias{ix}"), tensor1(&bias).into_shape(&[1, 1, n]).unwrap());
            let f = model.wire_node(format!("mm{ix}.mul"), math::mul(), &[f, scale]).unwrap()[0];
            let f = model.wire_node(format!("mm{ix}.add"), math::add(), &[bias, f]).unwrap()[0];
            outputs.push(f);
        }
        model.select_output_outlets(&outputs).unwrap();
        model
    }

    fn run(model: TypedModel, x: &Tensor) -> Vec<Tensor> {
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        plan.run(tvec!(x.clone().into_tvalue())).unwrap().into_iter().map(|t| t.into_tensor()).collect()
    }

    /// The fused op against tract's own optimized plan of the same graph: equal within one f32
    /// rounding of the largest output (in practice bit-identical); on 3 threads bit-identical
    /// to 1.
    fn check(shape: [usize; 3], ns: &[(Option<(usize, usize)>, usize)], groups: usize, path: Int8Path) {
        let model = chain(shape, ns, 7);
        let mut rng = Lcg(11);
        let len = shape.iter().product();
        // Activations as a LayerNorm leaves them, a few past the calibrated range (clipped).
        let x: Vec<f32> = (0..len).map(|_| rng.next() * 5.0).collect();
        let x = tensor1(&x).into_shape(&shape).unwrap();
        let mut fused = model.clone();
        assert_eq!(fuse(&mut fused, path).unwrap(), groups);
        assert!(fused.nodes.iter().all(|n| n.op_as::<EinSum>().is_none()), "einsums replaced");
        let want = run(model, &x);
        let got = run(fused.clone(), &x);
        let pool = tract_linalg::multithread::Executor::multithread(3);
        let threaded = tract_linalg::multithread::multithread_tract_scope(pool, || run(fused, &x));
        assert_eq!(want.len(), got.len());
        for ((want, got), threaded) in want.iter().zip(&got).zip(&threaded) {
            assert_eq!(want.shape(), got.shape());
            let want = want.try_as_plain_ram().unwrap();
            let want = want.as_slice::<f32>().unwrap();
            let got = got.try_as_plain_ram().unwrap();
            let got = got.as_slice::<f32>().unwrap();
            let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
            let worst = want.iter().zip(got).fold(0f32, |m, (a, b)| m.max((a - b).abs()));
            assert!(worst <= largest * f32::EPSILON, "{path:?}: worst {worst} (largest {largest})");
            let threaded = threaded.try_as_plain_ram().unwrap();
            let threaded = threaded.as_slice::<f32>().unwrap();
            assert!(got.iter().zip(threaded).all(|(a, b)| a.to_bits() == b.to_bits()), "{path:?}: 3 threads");
        }
    }

    const ALL: Option<(usize, usize)> = None;

    /// One matmul of [`chain`]: the rows of the quantised input it reads (all: `ALL`), its N.
    type Matmul = (Option<(usize, usize)>, usize);

    /// The paths this CPU runs, each with whether it is here.
    fn paths() -> Vec<(Int8Path, bool)> {
        Int8Path::ALL.into_iter().map(|path| (path, path.supported())).collect()
    }

    #[test]
    fn qkv_group_matches_tract() {
        let qkv = [(ALL, 128), (ALL, 128), (ALL, 128)];
        for (path, here) in paths() {
            if here {
                check([1, 129, 128], &qkv, 1, path);
            }
        }
    }

    #[test]
    fn long_k_and_batches_match_tract() {
        for (path, here) in paths() {
            if here {
                check([2, 133, 512], &[(ALL, 128)], 1, path);
                check([3, 4, 128], &[(ALL, 512)], 1, path);
                check([1, 1, 64], &[(ALL, 32)], 1, path);
            }
        }
        // AVX2: an odd k (the pad of the last pair), a k whose rows do not fit one L2 block
        // (fewer rows per block), N of 16.
        if avx2_available() {
            check([1, 50, 77], &[(ALL, 48)], 1, Int8Path::Avx2);
            check([1, 300, 3072], &[(ALL, 32)], 1, Int8Path::Avx2);
            check([2, 9, 64], &[(ALL, 16), (ALL, 32)], 1, Int8Path::Avx2);
        }
        // VNNI: a k that is not a multiple of 4 (the pad of the last quad), N of 48 (a pair of
        // panels and a single one on 512), rows that do not fit one block, N of 16.
        for path in [Int8Path::Vnni512, Int8Path::Vnni256] {
            if path.supported() {
                check([1, 50, 77], &[(ALL, 48)], 1, path);
                check([1, 50, 78], &[(ALL, 16), (ALL, 80)], 1, path);
                check([1, 300, 3072], &[(ALL, 32)], 1, path);
                check([2, 9, 64], &[(ALL, 16), (ALL, 32)], 1, path);
            }
        }
    }

    #[test]
    fn row_slices_of_the_quantised_input_match_tract() {
        // A fusion layer as tract splits it: K and V over all 133 tokens, Q over 0..129 and
        // 129..133 apart.
        let layer = [(ALL, 128), (Some((0, 129)), 128), (ALL, 128), (Some((129, 133)), 128)];
        check([1, 133, 128], &layer, 3, Int8Path::Portable);
        for (path, here) in paths() {
            if here {
                check([2, 133, 128], &layer, 3, path);
            }
        }
    }

    /// Regression (#20): the matcher took k = 0 for AMX (0 is a multiple of 64), and
    /// `tile_block`'s loop, which runs once before testing its count, never ended. (A graph
    /// with k = 0 cannot be built to show it: tract folds the empty product to a constant
    /// while wiring, so the predicate the matcher uses is checked itself.)
    #[test]
    fn empty_k_is_not_taken_for_amx() {
        assert!(!amx_takes_k(0));
        assert!(!amx_takes_k(100));
        assert!(amx_takes_k(64) && amx_takes_k(768));
    }

    /// The int8 paths against tract's plan (each where the CPU has it, else reported as not
    /// available, past the harness's capture like f32fuse's path tests).
    #[test]
    fn kernel_paths_int8_match_tract() {
        use std::io::Write as _;
        let layer = [(ALL, 128), (Some((0, 129)), 128), (ALL, 128), (Some((129, 133)), 128)];
        let cases: [([usize; 3], &[Matmul], usize); 4] = [
            ([1, 129, 128], &[(ALL, 128), (ALL, 128), (ALL, 128)], 1),
            ([2, 133, 512], &[(ALL, 128)], 1),
            ([3, 4, 128], &[(ALL, 512)], 1),
            ([2, 133, 128], &layer, 3),
        ];
        for (path, here) in paths() {
            let name = format!("{path:?}").to_lowercase();
            let line = if !here {
                format!("kernel path {name} (int8): not available on this CPU; not run")
            } else {
                cases.iter().for_each(|(shape, ns, groups)| check(*shape, ns, *groups, path));
                format!(
                    "kernel path {name} (int8): {} int8 patterns equal to tract's plan, 3 threads bit-identical to 1",
                    cases.len()
                )
            };
            let _ = writeln!(std::io::stderr(), "{line}");
        }
    }

    #[test]
    fn f32_matmuls_and_other_shapes_are_left_alone() {
        // An N that is not a multiple of 32 is not taken for AMX.
        let mut model = chain([1, 16, 128], &[(ALL, 48)], 3);
        assert_eq!(fuse(&mut model, Int8Path::Amx).unwrap(), 0);
        // Nor one that is not a multiple of 16 for AVX2 and VNNI.
        for path in [Int8Path::Avx2, Int8Path::Vnni512, Int8Path::Vnni256] {
            let mut model = chain([1, 16, 128], &[(ALL, 40)], 3);
            assert_eq!(fuse(&mut model, path).unwrap(), 0, "{path:?}");
        }
        // A plain f32 matmul is never touched.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 8, 64])).unwrap();
        let w = konst(&mut model, "w", Tensor::zero::<f32>(&[64, 32]).unwrap());
        let y = model.wire_node("mm", EinSum::new("amk,kn->amn".parse().unwrap(), f32::datum_type()), &[x, w]).unwrap();
        model.select_output_outlets(&y).unwrap();
        let before = format!("{model:?}");
        assert_eq!(fuse(&mut model, Int8Path::Amx).unwrap(), 0);
        assert_eq!(format!("{model:?}"), before);
    }
}
