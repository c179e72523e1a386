//! Fused f32 ops for the CPU backend (scalar, AVX2 + FMA and AVX-512 paths).
//!
//! tract runs each softmax of the rewritten model (`python -m mbt rewrite`: the row max by
//! `MaxPool`) as eight ops (`Reshape`, `MaxPool`, `Reshape`, `Sub`, `Exp`, `ReduceSum`,
//! `Recip`, `Mul`), each LayerNorm as six (`ReduceSum`, `Mul`, `Sub`, `RmsNorm`, `Mul`, `Add`),
//! its tanh `Gelu` as a scalar loop, and each weight matmul as an activation packing op and
//! a 16x12 kernel over the transposed product. At edge-small's sizes (d = 128, 129 tokens)
//! dispatch, packing and passes over memory cost as much as the arithmetic. [`fuse`] replaces
//! each such chain of a decluttered model by one op:
//!
//! - [`RowOp`] (`SoftmaxRows`, `LayerNormRows`, `GeluTanh`): the whole chain in registers, one
//!   row at a time. The arithmetic is the chain's, in f32: the same max, `exp(x - max)`, a sum
//!   and one reciprocal; the mean as `sum * (1/n)`, the variance of the centred row and
//!   `d / sqrt(var + eps) * gamma + beta`; `0.5 x (1 + tanh(y)) = x / (1 + exp(-2y))` with
//!   `y = sqrt(2/pi) (x + 0.044715 x^3)` (closer to exact than tract's tanh: 1e-7 vs 4e-6).
//! - [`Linear`] (`LinearF32`): `x . W + bias`, and the GELU after fc1, as one op: weights
//!   packed once at load in panels of 32 columns, an FMA kernel reading the activations in
//!   place (no packing), bias and GELU applied before the store. Each output is one f32 FMA
//!   chain over k, then the bias, as in tract's kernel. The residual `Add` that follows the
//!   attention's output projection and fc2 is folded in as a second input, added to each
//!   part's rows after the product.
//! - [`PatchLinear`] (`PatchLinearF32`): a patch-embedding conv (stride = kernel, no padding,
//!   dilation or groups: MBT's video and audio tokenizers) as the patches copied out as rows
//!   and one [`Linear`] product, in the conv's output layout.
//! - [`HeadProduct`] (`AttnScores`, `AttnMix`): attention's per-head products Q . K^T and
//!   P . V on the same kernel, the second operand packed per head at each call, reading Q
//!   and P in place and writing the mix straight into the `[tokens, heads, d]` layout.
//! - [`Attention`] (`AttnSoftmaxMix`): a head's scores, softmax and mix as one op (also per
//!   row slice where tract split the scores over query rows), a block of query rows at a
//!   time, so the scores tensor is never written out; the same kernels in the same order as
//!   the three ops. The softmax may be the rewrite's or tract's own `Softmax`.
//!
//! Each op carries the [`Kernel`] path it was fused for (`kernel.rs`: chosen at load, by
//! default the best this CPU has, forced with `MBT_EDGE_KERNEL`): portable Rust, AVX2 + FMA
//! (`f32fuse/avx2.rs`: a 6x16 micro-kernel, cache-blocked for the paper-size model) or
//! AVX-512F (a 12x32 micro-kernel). Every op splits its output rows (or heads) over the
//! model's thread pool (`kernel::split_rows`). Results differ from tract's by float rounding
//! only (sums in another order, exp by a degree-6 polynomial accurate to about 1 ulp; unit
//! tests below run every path this CPU has against tract's own plan). [`fuse`] refuses a path
//! the CPU lacks, and each op checks again before it runs a SIMD path. Anything that does
//! not match exactly is left untouched.

use std::collections::HashMap;
use std::sync::Arc;

use tract_onnx::prelude::*;
use tract_onnx::tract_core::internal::*;
use tract_onnx::tract_core::ops::Cost;
use tract_onnx::tract_core::ops::array::Slice;
use tract_onnx::tract_core::ops::binary::TypedBinOp;
use tract_onnx::tract_core::ops::change_axes::AxisOp;
use tract_onnx::tract_core::ops::cnn::{Conv, MaxPool, PaddingSpec};
use tract_onnx::tract_core::ops::einsum::EinSum;
use tract_onnx::tract_core::ops::element_wise::{ElementWiseMiniOp, ElementWiseOp};
use tract_onnx::tract_core::ops::math::{Exp, Recip};
use tract_onnx::tract_core::ops::nn::{DataFormat, GeluApproximate, Reduce, Reducer, RmsNorm, Softmax, SoftmaxKind};

#[cfg(target_arch = "x86_64")]
mod avx2;
/// The vector exp of the AVX2 and AVX-512 paths, and the AVX2 path's horizontal sum, max and
/// tail mask (for the int8 attention's softmax).
#[cfg(target_arch = "x86_64")]
pub(super) use {
    avx2::{exp as exp8, max8, sum8, tail_mask as tail_mask8},
    avx512::exp as exp16,
};

use super::int8::{Int8Path, attention as attention8};
use super::kernel::{Kernel, split_rows};

/// Which fused op: they all map rows of the last axis to rows of the same length.
#[derive(Clone, Debug, PartialEq)]
enum Kind {
    Softmax,
    Gelu,
    LayerNorm { gamma: Vec<f32>, beta: Vec<f32>, eps: f32 },
}

/// One row op over the last axis of an f32 tensor; see the module doc.
#[derive(Clone, Debug, PartialEq)]
pub struct RowOp {
    kind: Kind,
    kernel: Kernel,
}

impl Eq for RowOp {}

impl Op for RowOp {
    fn name(&self) -> StaticName {
        match self.kind {
            Kind::Softmax => "SoftmaxRows".into(),
            Kind::Gelu => "GeluTanh".into(),
            Kind::LayerNorm { .. } => "LayerNormRows".into(),
        }
    }

    op_as_typed_op!();
}

impl EvalOp for RowOp {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let input = args_1!(inputs);
        let mut t = input.into_tensor();
        let shape = t.shape().to_vec();
        let n = *shape.last().context("row op on a scalar")?;
        if let Kind::LayerNorm { gamma, .. } = &self.kind {
            ensure!(gamma.len() == n, "LayerNormRows: rows of {n}, gamma of {}", gamma.len());
        }
        if n > 0 {
            let mut view = t.try_as_plain_ram_mut()?;
            let data = view.as_slice_mut::<f32>()?;
            self.run(data, n);
        }
        Ok(tvec!(t.into_tvalue()))
    }
}

impl TypedOp for RowOp {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type() && inputs[0].rank() >= 1);
        Ok(tvec!(f32::fact(inputs[0].shape.clone())))
    }
}

impl RowOp {
    /// The op over `data`, rows of `n`, split over the model's threads.
    fn run(&self, data: &mut [f32], n: usize) {
        // GELU is elementwise: any row length splits it.
        let unit = if self.kind == Kind::Gelu { PANEL } else { n };
        split_rows(data, unit, data.len() * 8, |_, rows| self.run_rows(rows, n));
    }

    fn run_rows(&self, data: &mut [f32], n: usize) {
        #[cfg(target_arch = "x86_64")]
        let kernel = checked(self.kernel);
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx512 {
            // SAFETY: `checked` confirmed AVX-512F on this CPU.
            unsafe {
                match &self.kind {
                    Kind::Softmax => data.chunks_exact_mut(n).for_each(|row| avx512::softmax(row)),
                    Kind::Gelu => avx512::gelu(data),
                    Kind::LayerNorm { gamma, beta, eps } => {
                        data.chunks_exact_mut(n).for_each(|row| avx512::layer_norm(row, gamma, beta, *eps))
                    }
                }
            }
            return;
        }
        #[cfg(target_arch = "x86_64")]
        if kernel == Kernel::Avx2 {
            // SAFETY: `checked` confirmed AVX2 and FMA on this CPU.
            unsafe {
                match &self.kind {
                    Kind::Softmax => data.chunks_exact_mut(n).for_each(|row| avx2::softmax(row)),
                    Kind::Gelu => avx2::gelu(data),
                    Kind::LayerNorm { gamma, beta, eps } => {
                        data.chunks_exact_mut(n).for_each(|row| avx2::layer_norm(row, gamma, beta, *eps))
                    }
                }
            }
            return;
        }
        match &self.kind {
            Kind::Softmax => data.chunks_exact_mut(n).for_each(scalar::softmax),
            Kind::Gelu => data.iter_mut().for_each(|x| *x = scalar::gelu(*x)),
            Kind::LayerNorm { gamma, beta, eps } => {
                data.chunks_exact_mut(n).for_each(|row| scalar::layer_norm(row, gamma, beta, *eps))
            }
        }
    }
}

/// The f32 path `kernel` runs on: its own where this CPU has it, else (never the case for an
/// op [`fuse`] built, which refuses such paths) the scalar one, so that no instruction the
/// CPU lacks is ever executed.
fn checked(kernel: Kernel) -> Kernel {
    let path = kernel.f32_path();
    if path.supported() {
        path
    } else {
        debug_assert!(false, "{kernel} path on a CPU without it");
        Kernel::Scalar
    }
}

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_A: f32 = 0.044715;
/// exp's argument is clamped to this range (below: 0 within 1e-38; above: overflow).
const EXP_LO: f32 = -87.3;
const EXP_HI: f32 = 88.7;
/// exp(r) for `|r| <= ln2/2`: the degree-6 polynomial closest to it in relative error, highest
/// power first (fitted by reweighted least squares: 1.9e-9, and 7.3e-8 after f32 Horner with
/// FMA, against 6.3e-8 for Taylor's degree 7, one FMA more).
const EXP_POLY: [f32; 7] = [1.383_684_6e-3, 8.374_816e-3, 4.166_822_5e-2, 0.166_664_2, 0.499_999_9, 1.0, 1.0];
/// GELU's `-2 sqrt(2/pi) (x + a x^3)` as `x (C1 + C3 x^2)`: the argument of its exp.
const GELU_C1: f32 = -2.0 * SQRT_2_OVER_PI;
const GELU_C3: f32 = -2.0 * SQRT_2_OVER_PI * GELU_A;

mod scalar {
    use super::*;

    pub fn softmax(row: &mut [f32]) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0f32;
        for x in row.iter_mut() {
            *x = (*x - max).exp();
            sum += *x;
        }
        let inv = 1.0 / sum;
        row.iter_mut().for_each(|x| *x *= inv);
    }

    pub fn gelu(x: f32) -> f32 {
        let y = SQRT_2_OVER_PI * (x + GELU_A * x * x * x);
        x / (1.0 + (-2.0 * y).clamp(EXP_LO, EXP_HI).exp())
    }

    pub fn layer_norm(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let inv_n = 1.0 / row.len() as f32;
        let mean = row.iter().sum::<f32>() * inv_n;
        row.iter_mut().for_each(|x| *x -= mean);
        let var = row.iter().map(|d| d * d).sum::<f32>() * inv_n;
        let inv = 1.0 / (var + eps).sqrt();
        for ((x, g), b) in row.iter_mut().zip(gamma).zip(beta) {
            *x = *x * inv * g + b;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::*;
    use std::arch::x86_64::*;

    /// exp of 16 lanes: `2^n * p(r)`, `x = n ln2 + r`, `|r| <= ln2/2`, p = [`EXP_POLY`].
    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn exp(x: __m512) -> __m512 {
        let x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(EXP_LO)), _mm512_set1_ps(EXP_HI));
        let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm512_mul_ps(
            x,
            _mm512_set1_ps(std::f32::consts::LOG2_E),
        ));
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_145_75), x);
        let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428_606_8e-6), r);
        let mut p = _mm512_set1_ps(EXP_POLY[0]);
        for c in &EXP_POLY[1..] {
            p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(*c));
        }
        _mm512_scalef_ps(p, n)
    }

    #[target_feature(enable = "avx512f")]
    pub fn softmax(row: &mut [f32]) {
        let n = row.len();
        let whole = n / 16 * 16;
        let tail = ((1u32 << (n - whole)) - 1) as __mmask16;
        let p = row.as_mut_ptr();
        // SAFETY: loads and stores at `p + i` with `i + 16 <= whole <= n`, or at `p + whole`
        // masked to the `n - whole` lanes left: all inside `row`.
        unsafe {
            let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
            for i in (0..whole).step_by(16) {
                vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(p.add(i)));
            }
            if tail != 0 {
                vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_maskz_loadu_ps(tail, p.add(whole)));
            }
            let max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
            let mut vsum = _mm512_setzero_ps();
            for i in (0..whole).step_by(16) {
                let e = exp(_mm512_sub_ps(_mm512_loadu_ps(p.add(i)), max));
                _mm512_storeu_ps(p.add(i), e);
                vsum = _mm512_add_ps(vsum, e);
            }
            if tail != 0 {
                let e = exp(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, p.add(whole)), max));
                _mm512_mask_storeu_ps(p.add(whole), tail, e);
                vsum = _mm512_mask_add_ps(vsum, tail, vsum, e);
            }
            let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(vsum));
            for i in (0..whole).step_by(16) {
                _mm512_storeu_ps(p.add(i), _mm512_mul_ps(_mm512_loadu_ps(p.add(i)), inv));
            }
            if tail != 0 {
                _mm512_mask_storeu_ps(
                    p.add(whole),
                    tail,
                    _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p.add(whole)), inv),
                );
            }
        }
    }

    #[inline]
    #[target_feature(enable = "avx512f")]
    pub fn gelu16(x: __m512) -> __m512 {
        let t = _mm512_fmadd_ps(_mm512_set1_ps(GELU_C3), _mm512_mul_ps(x, x), _mm512_set1_ps(GELU_C1));
        let e = exp(_mm512_mul_ps(x, t));
        _mm512_div_ps(x, _mm512_add_ps(_mm512_set1_ps(1.0), e))
    }

    #[target_feature(enable = "avx512f")]
    pub fn gelu(data: &mut [f32]) {
        let whole = data.len() / 16 * 16;
        let p = data.as_mut_ptr();
        // SAFETY: 16 floats at `p + i` with `i + 16 <= whole <= data.len()`.
        unsafe {
            for i in (0..whole).step_by(16) {
                _mm512_storeu_ps(p.add(i), gelu16(_mm512_loadu_ps(p.add(i))));
            }
        }
        data[whole..].iter_mut().for_each(|x| *x = scalar::gelu(*x));
    }

    #[target_feature(enable = "avx512f")]
    pub fn layer_norm(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
        let n = row.len();
        if !n.is_multiple_of(16) || gamma.len() != n || beta.len() != n {
            return scalar::layer_norm(row, gamma, beta, eps);
        }
        let p = row.as_mut_ptr();
        // SAFETY: `row`, `gamma` and `beta` hold `n` floats, a multiple of 16 (checked above);
        // every access is 16 floats at `i` with `i + 16 <= n`.
        unsafe {
            let mut vsum = _mm512_setzero_ps();
            for i in (0..n).step_by(16) {
                vsum = _mm512_add_ps(vsum, _mm512_loadu_ps(p.add(i)));
            }
            let inv_n = 1.0 / n as f32;
            let mean = _mm512_set1_ps(_mm512_reduce_add_ps(vsum) * inv_n);
            let mut vsq = _mm512_setzero_ps();
            for i in (0..n).step_by(16) {
                let d = _mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mean);
                vsq = _mm512_fmadd_ps(d, d, vsq);
            }
            let var = _mm512_reduce_add_ps(vsq) * inv_n;
            let inv = _mm512_set1_ps(1.0 / (var + eps).sqrt());
            for i in (0..n).step_by(16) {
                let d = _mm512_sub_ps(_mm512_loadu_ps(p.add(i)), mean);
                let y = _mm512_fmadd_ps(
                    _mm512_mul_ps(d, inv),
                    _mm512_loadu_ps(gamma.as_ptr().add(i)),
                    _mm512_loadu_ps(beta.as_ptr().add(i)),
                );
                _mm512_storeu_ps(p.add(i), y);
            }
        }
    }

    /// `y += r` (equal lengths).
    #[target_feature(enable = "avx512f")]
    pub fn add_into(y: &mut [f32], r: &[f32]) {
        assert_eq!(y.len(), r.len());
        let mut ys = y.chunks_exact_mut(16);
        let mut rs = r.chunks_exact(16);
        for (y, r) in (&mut ys).zip(&mut rs) {
            // SAFETY: 16 floats in each chunk.
            unsafe {
                let v = _mm512_add_ps(_mm512_loadu_ps(y.as_ptr()), _mm512_loadu_ps(r.as_ptr()));
                _mm512_storeu_ps(y.as_mut_ptr(), v);
            }
        }
        ys.into_remainder().iter_mut().zip(rs.remainder()).for_each(|(y, r)| *y += *r);
    }

    /// `MR_` rows of `y = x . W + bias` for one panel of up to `16 * NR` columns (`cols`) in
    /// `NR` registers a row (1, for a last panel of at most 16 columns, or 2): `x` at row
    /// stride `xs`, `y` at row stride `ys`, the panel `w` of `k` x 32 (columns past `cols`
    /// are computed but not stored); `bias` null for none.
    ///
    /// # Safety
    /// AVX-512F present; `x` readable for `MR_` rows of `k` values at stride `xs`, `w` for `k`
    /// rows of 32 floats, `bias` (unless null) for 32 floats, `y` writable for `MR_` rows of
    /// `cols` <= 32 values at stride `ys`.
    #[inline]
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn kernel<const MR_: usize, const NR: usize>(
        x: *const f32,
        xs: usize,
        k: usize,
        w: *const f32,
        bias: *const f32,
        gelu: bool,
        y: *mut f32,
        ys: usize,
        cols: usize,
    ) {
        // The epilogue: the accumulators plus the bias (then tanh-GELU with `gelu`) into the
        // `MR_` rows of `y`, masked to `cols` columns. Written out on both paths below, not
        // shared: with one epilogue after a loop that may not run (k = 0), LLVM kept a zeroed
        // copy of the accumulators on the stack and wrote it with a `memset` of 1.4 KiB on
        // every call (1.6-1.9 % of edge-small's samples; about 2 % faster without it).
        macro_rules! store {
            ($acc:expr) => {{
                let (b0, b1) = if bias.is_null() {
                    (_mm512_setzero_ps(), _mm512_setzero_ps())
                } else {
                    (_mm512_loadu_ps(bias), _mm512_loadu_ps(bias.add(16)))
                };
                let m0 = if cols >= 16 { 0xffff } else { ((1u32 << cols) - 1) as __mmask16 };
                let m1 = if cols >= 32 {
                    0xffff
                } else if cols <= 16 {
                    0
                } else {
                    ((1u32 << (cols - 16)) - 1) as __mmask16
                };
                for (r, acc) in $acc.iter().enumerate() {
                    let mut v0 = _mm512_add_ps(acc[0], b0);
                    if gelu {
                        v0 = gelu16(v0);
                    }
                    if NR == 1 {
                        _mm512_mask_storeu_ps(y.add(r * ys), m0, v0);
                        continue;
                    }
                    let mut v1 = _mm512_add_ps(acc[1], b1);
                    if gelu {
                        v1 = gelu16(v1);
                    }
                    if cols >= 32 {
                        _mm512_storeu_ps(y.add(r * ys), v0);
                        _mm512_storeu_ps(y.add(r * ys + 16), v1);
                    } else {
                        _mm512_mask_storeu_ps(y.add(r * ys), m0, v0);
                        _mm512_mask_storeu_ps(y.add(r * ys + 16), m1, v1);
                    }
                }
            }};
        }
        // SAFETY: the contract above covers every offset: rows `r < MR_`, `kk < k`, the
        // panel's 32 columns, 32 bias values, and stores masked to `cols` columns.
        unsafe {
            if k == 0 {
                store!([[_mm512_setzero_ps(); 2]; MR_]);
                return;
            }
            let mut acc = [[_mm512_setzero_ps(); 2]; MR_];
            for kk in 0..k {
                let w0 = _mm512_loadu_ps(w.add(kk * PANEL));
                if NR == 1 {
                    for (r, acc) in acc.iter_mut().enumerate() {
                        acc[0] = _mm512_fmadd_ps(_mm512_set1_ps(*x.add(r * xs + kk)), w0, acc[0]);
                    }
                    continue;
                }
                let w1 = _mm512_loadu_ps(w.add(kk * PANEL + 16));
                for (r, acc) in acc.iter_mut().enumerate() {
                    let a = _mm512_set1_ps(*x.add(r * xs + kk));
                    acc[0] = _mm512_fmadd_ps(a, w0, acc[0]);
                    acc[1] = _mm512_fmadd_ps(a, w1, acc[1]);
                }
            }
            store!(acc);
        }
    }

    /// `rows` rows of one panel: [`kernel`] over blocks of [`MR`] rows, on one register a row
    /// where the panel has at most 16 columns (a last panel: 129 keys are 4 panels and one
    /// column).
    ///
    /// # Safety
    /// As [`kernel`], for `rows` rows.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn panel(
        x: *const f32,
        xs: usize,
        rows: usize,
        k: usize,
        w: *const f32,
        bias: *const f32,
        gelu: bool,
        y: *mut f32,
        ys: usize,
        cols: usize,
    ) {
        let mut r = 0;
        while r < rows {
            // SAFETY: row `r < rows` of x and y, inside the caller's `rows` rows.
            let (xr, yr) = unsafe { (x.add(r * xs), y.add(r * ys)) };
            let block = match ((rows - r).min(MR), cols <= 16) {
                // One register a row, for a one-column (or up to 16) last panel: 12, 8, 4 or 1
                // rows at a time (fewer kernels to build for a rare shape).
                (12, true) => 12,
                (8.., true) => 8,
                (4.., true) => 4,
                (_, true) => 1,
                (block, false) => block,
            };
            // SAFETY: `block` rows from row `r`, `r + block <= rows`: the caller's contract.
            unsafe {
                match (block, cols <= 16) {
                    (12, false) => kernel::<12, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (11, false) => kernel::<11, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (10, false) => kernel::<10, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (9, false) => kernel::<9, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (8, false) => kernel::<8, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (7, false) => kernel::<7, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (6, false) => kernel::<6, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (5, false) => kernel::<5, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (4, false) => kernel::<4, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (3, false) => kernel::<3, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (2, false) => kernel::<2, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (_, false) => kernel::<1, 2>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (12, true) => kernel::<12, 1>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (8, true) => kernel::<8, 1>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (4, true) => kernel::<4, 1>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                    (_, true) => kernel::<1, 1>(xr, xs, k, w, bias, gelu, yr, ys, cols),
                }
            }
            r += block;
        }
    }

    /// `y[rows][n] = x[rows][k] . W + bias` (tanh-GELU after with `gelu`).
    ///
    /// # Safety
    /// AVX-512F present (the lengths are checked here).
    #[target_feature(enable = "avx512f")]
    pub unsafe fn linear(x: &[f32], rows: usize, w: &Panels, bias: &[f32], gelu: bool, y: &mut [f32]) {
        let (k, n) = (w.k, w.n);
        assert!(x.len() >= rows * k && y.len() >= rows * n && bias.len() == n && w.packed.len() == k * n);
        assert_eq!(w.width, PANEL);
        for p in 0..n / PANEL {
            let wp = w.packed[p * k * PANEL..].as_ptr();
            let b = bias[p * PANEL..].as_ptr();
            let yp = y[p * PANEL..].as_mut_ptr();
            // SAFETY: the assert above: `rows` rows of k (x) and of n (y), panel `p` of k x 32
            // weights, 32 bias values and 32 columns of y from `p * 32`, all in bounds.
            unsafe { panel(x.as_ptr(), k, rows, k, wp, b, gelu, yp, n, PANEL) };
        }
    }
}

// ---- weight matmuls ---------------------------------------------------------------------

/// Columns per packed panel of weights: two zmm registers.
const PANEL: usize = 32;
/// Rows of the input per micro-kernel call: 12 rows x 2 registers = 24 accumulators.
#[cfg(target_arch = "x86_64")]
const MR: usize = 12;

/// `y += r`, on the AVX-512 path where `kernel` is it.
fn add_into(kernel: Kernel, y: &mut [f32], r: &[f32]) {
    assert_eq!(y.len(), r.len());
    match checked(kernel) {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `checked` confirmed AVX-512F on this CPU.
        Kernel::Avx512 => unsafe { avx512::add_into(y, r) },
        _ => y.iter_mut().zip(r).for_each(|(y, r)| *y += *r),
    }
}

/// Columns per packed panel of weights on `kernel`'s path: 16 (two ymm registers) on AVX2,
/// [`PANEL`] elsewhere. Whoever packs a panel and whoever reads it ask this of the same kernel.
fn panel_width(kernel: Kernel) -> usize {
    match kernel.f32_path() {
        Kernel::Avx2 => 16,
        _ => PANEL,
    }
}

/// `[k][n]` f32 weights packed in panels of `width` columns: panel `p` holds `k` rows of
/// columns `p*width..(p+1)*width`, contiguous.
#[derive(Debug)]
struct Panels {
    k: usize,
    n: usize,
    width: usize,
    packed: Vec<f32>,
}

impl Panels {
    fn new(k: usize, n: usize, width: usize, plain: &[f32]) -> Panels {
        assert!(n.is_multiple_of(width) && plain.len() == k * n);
        let mut packed = Vec::with_capacity(k * n);
        for p in 0..n / width {
            for kk in 0..k {
                packed.extend_from_slice(&plain[kk * n + p * width..][..width]);
            }
        }
        Panels { k, n, width, packed }
    }
}

/// `y = x . W + bias` over the last axis of `x` (then tanh-GELU with `gelu`): an f32 weight
/// matmul with its bias `Add` (and the GELU that follows fc1) as one op, weights packed once.
/// With `residual`, a second input of the output's shape is added last (the residual `Add`
/// after the attention's output projection and fc2), to each block of rows while it is still
/// in cache.
#[derive(Clone, Debug)]
pub struct Linear {
    weights: Arc<Panels>,
    bias: Vec<f32>,
    gelu: bool,
    residual: bool,
    kernel: Kernel,
}

impl PartialEq for Linear {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.weights, &other.weights)
            && self.gelu == other.gelu
            && self.residual == other.residual
            && self.kernel == other.kernel
            && self.bias.iter().map(|b| b.to_bits()).eq(other.bias.iter().map(|b| b.to_bits()))
    }
}

impl Eq for Linear {}

impl Op for Linear {
    fn name(&self) -> StaticName {
        "LinearF32".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let (w, gelu, residual) = (&self.weights, self.gelu, self.residual);
        Ok(vec![format!("k: {} n: {} gelu: {gelu} residual: {residual} kernel: {}", w.k, w.n, self.kernel)])
    }

    op_as_typed_op!();
}

impl EvalOp for Linear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (k, n) = (self.weights.k, self.weights.n);
        let shape = inputs[0].shape().to_vec();
        let x = inputs[0].try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        ensure!(x.len().is_multiple_of(k), "LinearF32: input shape {shape:?}, K = {k}");
        let rows = x.len() / k;
        let out_shape = self.out_shape(&shape);
        ensure!(inputs.len() == 1 + self.residual as usize, "LinearF32: {} inputs", inputs.len());
        let residual = match inputs.get(1) {
            Some(r) => {
                ensure!(r.shape() == &out_shape[..], "LinearF32: residual {:?}, output {out_shape:?}", r.shape());
                Some(r.try_as_plain_ram()?)
            }
            None => None,
        };
        let residual = residual.as_ref().map(|r| r.as_slice::<f32>()).transpose()?;
        // SAFETY: `run` writes all `rows * n` values before the tensor is read.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?;
            ensure!(y.len() == rows * n);
            self.run_with(x, rows, residual, y);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Linear {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        let fact = inputs[0];
        ensure!(fact.datum_type == f32::datum_type() && fact.rank() >= 2);
        let shape: TVec<TDim> = fact.shape.iter().cloned().collect();
        Ok(tvec!(f32::fact(self.out_shape(&shape))))
    }

    /// One multiply-add per input value and output column (`streams.rs` reads it).
    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        Ok(tvec!((Cost::FMA(f32::datum_type()), inputs[0].shape.volume() * self.weights.n)))
    }
}

impl Linear {
    /// `[a, m, n]` from an input `[a, m, k]` or `[a, m, b, k']` (`b * k' = k`).
    fn out_shape<D: DimLike>(&self, input: &[D]) -> TVec<D> {
        let mut shape: TVec<D> = input[..2].iter().cloned().collect();
        shape.push(D::from(self.weights.n));
        shape
    }

    /// `rows` rows of `x` into `y`, the rows split over the model's threads.
    fn run(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        self.run_with(x, rows, None, y)
    }

    /// [`Self::run`], then `residual` (`rows * n` values) added to each part's rows.
    fn run_with(&self, x: &[f32], rows: usize, residual: Option<&[f32]>, y: &mut [f32]) {
        let (k, n) = (self.weights.k, self.weights.n);
        if n == 0 {
            return;
        }
        split_rows(y, n, rows * k * n, |first, y| {
            let rows = y.len() / n;
            self.run_rows(&x[first * k..][..rows * k], rows, y);
            if let Some(residual) = residual {
                add_into(self.kernel, y, &residual[first * n..][..rows * n]);
            }
        });
    }

    fn run_rows(&self, x: &[f32], rows: usize, y: &mut [f32]) {
        let (k, n, width) = (self.weights.k, self.weights.n, self.weights.width);
        let w = &self.weights.packed;
        match checked(self.kernel) {
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` confirmed AVX-512F on this CPU; `linear` checks the lengths.
            Kernel::Avx512 => unsafe { avx512::linear(x, rows, &self.weights, &self.bias, self.gelu, y) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `checked` confirmed AVX2 and FMA on this CPU; `product` checks the lengths.
            Kernel::Avx2 => unsafe {
                assert_eq!(width, avx2::WIDTH);
                avx2::product(x, k, rows, k, w, &self.bias, self.gelu, y, n, n)
            },
            _ => {
                for r in 0..rows {
                    for col in 0..n {
                        let (p, c) = (col / width, col % width);
                        let mut acc = 0f32;
                        for kk in 0..k {
                            acc = x[r * k + kk].mul_add(w[(p * k + kk) * width + c], acc);
                        }
                        let v = acc + self.bias[col];
                        y[r * n + col] = if self.gelu { scalar::gelu(v) } else { v };
                    }
                }
            }
        }
    }
}

// ---- patch embeddings -------------------------------------------------------------------

/// A convolution whose stride is its kernel (no padding, dilation or groups): a patch
/// embedding, as MBT's video and audio tokenizers are. Each output position reads its own
/// patch, so the conv is one weight matmul over the patches: they are copied out as rows
/// (`[n * ph * pw, c * kh * kw]`, in the input's layout order) and run through [`Linear`];
/// a channels-first output is then transposed per batch entry. tract runs it as `Im2Col`
/// and its own kernel, where a video frame gives a product of only 16 columns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PatchLinear {
    linear: Linear,
    format: DataFormat,
    channels: usize,
    patch: [usize; 2],
}

impl Op for PatchLinear {
    fn name(&self) -> StaticName {
        "PatchLinearF32".into()
    }

    fn info(&self) -> TractResult<Vec<String>> {
        let (p, w) = (self.patch, &self.linear.weights);
        Ok(vec![format!(
            "{:?} patch {}x{} k: {} n: {} kernel: {}",
            self.format, p[0], p[1], w.k, w.n, self.linear.kernel
        )])
    }

    op_as_typed_op!();
}

thread_local! {
    /// The patches as rows, and the product before a channels-first transpose.
    static PATCH_BUFFERS: std::cell::RefCell<[Vec<f32>; 2]> =
        const { std::cell::RefCell::new([Vec::new(), Vec::new()]) };
}

impl PatchLinear {
    /// The input's batch, height and width, and the output's patch rows and columns.
    fn geometry<D: DimLike>(&self, input: &[D]) -> TractResult<(D, [usize; 2], [usize; 2])> {
        let shape = self.format.shape(input.to_vec())?;
        ensure!(shape.hw_rank() == 2 && shape.c().to_usize()? == self.channels, "{}: input {input:?}", self.name());
        let n = shape.n().cloned().unwrap_or_else(|| D::from(1usize));
        let hw = [shape.hw_dims()[0].to_usize()?, shape.hw_dims()[1].to_usize()?];
        ensure!(hw[0] >= self.patch[0] && hw[1] >= self.patch[1], "{}: input {input:?}", self.name());
        Ok((n, hw, [hw[0] / self.patch[0], hw[1] / self.patch[1]]))
    }

    /// Copies the patches of `x` (`n` entries of `hw`) into `rows`, one patch per row, in
    /// the input's order within a patch: `(c, y, x)` channels first, `(y, x, c)` last.
    fn patches(&self, x: &[f32], n: usize, hw: [usize; 2], grid: [usize; 2], rows: &mut [f32]) {
        let ([kh, kw], c) = (self.patch, self.channels);
        let k = c * kh * kw;
        let mut row = 0;
        for b in 0..n {
            for py in 0..grid[0] {
                for px in 0..grid[1] {
                    let out = &mut rows[row * k..][..k];
                    if self.format.c_is_last() {
                        for ky in 0..kh {
                            let from = ((b * hw[0] + py * kh + ky) * hw[1] + px * kw) * c;
                            copy_run(&mut out[ky * kw * c..][..kw * c], &x[from..][..kw * c]);
                        }
                    } else {
                        for ch in 0..c {
                            for ky in 0..kh {
                                let from = ((b * c + ch) * hw[0] + py * kh + ky) * hw[1] + px * kw;
                                copy_run(&mut out[(ch * kh + ky) * kw..][..kw], &x[from..][..kw]);
                            }
                        }
                    }
                    row += 1;
                }
            }
        }
    }
}

/// `dst = src` (equal lengths) in copies of 8 values the compiler writes inline: a patch row
/// is 16 values, and `copy_from_slice` of an unknown length calls `memmove` for each.
#[inline]
fn copy_run(dst: &mut [f32], src: &[f32]) {
    let mut d = dst.chunks_exact_mut(8);
    let mut s = src.chunks_exact(8);
    for (d, s) in (&mut d).zip(&mut s) {
        let s: &[f32; 8] = s.try_into().expect("8 values");
        d.copy_from_slice(s);
    }
    d.into_remainder().copy_from_slice(s.remainder());
}

impl EvalOp for PatchLinear {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let shape = inputs[0].shape().to_vec();
        let (n, hw, grid) = self.geometry(&shape)?;
        let x = inputs[0].try_as_plain_ram()?;
        let x = x.as_slice::<f32>()?;
        ensure!(x.len() == n * self.channels * hw[0] * hw[1], "{}: input {shape:?}", self.name());
        let (k, o) = (self.linear.weights.k, self.linear.weights.n);
        let positions = grid[0] * grid[1];
        let rows = n * positions;
        let out_shape = self.out_shape(&shape)?;
        // SAFETY: every value is written below (the product writes each of its `rows * o`
        // values, or the transpose copies each of them) before the tensor is read.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?;
            ensure!(y.len() == rows * o);
            PATCH_BUFFERS.with_borrow_mut(|[patches, product]| {
                patches.resize(rows * k, 0.0);
                self.patches(x, n, hw, grid, patches);
                if self.format.c_is_last() {
                    self.linear.run(patches, rows, y);
                } else {
                    product.resize(rows * o, 0.0);
                    self.linear.run(patches, rows, product);
                    for (b, entry) in product.chunks_exact(positions * o).enumerate() {
                        let y = &mut y[b * positions * o..][..positions * o];
                        for (p, values) in entry.chunks_exact(o).enumerate() {
                            for (ch, v) in values.iter().enumerate() {
                                y[ch * positions + p] = *v;
                            }
                        }
                    }
                }
            });
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for PatchLinear {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs[0].datum_type == f32::datum_type());
        Ok(tvec!(f32::fact(self.out_shape(&inputs[0].shape.to_tvec())?)))
    }

    /// One multiply-add per patch value and output channel, as [`Linear`].
    fn cost(&self, inputs: &[&TypedFact]) -> TractResult<TVec<(Cost, TDim)>> {
        let (n, _, grid) = self.geometry(&inputs[0].shape.to_tvec())?;
        let w = &self.linear.weights;
        Ok(tvec!((Cost::FMA(f32::datum_type()), n * (grid[0] * grid[1] * w.k * w.n))))
    }
}

impl PatchLinear {
    /// The conv's output shape: the input's layout with `n` output channels on the grid.
    fn out_shape<D: DimLike>(&self, input: &[D]) -> TractResult<TVec<D>> {
        let (n, _, grid) = self.geometry(input)?;
        let shape = self.format.from_n_c_hw(n, D::from(self.linear.weights.n), [D::from(grid[0]), D::from(grid[1])])?;
        Ok(shape.shape)
    }
}

/// A [`PatchLinear`] for `node` if it is an f32 `Conv` with stride = kernel over two spatial
/// axes, no padding, dilation, groups or quantisation, constant weights and bias, known
/// channels and size, and output channels a multiple of [`PANEL`].
fn match_patch_conv(model: &TypedModel, node: &TypedNode, kernel: Kernel) -> Option<PatchLinear> {
    let conv = node.op_as::<Conv>()?;
    let spec = &conv.pool_spec;
    let patch: [usize; 2] = spec.kernel_shape.as_slice().try_into().ok()?;
    let no_padding = match &spec.padding {
        PaddingSpec::Valid => true,
        PaddingSpec::Explicit(before, after) => before.iter().chain(after).all(|p| *p == 0),
        _ => false,
    };
    let strided = spec.strides.as_deref() == Some(&patch[..]) || patch == [1, 1] && spec.strides.is_none();
    let undilated = spec.dilations.as_ref().is_none_or(|d| d.iter().all(|d| *d == 1));
    if conv.group != 1 || conv.q_params.is_some() || !no_padding || !strided || !undilated || node.inputs.len() != 3 {
        return None;
    }
    let input = f32_fact(model, node.inputs[0])?;
    let weights = model.outlet_fact(node.inputs[1]).ok()?.konst.clone()?;
    let bias = model.outlet_fact(node.inputs[2]).ok()?.konst.clone()?;
    if weights.datum_type() != f32::datum_type() || bias.datum_type() != f32::datum_type() || weights.rank() != 4 {
        return None;
    }
    let shape = spec.data_format.shape(input.shape.to_tvec()).ok()?;
    let c = shape.c().to_usize().ok()?;
    let hw = [shape.hw_dims().first()?.to_usize().ok()?, shape.hw_dims().get(1)?.to_usize().ok()?];
    let ws = weights.shape();
    let fmt = conv.kernel_fmt;
    let (o_axis, i_axis, h_axis) = (fmt.o_axis(ws), fmt.i_axis(ws), fmt.h_axis());
    let o = ws[o_axis];
    if ws[i_axis] != c || ws[h_axis..h_axis + 2] != patch || hw[0] < patch[0] || hw[1] < patch[1] {
        return None;
    }
    if !o.is_multiple_of(PANEL) || !(bias.len() == o || bias.len() == 1) {
        return None;
    }
    let (ws, strides) = (weights.try_as_plain_ram().ok()?, weights.strides().to_vec());
    let ws = ws.as_slice::<f32>().ok()?;
    let [kh, kw] = patch;
    let k = c * kh * kw;
    // `[k][o]` in the order `patches` writes a row: (c, y, x) channels first, else (y, x, c).
    let mut plain = vec![0f32; k * o];
    for oc in 0..o {
        for ch in 0..c {
            for ky in 0..kh {
                for kx in 0..kw {
                    let at = oc as isize * strides[o_axis]
                        + ch as isize * strides[i_axis]
                        + ky as isize * strides[h_axis]
                        + kx as isize * strides[h_axis + 1];
                    let row =
                        if spec.data_format.c_is_last() { (ky * kw + kx) * c + ch } else { (ch * kh + ky) * kw + kx };
                    plain[row * o + oc] = ws[at as usize];
                }
            }
        }
    }
    let bias = bias.try_as_plain_ram().ok()?;
    let bias = bias.as_slice::<f32>().ok()?;
    let bias = if bias.len() == o { bias.to_vec() } else { vec![bias[0]; o] };
    let weights = Arc::new(Panels::new(k, o, panel_width(kernel), &plain));
    let linear = Linear { weights, bias, gelu: false, residual: false, kernel };
    Some(PatchLinear { linear, format: spec.data_format, channels: c, patch })
}

/// Replaces each patch-embedding conv by one [`PatchLinear`].
fn fuse_patch_convs(model: &mut TypedModel, kernel: Kernel) -> TractResult<usize> {
    let mut found = vec![];
    for id in model.eval_order()? {
        if let Some(op) = match_patch_conv(model, model.node(id), kernel) {
            found.push((id, op));
        }
    }
    if found.is_empty() {
        return Ok(0);
    }
    let count = found.len();
    let mut patch = TypedModelPatch::default();
    for (id, op) in found {
        let node = model.node(id);
        let input = patch.tap_model(model, node.inputs[0])?;
        let new = patch.wire_node(format!("{}.f32patches", node.name), op, &[input])?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), new)?;
    }
    patch.apply(model)?;
    model.compact()?;
    Ok(count)
}

// ---- attention products -----------------------------------------------------------------

/// The two per-head products of attention, as tract declutters them, on the same kernel as
/// [`Linear`] (the second operand packed per head into a thread-local buffer at each call):
/// `Scores`: `EinSum ambk,anbk->abmn` (Q . K^T per head; Q `[a, m, h, d]`, K `[a, n, h, d]`);
/// `Mix`: `EinSum abmk,akbn->ambn` (P . V per head; P `[a, h, m, k]`, V `[a, k, h, d]`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Heads {
    Scores,
    Mix,
}

/// One of attention's per-head products on a kernel path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HeadProduct {
    heads: Heads,
    kernel: Kernel,
}

impl Op for HeadProduct {
    fn name(&self) -> StaticName {
        match self.heads {
            Heads::Scores => "AttnScores".into(),
            Heads::Mix => "AttnMix".into(),
        }
    }

    op_as_typed_op!();
}

thread_local! {
    /// The packed per-head operand (reused between calls; one per pool thread).
    static HEAD_PANELS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl EvalOp for HeadProduct {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let (l, r) = (inputs[0].shape().to_vec(), inputs[1].shape().to_vec());
        ensure!(l.len() == 4 && r.len() == 4, "{}: inputs {l:?} {r:?}", self.name());
        let lhs = inputs[0].try_as_plain_ram()?;
        let lhs = lhs.as_slice::<f32>()?;
        let rhs = inputs[1].try_as_plain_ram()?;
        let rhs = rhs.as_slice::<f32>()?;
        let out_shape = self.out_shape(&l, &r)?;
        ensure!(lhs.len() == l.iter().product::<usize>() && rhs.len() == r.iter().product::<usize>());
        // SAFETY: every value of the output is written below (`scores` and `mix` cover each
        // output row and column once), before the tensor is read.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?;
            match self.heads {
                Heads::Scores => scores(self.kernel, lhs, rhs, &l, r[1], y),
                Heads::Mix => mix(self.kernel, lhs, rhs, &l, r[3], y),
            }
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for HeadProduct {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.iter().all(|f| f.datum_type == f32::datum_type() && f.rank() == 4));
        let l: TVec<TDim> = inputs[0].shape.iter().cloned().collect();
        let r: TVec<TDim> = inputs[1].shape.iter().cloned().collect();
        Ok(tvec!(f32::fact(self.out_shape(&l, &r)?)))
    }
}

impl HeadProduct {
    fn out_shape<D: DimLike>(&self, l: &[D], r: &[D]) -> TractResult<TVec<D>> {
        match self.heads {
            Heads::Scores => {
                ensure!(l[0] == r[0] && l[2] == r[2] && l[3] == r[3], "AttnScores: {l:?} {r:?}");
                Ok(tvec!(l[0].clone(), l[2].clone(), l[1].clone(), r[1].clone()))
            }
            Heads::Mix => {
                ensure!(l[0] == r[0] && l[1] == r[2] && l[3] == r[1], "AttnMix: {l:?} {r:?}");
                Ok(tvec!(l[0].clone(), l[2].clone(), l[1].clone(), r[3].clone()))
            }
        }
    }
}

/// `S[a][h][i][j] = sum_k Q[a][i][h][k] K[a][j][h][k]`; `q_shape` = `[a, m, h, d]`, K has `n`
/// rows. The (batch, head) pairs are split over the model's threads.
fn scores(kernel: Kernel, q: &[f32], k: &[f32], q_shape: &[usize], n: usize, s: &mut [f32]) {
    let [batch, m, heads, d] = [q_shape[0], q_shape[1], q_shape[2], q_shape[3]];
    let row = heads * d;
    if m * n == 0 {
        return;
    }
    split_rows(s, m * n, batch * heads * m * n * d, |first, s| {
        HEAD_PANELS.with_borrow_mut(|buf| {
            let pw = panel_width(kernel);
            buf.resize(n.div_ceil(pw) * d * pw, 0.0);
            for (ix, sh) in s.chunks_exact_mut(m * n).enumerate() {
                let (a, h) = ((first + ix) / heads, (first + ix) % heads);
                pack_transposed(buf, &k[a * n * row + h * d..], row, n, d, pw);
                let qh = &q[a * m * row + h * d..];
                product(kernel, qh, row, m, d, buf, sh, n, n);
            }
        })
    })
}

/// One head of K (`n` rows of `d` values at row stride `stride`, from `k[0]`) transposed into
/// panels of `pw` columns (one per row of K), `d` rows each, zero past `n`: every value of
/// the first `n.div_ceil(pw)` panels of `buf` is written (no need to clear it first).
fn pack_transposed(buf: &mut [f32], k: &[f32], stride: usize, n: usize, d: usize, pw: usize) {
    for (p, panel) in buf.chunks_exact_mut(d * pw).take(n.div_ceil(pw)).enumerate() {
        let cols = (n - p * pw).min(pw);
        let keys = &k[p * pw * stride..];
        for (r, row) in panel.chunks_exact_mut(pw).enumerate() {
            for (c, value) in row[..cols].iter_mut().enumerate() {
                *value = keys[c * stride + r];
            }
            row[cols..].fill(0.0);
        }
    }
}

/// One head of V (`n` rows of `d` values at row stride `stride`, from `v[0]`) in panels of
/// `pw` columns, `n` rows each, zero past `d`: every value of the first `d.div_ceil(pw)`
/// panels of `buf` is written.
fn pack_rows(buf: &mut [f32], v: &[f32], stride: usize, n: usize, d: usize, pw: usize) {
    for j in 0..n {
        let row = &v[j * stride..][..d];
        for (p, values) in row.chunks(pw).enumerate() {
            let out = &mut buf[(p * n + j) * pw..][..pw];
            out[..values.len()].copy_from_slice(values);
            out[values.len()..].fill(0.0);
        }
    }
}

/// `O[a][i][h][c] = sum_j P[a][h][i][j] V[a][j][h][c]`; `p_shape` = `[a, h, m, k]`, V rows
/// of `heads * d`. The output rows (tokens) are split over the model's threads; each thread
/// packs the heads of V it needs.
fn mix(kernel: Kernel, p: &[f32], v: &[f32], p_shape: &[usize], d: usize, o: &mut [f32]) {
    let [batch, heads, m, k] = [p_shape[0], p_shape[1], p_shape[2], p_shape[3]];
    let row = heads * d;
    if row == 0 || m == 0 {
        return;
    }
    split_rows(o, row, batch * heads * m * k * d, |first, o| {
        HEAD_PANELS.with_borrow_mut(|buf| {
            let pw = panel_width(kernel);
            buf.resize(d.div_ceil(pw) * k * pw, 0.0);
            let (start, end) = (first, first + o.len() / row);
            for a in start / m..end.div_ceil(m) {
                // This chunk's rows of batch entry `a`: tokens i0..i1.
                let (i0, i1) = (start.max(a * m) - a * m, end.min((a + 1) * m) - a * m);
                for h in 0..heads {
                    pack_rows(buf, &v[a * k * row + h * d..], row, k, d, pw);
                    let ph = &p[((a * heads + h) * m + i0) * k..][..(i1 - i0) * k];
                    let oh = &mut o[(a * m + i0 - start) * row + h * d..];
                    product(kernel, ph, k, i1 - i0, k, buf, oh, row, d);
                }
            }
        })
    })
}

/// `y[i][c] = sum_kk x[i * xs + kk] w[kk][c]` for `rows` rows and `cols` columns, `w` packed
/// in panels of [`panel_width`] columns (`k` rows each), `y` at row stride `ys`.
#[allow(clippy::too_many_arguments)]
fn product(
    kernel: Kernel,
    x: &[f32],
    xs: usize,
    rows: usize,
    k: usize,
    w: &[f32],
    y: &mut [f32],
    ys: usize,
    cols: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(x.len() >= (rows - 1) * xs + k);
    let pw = panel_width(kernel);
    assert!(y.len() >= (rows - 1) * ys + cols && w.len() >= cols.div_ceil(pw) * k * pw);
    match checked(kernel) {
        #[cfg(target_arch = "x86_64")]
        Kernel::Avx512 => {
            for p in 0..cols.div_ceil(PANEL) {
                let width = (cols - p * PANEL).min(PANEL);
                let (wp, yp) = (w[p * k * PANEL..].as_ptr(), y[p * PANEL..].as_mut_ptr());
                // SAFETY: `checked` confirmed AVX-512F; the asserts above keep rows `0..rows`
                // of x (k values at stride xs) and of y (columns below `cols` at stride ys),
                // and panel `p` (k rows of 32) in bounds.
                unsafe { avx512::panel(x.as_ptr(), xs, rows, k, wp, std::ptr::null(), false, yp, ys, width) };
            }
        }
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `checked` confirmed AVX2 and FMA; `product` checks the lengths.
        Kernel::Avx2 => unsafe { avx2::product(x, xs, rows, k, w, &[], false, y, ys, cols) },
        _ => {
            for i in 0..rows {
                for c in 0..cols {
                    let (p, cc) = (c / pw, c % pw);
                    let mut acc = 0f32;
                    for kk in 0..k {
                        acc = x[i * xs + kk].mul_add(w[(p * k + kk) * pw + cc], acc);
                    }
                    y[i * ys + c] = acc;
                }
            }
        }
    }
}

/// Attention per head without the scores tensor: `softmax(Q . K^T) . V` for Q `[a, m, h, d]`,
/// K `[a, n, h, d]`, V `[a, n, h, dv]`, out `[a, m, h, dv]`; [`HeadProduct`] `Scores`, the
/// softmax [`RowOp`] and `Mix` in one op, a block of [`ATTENTION_ROWS`] query rows at a time
/// (their scores stay in cache: at vit-base's 1569 tokens the whole scores tensor is 118 MB
/// per layer, written and read five times). The same kernels in the same order as the three
/// ops, so the same bits. Split over the model's threads by heads where they divide evenly
/// (or are many), so that each thread packs only its own heads' K and V; else by query rows.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Attention {
    kernel: Kernel,
    /// Both products in integers on this VNNI path for heads of at least this many keys
    /// (`int8/attention.rs`; int8 models only, set by [`int8_attention`]), else f32 on
    /// `kernel`.
    int8: Option<(Int8Path, usize)>,
}

/// Query rows per block of [`Attention`]: 72 rows of 1569 scores are 450 KiB.
const ATTENTION_ROWS: usize = 72;

impl Op for Attention {
    fn name(&self) -> StaticName {
        if self.int8.is_some() { "AttnSoftmaxMixInt8".into() } else { "AttnSoftmaxMix".into() }
    }

    op_as_typed_op!();
}

thread_local! {
    /// The packed K^T and V of one head, and a block of scores (reused between calls).
    static ATTENTION_BUFFERS: std::cell::RefCell<[Vec<f32>; 4]> =
        const { std::cell::RefCell::new([Vec::new(), Vec::new(), Vec::new(), Vec::new()]) };
}

impl EvalOp for Attention {
    op_out_of_plan!();

    fn eval(&self, _ctx: &EvalContext, inputs: TVec<TValue>) -> TractResult<TVec<TValue>> {
        let shapes: Vec<Vec<usize>> = inputs.iter().map(|t| t.shape().to_vec()).collect();
        let out_shape = self.out_shape(&shapes[0], &shapes[1], &shapes[2])?;
        let views = inputs.iter().map(|t| t.try_as_plain_ram()).collect::<TractResult<Vec<_>>>()?;
        let slices = views.iter().map(|v| v.as_slice::<f32>()).collect::<TractResult<Vec<_>>>()?;
        for (slice, shape) in slices.iter().zip(&shapes) {
            ensure!(slice.len() == shape.iter().product::<usize>());
        }
        // SAFETY: `attention` writes every value of the output (each row, each head's
        // columns) before the tensor is read.
        let mut out = unsafe { Tensor::uninitialized::<f32>(&out_shape)? };
        {
            let mut view = out.try_as_plain_ram_mut()?;
            let y = view.as_slice_mut::<f32>()?;
            let qkv = [slices[0], slices[1], slices[2]];
            attention(self.kernel, self.int8, qkv, &shapes[0], shapes[1][1], shapes[2][3], y);
        }
        Ok(tvec!(out.into_tvalue()))
    }
}

impl TypedOp for Attention {
    as_op!();

    fn output_facts(&self, inputs: &[&TypedFact]) -> TractResult<TVec<TypedFact>> {
        ensure!(inputs.len() == 3 && inputs.iter().all(|f| f.datum_type == f32::datum_type() && f.rank() == 4));
        let [q, k, v] = [0, 1, 2].map(|ix| inputs[ix].shape.iter().cloned().collect::<TVec<TDim>>());
        Ok(tvec!(f32::fact(self.out_shape(&q, &k, &v)?)))
    }
}

impl Attention {
    fn out_shape<D: DimLike>(&self, q: &[D], k: &[D], v: &[D]) -> TractResult<TVec<D>> {
        ensure!(q.len() == 4 && k.len() == 4 && v.len() == 4, "AttnSoftmaxMix: {q:?} {k:?} {v:?}");
        ensure!(q[0] == k[0] && q[2] == k[2] && q[3] == k[3], "AttnSoftmaxMix: Q {q:?} K {k:?}");
        ensure!(v[0] == k[0] && v[1] == k[1] && v[2] == k[2], "AttnSoftmaxMix: K {k:?} V {v:?}");
        Ok(tvec!(q[0].clone(), q[1].clone(), q[2].clone(), v[3].clone()))
    }
}

/// See [`Attention`]; `n` rows of K and V, V's head size `dv`. The output rows (tokens) are
/// split over the model's threads, as in [`mix`].
fn attention(
    kernel: Kernel,
    int8: Option<(Int8Path, usize)>,
    [q, k, v]: [&[f32]; 3],
    q_shape: &[usize],
    n: usize,
    dv: usize,
    o: &mut [f32],
) {
    let [batch, m, heads, d] = [q_shape[0], q_shape[1], q_shape[2], q_shape[3]];
    let (q_row, v_row) = (heads * d, heads * dv);
    if v_row == 0 || m == 0 {
        return;
    }
    assert!(q.len() >= batch * m * q_row && k.len() >= batch * n * q_row && v.len() >= batch * n * v_row);
    assert_eq!(o.len(), batch * m * v_row);
    let dims = AttentionDims { m, n, heads, d, dv };
    let work = batch * heads * m * n * (d + dv);
    let units = batch * heads;
    let threads = super::kernel::threads_for(work);
    if threads > 1 && (units.is_multiple_of(threads) || units >= 4 * threads) {
        // By heads: each part packs only its own heads' K and V (split by rows, every part
        // packed every head) and writes its heads' columns of every row.
        let per = units.div_ceil(threads);
        let parts: Vec<(usize, usize)> = (0..units).step_by(per).map(|u0| (u0, (u0 + per).min(units))).collect();
        let out = SharedOut(o.as_mut_ptr());
        let out = &out;
        super::kernel::run_parts(parts, |(u0, u1)| {
            for unit in u0..u1 {
                let (a, h) = (unit / heads, unit % heads);
                attend(kernel, int8, [q, k, v], &dims, a, h, 0..m, |i, values| {
                    let at = (a * m + i) * v_row + h * dv;
                    // SAFETY: `at + dv <= batch * m * v_row = o.len()` (i < m, h < heads);
                    // unit (a, h) alone writes columns h*dv..(h+1)*dv of rows a*m..(a+1)*m,
                    // so no two parts write the same value, and nothing reads `o` until
                    // `run_parts` returns; `values` (the part's scratch) is not in `o`.
                    unsafe { std::ptr::copy_nonoverlapping(values.as_ptr(), out.0.add(at), dv) }
                });
            }
        });
    } else {
        split_rows(o, v_row, work, |first, o| {
            let (start, end) = (first, first + o.len() / v_row);
            for a in start / m..end.div_ceil(m) {
                let (i0, i1) = (start.max(a * m) - a * m, end.min((a + 1) * m) - a * m);
                for h in 0..heads {
                    attend(kernel, int8, [q, k, v], &dims, a, h, i0..i1, |i, values| {
                        o[(a * m + i - start) * v_row + h * dv..][..dv].copy_from_slice(values)
                    });
                }
            }
        })
    }
}

/// The output of [`attention`] as parts write it: disjoint ranges from several threads.
struct SharedOut(*mut f32);

// SAFETY: only `attention` makes one, and its parts write disjoint values (see there).
unsafe impl Sync for SharedOut {}

/// Shapes of one [`attention`] call: `m` query rows, `n` keys, `heads` of `d` (Q, K) and
/// `dv` (V) values.
pub(super) struct AttentionDims {
    pub m: usize,
    pub n: usize,
    pub heads: usize,
    pub d: usize,
    pub dv: usize,
}

/// Head `h` of batch entry `a` for query rows `rows` on the int8 path where it is set and
/// takes the head, else [`attend_f32`]; `write(i, values)` gets the `dv` outputs of query row
/// `i`.
#[allow(clippy::too_many_arguments)]
fn attend(
    kernel: Kernel,
    int8: Option<(Int8Path, usize)>,
    qkv: [&[f32]; 3],
    dims: &AttentionDims,
    a: usize,
    h: usize,
    rows: std::ops::Range<usize>,
    write: impl FnMut(usize, &[f32]),
) {
    match int8 {
        Some((path, min_keys)) if attention8::takes(path, dims.n, dims.dv, min_keys) => {
            attention8::attend(path, qkv, dims, a, h, rows, write)
        }
        _ => attend_f32(kernel, qkv, dims, a, h, rows, write),
    }
}

/// Head `h` of batch entry `a` for query rows `rows`: K and V packed once, then per block of
/// [`ATTENTION_ROWS`] rows the scores, softmax and mix (into this thread's scratch);
/// `write(i, values)` gets the `dv` outputs of query row `i`.
fn attend_f32(
    kernel: Kernel,
    [q, k, v]: [&[f32]; 3],
    dims: &AttentionDims,
    a: usize,
    h: usize,
    rows: std::ops::Range<usize>,
    mut write: impl FnMut(usize, &[f32]),
) {
    let AttentionDims { m, n, heads, d, dv } = *dims;
    let (q_row, v_row) = (heads * d, heads * dv);
    let softmax = RowOp { kind: Kind::Softmax, kernel };
    ATTENTION_BUFFERS.with_borrow_mut(|[k_panels, v_panels, s, mixed]| {
        let pw = panel_width(kernel);
        // (the packs write every value they cover: no clearing)
        k_panels.resize(n.div_ceil(pw) * d * pw, 0.0);
        v_panels.resize(dv.div_ceil(pw) * n * pw, 0.0);
        s.resize(ATTENTION_ROWS * n, 0.0);
        mixed.resize(ATTENTION_ROWS * dv, 0.0);
        pack_transposed(k_panels, &k[a * n * q_row + h * d..], q_row, n, d, pw);
        pack_rows(v_panels, &v[a * n * v_row + h * dv..], v_row, n, dv, pw);
        for r0 in rows.clone().step_by(ATTENTION_ROWS) {
            let count = (rows.end - r0).min(ATTENTION_ROWS);
            let s = &mut s[..count * n];
            let qh = &q[(a * m + r0) * q_row + h * d..];
            product(kernel, qh, q_row, count, d, k_panels, s, n, n);
            if n > 0 {
                softmax.run_rows(s, n);
            }
            let mixed = &mut mixed[..count * dv];
            product(kernel, s, n, count, n, v_panels, mixed, dv, dv);
            for (i, values) in mixed.chunks_exact(dv).enumerate() {
                write(r0 + i, values);
            }
        }
    })
}

fn match_head_product(model: &TypedModel, node: &TypedNode) -> Option<Heads> {
    let op = node.op_as::<EinSum>()?;
    let kind = match format!("{op:?}").as_str() {
        "EinSum ambk,anbk->abmn (F32)" => Heads::Scores,
        "EinSum abmk,akbn->ambn (F32)" => Heads::Mix,
        _ => return None,
    };
    if node.inputs.len() != 2 {
        return None;
    }
    for input in &node.inputs {
        let fact = f32_fact(model, *input)?;
        if fact.rank() != 4 || fact.konst.is_some() {
            return None;
        }
    }
    Some(kind)
}

// ---- matching -------------------------------------------------------------------------

fn bin<'m>(node: &'m TypedNode, kind: &str) -> Option<&'m TypedNode> {
    let op = node.op_as::<TypedBinOp>()?;
    (op.0.name() == kind && node.inputs.len() == 2).then_some(node)
}

fn is_elementwise<T: ElementWiseMiniOp>(node: &TypedNode) -> bool {
    node.op_as::<ElementWiseOp>().is_some_and(|op| op.0.is::<T>() && op.1.is_none())
}

/// The consumers of `node`'s single output.
fn successors(node: &TypedNode) -> Vec<usize> {
    if node.outputs.len() != 1 {
        return vec![usize::MAX];
    }
    node.outputs[0].successors.iter().map(|s| s.node).collect()
}

fn only_successor(model: &TypedModel, node: &TypedNode, next: &TypedNode) -> bool {
    successors(node) == [next.id] && !model.output_outlets().is_ok_and(|o| o.iter().any(|o| o.node == node.id))
}

fn f32_fact(model: &TypedModel, outlet: OutletId) -> Option<TypedFact> {
    let fact = model.outlet_fact(outlet).ok()?;
    (fact.datum_type == f32::datum_type() && fact.rank() >= 1).then(|| fact.clone())
}

/// A sum over the last axis of a rank-`rank` tensor.
fn is_last_axis_sum(node: &TypedNode, rank: usize) -> bool {
    node.op_as::<Reduce>().is_some_and(|r| r.reducer == Reducer::Sum && r.axes.as_slice() == [rank - 1])
}

/// `x - rowmax(x)` where the row max is tract's form of the rewrite's `MaxPool` over the
/// whole last axis: reshapes (`AxisOp` other than moves) around one `MaxPool` of kernel
/// `[n]`, valid padding, no stride or dilation. tract may split the `Sub` over rows: then `x`
/// is a row `Slice` of the scores and the row maxes are sliced alike. Returns `x`.
fn match_row_max_sub(model: &TypedModel, sub: &TypedNode) -> Option<OutletId> {
    bin(sub, "Sub")?;
    let x = sub.inputs[0];
    let fact = f32_fact(model, x)?;
    let rank = fact.rank();
    let n = fact.shape[rank - 1].to_usize().ok()?;
    let m_fact = model.outlet_fact(sub.inputs[1]).ok()?;
    let mut want = fact.shape.to_tvec();
    want[rank - 1] = 1.to_dim();
    if m_fact.shape.to_tvec() != want {
        return None;
    }
    // The scores before a row slice, and that slice.
    let x_node = model.node(x.node);
    let (root, row_slice) = match x_node.op_as::<Slice>() {
        Some(slice) if slice.axis + 1 < rank => (x_node.inputs[0], Some(slice.clone())),
        _ => (x, None),
    };
    let root_shape = model.outlet_fact(root).ok()?.shape.to_tvec();
    let (mut pools, mut slices) = (0, 0);
    let mut at = sub.inputs[1];
    for _ in 0..8 {
        if at == x && pools == 1 && slices == 0 {
            return Some(x);
        }
        if at == root && row_slice.is_some() && pools == 1 && slices == 1 {
            return Some(x);
        }
        let node = model.node(at.node);
        if node.inputs.len() != 1 {
            return None;
        }
        if let Some(pool) = node.op_as::<MaxPool>() {
            let spec = &pool.pool_spec;
            let ok = pool.with_index_outputs.is_none()
                && spec.kernel_shape.as_slice() == [n]
                && matches!(spec.padding, PaddingSpec::Valid)
                && spec.dilations.as_ref().is_none_or(|d| d.iter().all(|&d| d == 1))
                && spec.strides.as_ref().is_none_or(|s| s.iter().all(|&s| s == 1));
            if !ok {
                return None;
            }
            let out = model.outlet_fact(OutletId::new(node.id, 0)).ok()?;
            if out.shape.iter().last() != Some(&1.to_dim()) {
                return None;
            }
            pools += 1;
        } else if let Some(slice) = node.op_as::<Slice>() {
            // The same rows of the row maxes, over the same leading axes as the scores.
            let input = model.outlet_fact(node.inputs[0]).ok()?.shape.to_tvec();
            let same = row_slice.as_ref() == Some(slice)
                && input.len() > slice.axis
                && input[..=slice.axis] == root_shape[..=slice.axis];
            if !same {
                return None;
            }
            slices += 1;
        } else if let Some(axis) = node.op_as::<AxisOp>() {
            if matches!(axis, AxisOp::Move(..)) {
                return None;
            }
        } else {
            return None;
        }
        at = node.inputs[0];
    }
    None
}

/// `Mul(e, Recip(ReduceSum_last(e)))` with `e = Exp(x - rowmax(x))`: the softmax of `x`.
fn match_softmax(model: &TypedModel, mul: &TypedNode) -> Option<(OutletId, OutletId)> {
    bin(mul, "Mul")?;
    for (e_ix, r_ix) in [(0, 1), (1, 0)] {
        let exp = model.node(mul.inputs[e_ix].node);
        let recip = model.node(mul.inputs[r_ix].node);
        if !is_elementwise::<Exp>(exp) || !is_elementwise::<Recip>(recip) {
            continue;
        }
        let sum = model.node(recip.inputs[0].node);
        let rank = f32_fact(model, mul.inputs[e_ix])?.rank();
        if !is_last_axis_sum(sum, rank) || sum.inputs[0] != mul.inputs[e_ix] {
            continue;
        }
        let mut consumers = successors(exp);
        consumers.sort();
        let mut want = vec![sum.id, mul.id];
        want.sort();
        if consumers != want || !only_successor(model, sum, recip) || !only_successor(model, recip, mul) {
            continue;
        }
        let sub = model.node(exp.inputs[0].node);
        if !only_successor(model, sub, exp) {
            continue;
        }
        let x = match_row_max_sub(model, sub)?;
        return Some((x, OutletId::new(mul.id, 0)));
    }
    None
}

fn const_f32(model: &TypedModel, outlet: OutletId) -> Option<Vec<f32>> {
    let t = model.outlet_fact(outlet).ok()?.konst.clone()?;
    if t.datum_type() != f32::datum_type() {
        return None;
    }
    Some(t.try_as_plain_ram().ok()?.as_slice::<f32>().ok()?.to_vec())
}

/// The non-constant input of a binary op and the constant's values broadcast over a row of
/// `n` (a constant of shape `[1, .., 1, n]` or a scalar).
fn with_row_const(model: &TypedModel, node: &TypedNode, n: usize) -> Option<(OutletId, Vec<f32>)> {
    for (var, konst) in [(0, 1), (1, 0)] {
        let fact = model.outlet_fact(node.inputs[konst]).ok()?;
        if fact.konst.is_none() {
            continue;
        }
        let shape = fact.shape.as_concrete()?;
        if shape.iter().rev().skip(1).any(|&d| d != 1) {
            return None;
        }
        let values = const_f32(model, node.inputs[konst])?;
        return match values.len() {
            1 => Some((node.inputs[var], vec![values[0]; n])),
            len if len == n => Some((node.inputs[var], values)),
            _ => None,
        };
    }
    None
}

/// tract's decluttered LayerNorm over the last axis: `Add(Mul(RmsNorm(x - mean), gamma), beta)`
/// with `mean = ReduceSum_last(x) * (1/n)`.
fn match_layer_norm(model: &TypedModel, add: &TypedNode) -> Option<(OutletId, Kind, OutletId)> {
    bin(add, "Add")?;
    let fact = f32_fact(model, OutletId::new(add.id, 0))?;
    let rank = fact.rank();
    let n = fact.shape[rank - 1].to_usize().ok()?;
    let (scaled, beta) = with_row_const(model, add, n)?;
    let mul = bin(model.node(scaled.node), "Mul")?;
    let (normed, gamma) = with_row_const(model, mul, n)?;
    let rms = model.node(normed.node);
    let rms_op = rms.op_as::<RmsNorm>()?;
    if rms_op.axis != rank - 1 || rms_op.eps.len() != 1 {
        return None;
    }
    let eps = rms_op.eps.cast_to_scalar::<f32>().ok()?;
    let sub = bin(model.node(rms.inputs[0].node), "Sub")?;
    let x = sub.inputs[0];
    if f32_fact(model, x)?.shape != fact.shape {
        return None;
    }
    let mean = bin(model.node(sub.inputs[1].node), "Mul")?;
    let (sum_out, inv_n) = with_row_const(model, mean, 1)?;
    if inv_n != [1.0 / n as f32] {
        return None;
    }
    let sum = model.node(sum_out.node);
    if !is_last_axis_sum(sum, rank) || sum.inputs[0] != x {
        return None;
    }
    let chain_ok = only_successor(model, sum, mean)
        && only_successor(model, mean, sub)
        && only_successor(model, sub, rms)
        && only_successor(model, rms, mul)
        && only_successor(model, mul, add);
    chain_ok.then(|| (x, Kind::LayerNorm { gamma, beta, eps }, OutletId::new(add.id, 0)))
}

/// tract's own `Softmax` over the last axis of an f32 tensor (the exported form, and the
/// rewritten one for rows longer than the rewrite's limit, such as vit-base's 1569 tokens).
fn match_tract_softmax(model: &TypedModel, node: &TypedNode) -> Option<(OutletId, Kind, OutletId)> {
    let op = node.op_as::<Softmax>()?;
    let rank = f32_fact(model, node.inputs[0])?.rank();
    let last_axis = op.axes.as_slice() == [rank - 1];
    (last_axis && op.quant_output_dt.is_none() && op.kind == SoftmaxKind::Softmax && node.inputs.len() == 1)
        .then(|| (node.inputs[0], Kind::Softmax, OutletId::new(node.id, 0)))
}

fn match_gelu(model: &TypedModel, node: &TypedNode) -> Option<(OutletId, Kind, OutletId)> {
    let op = node.op_as::<ElementWiseOp>()?;
    let gelu = op.0.downcast_ref::<GeluApproximate>()?;
    if gelu.fast_impl || op.1.is_some() {
        return None;
    }
    f32_fact(model, node.inputs[0])?;
    Some((node.inputs[0], Kind::Gelu, OutletId::new(node.id, 0)))
}

/// An f32 weight matmul `EinSum amk,kn->amn` (or `ambk,bkn->amn`, tract's form of a matmul
/// after a head merge) and its bias `Add`, then maybe the tanh-GELU row op: its input,
/// weights outlet, `[k][n]` weights, bias, GELU, and the outlet replaced.
type LinearMatch = (OutletId, OutletId, usize, usize, Vec<f32>, bool, OutletId);

fn match_linear(model: &TypedModel, add: &TypedNode) -> Option<LinearMatch> {
    bin(add, "Add")?;
    let out = f32_fact(model, OutletId::new(add.id, 0))?;
    if out.rank() != 3 {
        return None;
    }
    let n = out.shape[2].to_usize().ok()?;
    if !n.is_multiple_of(PANEL) {
        return None;
    }
    let (mm, bias) = with_row_const(model, add, n)?;
    let einsum = model.node(mm.node);
    let op = einsum.op_as::<EinSum>()?;
    let expr = format!("{op:?}");
    if einsum.inputs.len() != 2 || !only_successor(model, einsum, add) {
        return None;
    }
    let x = einsum.inputs[0];
    let x_fact = f32_fact(model, x)?;
    let w = model.outlet_fact(einsum.inputs[1]).ok()?.konst.clone()?;
    if w.datum_type() != f32::datum_type() {
        return None;
    }
    let k = match expr.as_str() {
        "EinSum amk,kn->amn (F32)" if x_fact.rank() == 3 && w.rank() == 2 => {
            let k = x_fact.shape[2].to_usize().ok()?;
            (w.shape() == [k, n]).then_some(k)?
        }
        "EinSum ambk,bkn->amn (F32)" if x_fact.rank() == 4 && w.rank() == 3 => {
            let (b, k) = (x_fact.shape[2].to_usize().ok()?, x_fact.shape[3].to_usize().ok()?);
            (w.shape() == [b, k, n]).then_some(b * k)?
        }
        _ => return None,
    };
    let mut replaced = OutletId::new(add.id, 0);
    let mut gelu = false;
    if let [next] = successors(add).as_slice() {
        let next = model.node(*next);
        let is_gelu = next.op_as::<RowOp>().is_some_and(|op| op.kind == Kind::Gelu);
        if is_gelu && only_successor(model, add, next) {
            gelu = true;
            replaced = OutletId::new(next.id, 0);
        }
    }
    Some((x, einsum.inputs[1], k, n, bias, gelu, replaced))
}

/// Replaces each softmax, LayerNorm and tanh-GELU chain of a decluttered f32 model by one
/// [`RowOp`], then each weight matmul with its bias (and GELU) by one [`Linear`], each
/// patch-embedding conv by one [`PatchLinear`] and each attention product by one
/// [`HeadProduct`], all on the f32 path of `kernel` (`amx` runs
/// them on AVX-512); returns how many fused ops the model then holds. Refuses a path this
/// CPU lacks.
pub fn fuse(model: &mut TypedModel, kernel: Kernel) -> TractResult<usize> {
    if let Some(missing) = kernel.missing() {
        bail!("kernel path {kernel} needs {missing}, which this CPU lacks");
    }
    let kernel = kernel.f32_path();
    let mut found = vec![];
    for id in model.eval_order()? {
        let node = model.node(id);
        if let Some((x, out)) = match_softmax(model, node) {
            found.push((x, Kind::Softmax, out));
        } else if let Some(m) = match_layer_norm(model, node)
            .or_else(|| match_gelu(model, node))
            .or_else(|| match_tract_softmax(model, node))
        {
            found.push(m);
        }
    }
    if found.is_empty() {
        return fuse_products(model, kernel);
    }
    let mut patch = TypedModelPatch::default();
    let mut replaced: HashMap<OutletId, OutletId> = HashMap::new();
    for (ix, (x, kind, out)) in found.into_iter().enumerate() {
        let name = format!("{}.f32fuse{ix}", model.node(out.node).name);
        let input = match replaced.get(&x) {
            Some(&new) => new,
            None => patch.tap_model(model, x)?,
        };
        let new = patch.wire_node(name, RowOp { kind, kernel }, &[input])?[0];
        patch.shunt_outside(model, out, new)?;
        replaced.insert(out, new);
    }
    patch.apply(model)?;
    model.compact()?;
    fuse_products(model, kernel)
}

/// The products of [`fuse`], after the row ops: weight matmuls (with the residual `Add`s
/// after them), patch embeddings, attention.
fn fuse_products(model: &mut TypedModel, kernel: Kernel) -> TractResult<usize> {
    fuse_linear(model, kernel)?;
    fuse_residuals(model)?;
    fuse_patch_convs(model, kernel)?;
    fuse_head_products(model, kernel)?;
    if scores_of_sliced_rows(model)? > 0 {
        // tract moves Q's new slice up to Q's projection, which then takes those rows only.
        model.declutter()?;
        linears_of_sliced_rows(model)?;
    }
    fuse_attention(model, kernel)?;
    Ok(fused_ops(model))
}

/// Replaces each attention product (Q . K^T, P . V per head) by one [`HeadProduct`].
fn fuse_head_products(model: &mut TypedModel, kernel: Kernel) -> TractResult<usize> {
    let mut found = vec![];
    for id in model.eval_order()? {
        if let Some(kind) = match_head_product(model, model.node(id)) {
            found.push((id, kind));
        }
    }
    if found.is_empty() {
        return Ok(0);
    }
    let count = found.len();
    let mut patch = TypedModelPatch::default();
    for (id, heads) in found {
        let node = model.node(id);
        let inputs = node.inputs.iter().map(|i| patch.tap_model(model, *i)).collect::<TractResult<TVec<_>>>()?;
        let new = patch.wire_node(format!("{}.f32heads", node.name), HeadProduct { heads, kernel }, &inputs)?[0];
        patch.shunt_outside(model, OutletId::new(id, 0), new)?;
    }
    patch.apply(model)?;
    model.compact()?;
    Ok(count)
}

/// Where a `Slice` of query rows (axis 2) is the only reader of an [`HeadProduct`] `Scores`,
/// computes the scores of those rows only: the slice moves onto Q's token axis. The last
/// layer of an MBT whose CLS token alone is read (gather.rs) keeps one query row of 133.
fn scores_of_sliced_rows(model: &mut TypedModel) -> TractResult<usize> {
    super::gather::move_slices_onto_inputs(model, |scores, slice| {
        let is_scores = scores.op_as::<HeadProduct>().is_some_and(|op| op.heads == Heads::Scores);
        (is_scores && slice.axis == 2).then(|| tvec![Some(Slice { axis: 1, ..slice.clone() }), None])
    })
}

/// Where a `Slice` of rows (axis 1) is the only reader of a [`Linear`], runs the product on
/// those rows of its input (and of its residual) only.
fn linears_of_sliced_rows(model: &mut TypedModel) -> TractResult<usize> {
    super::gather::move_slices_onto_inputs(model, |linear, slice| {
        let rows = linear.op_as::<Linear>().is_some() && slice.axis == 1;
        rows.then(|| linear.inputs.iter().map(|_| Some(slice.clone())).collect())
    })
}

/// Replaces each `AttnScores -> SoftmaxRows -> AttnMix` chain (the scores used by nothing
/// else) by one [`Attention`]; where tract split the scores over query rows (`Slice`s on the
/// row axis, each to its own softmax and mix: the fusion layers), one [`Attention`] per
/// slice, on the same rows of Q.
fn fuse_attention(model: &mut TypedModel, kernel: Kernel) -> TractResult<usize> {
    // (Q, K, V, the mix replaced, the query rows of a split)
    let mut found: Vec<(OutletId, OutletId, OutletId, usize, Option<Slice>)> = vec![];
    for id in model.eval_order()? {
        let scores = model.node(id);
        if scores.op_as::<HeadProduct>().is_none_or(|op| op.heads != Heads::Scores) {
            continue;
        }
        let next = successors(scores);
        if next.contains(&usize::MAX) || model.output_outlets()?.iter().any(|o| o.node == id) {
            continue;
        }
        // The mix reading `from` (the softmax, or one row slice of it) and nothing else.
        let mix_after = |from: &TypedNode| -> Option<usize> {
            let [mix] = successors(from)[..] else { return None };
            let mix = model.node(mix);
            let is_mix = mix.op_as::<HeadProduct>().is_some_and(|op| op.heads == Heads::Mix);
            (is_mix && only_successor(model, from, mix) && mix.inputs[0] == OutletId::new(from.id, 0)).then_some(mix.id)
        };
        let softmax_of = |from: &TypedNode| -> Option<&TypedNode> {
            let [softmax] = successors(from)[..] else { return None };
            let softmax = model.node(softmax);
            let is_softmax = softmax.op_as::<RowOp>().is_some_and(|op| op.kind == Kind::Softmax);
            (is_softmax && only_successor(model, from, softmax)).then_some(softmax)
        };
        let row_slice = |node: usize| model.node(node).op_as::<Slice>().filter(|s| s.axis == 2).cloned();
        // Each mix with the query rows it covers (None: all), if every path from the scores
        // is scores -> [row slice] -> softmax -> [row slice] -> mix with one slice at most.
        let mut here = vec![];
        let mut ok = true;
        if let Some(softmax) = softmax_of(scores) {
            if let Some(mix) = mix_after(softmax) {
                here.push((mix, None));
            } else {
                for succ in successors(softmax) {
                    match (succ != usize::MAX).then(|| row_slice(succ)).flatten() {
                        Some(slice) => match mix_after(model.node(succ)) {
                            Some(mix) => here.push((mix, Some(slice))),
                            None => ok = false,
                        },
                        None => ok = false,
                    }
                }
            }
        } else {
            for succ in &next {
                let slice = row_slice(*succ);
                match (slice, softmax_of(model.node(*succ)).and_then(mix_after)) {
                    (Some(slice), Some(mix)) => here.push((mix, Some(slice))),
                    _ => ok = false,
                }
            }
        }
        if ok {
            for (mix, slice) in here {
                found.push((scores.inputs[0], scores.inputs[1], model.node(mix).inputs[1], mix, slice));
            }
        }
    }
    if found.is_empty() {
        return Ok(0);
    }
    let count = found.len();
    let mut patch = TypedModelPatch::default();
    for (ix, (q, k, v, mix, slice)) in found.into_iter().enumerate() {
        let name = format!("{}.f32attention", model.node(mix).name);
        let mut inputs = [q, k, v].iter().map(|i| patch.tap_model(model, *i)).collect::<TractResult<TVec<_>>>()?;
        if let Some(slice) = slice {
            // The scores' query rows (axis 2 of [a, h, m, n]) are Q's axis 1 ([a, m, h, d]).
            let rows = Slice::new(1, slice.start, slice.end);
            inputs[0] = patch.wire_node(format!("{name}.q{ix}"), rows, &[inputs[0]])?[0];
        }
        let new = patch.wire_node(name, Attention { kernel, int8: None }, &inputs)?[0];
        patch.shunt_outside(model, OutletId::new(mix, 0), new)?;
    }
    patch.apply(model)?;
    model.compact()?;
    Ok(count)
}

/// Runs every [`Attention`] of `model` with both products in integers on `path` for heads of
/// at least `min_keys` keys (`int8/attention.rs`: for int8 models, whose weight matmuls are
/// int8 already); returns how many ops it set and how many of them the path takes (their
/// keys and V's head size known from the graph). Heads the path does not take (fewer keys,
/// V's head size not a multiple of 16) stay f32.
pub fn int8_attention(model: &mut TypedModel, path: Int8Path, min_keys: usize) -> (usize, usize) {
    let (mut count, mut taken) = (0, 0);
    for ix in 0..model.nodes.len() {
        let Some(op) = model.nodes[ix].op_as::<Attention>() else { continue };
        let op = Attention { kernel: op.kernel, int8: Some((path, min_keys)) };
        // K [a, n, h, d] and V [a, n, h, dv]: a head of n keys and dv values.
        let head = model.node_input_facts(ix).ok().and_then(|facts| {
            let dim = |input: usize, axis: usize| facts.get(input)?.shape.get(axis)?.to_usize().ok();
            Some((dim(1, 1)?, dim(2, 3)?))
        });
        if let Some((n, dv)) = head
            && attention8::takes(path, n, dv, min_keys)
        {
            taken += 1;
        }
        model.nodes[ix].op = Box::new(op);
        count += 1;
    }
    (count, taken)
}

/// How many of this module's ops the model holds.
fn fused_ops(model: &TypedModel) -> usize {
    let ours = |n: &&TypedNode| {
        n.op_as::<RowOp>().is_some()
            || n.op_as::<Linear>().is_some()
            || n.op_as::<PatchLinear>().is_some()
            || n.op_as::<HeadProduct>().is_some()
            || n.op_as::<Attention>().is_some()
    };
    model.nodes.iter().filter(ours).count()
}

/// Folds each `Add` of a [`Linear`]'s output (read by nothing else, no GELU) and another f32
/// value of the same shape into that op, as its residual.
fn fuse_residuals(model: &mut TypedModel) -> TractResult<usize> {
    let mut found = vec![];
    for id in model.eval_order()? {
        let node = model.node(id);
        let Some(add) = bin(node, "Add") else { continue };
        let out = OutletId::new(id, 0);
        let Some(out_fact) = f32_fact(model, out) else { continue };
        for (ix, input) in add.inputs.iter().enumerate() {
            let linear = model.node(input.node);
            let other = add.inputs[1 - ix];
            let same = |o: OutletId| f32_fact(model, o).is_some_and(|f| f.shape == out_fact.shape);
            if let Some(op) = linear.op_as::<Linear>()
                && !op.gelu
                && !op.residual
                && other != *input
                && only_successor(model, linear, add)
                && same(*input)
                && same(other)
            {
                found.push((out, linear.id, other));
                break;
            }
        }
    }
    if found.is_empty() {
        return Ok(0);
    }
    let count = found.len();
    let mut patch = TypedModelPatch::default();
    // A residual that is itself a replaced output (the next block's) reads the new op.
    let mut replaced: HashMap<OutletId, OutletId> = HashMap::new();
    for (out, linear, other) in found {
        let node = model.node(linear);
        let mut op = node.op_as::<Linear>().context("linear")?.clone();
        op.residual = true;
        let mut inputs = tvec![];
        for outlet in [node.inputs[0], other] {
            inputs.push(match replaced.get(&outlet) {
                Some(&new) => new,
                None => patch.tap_model(model, outlet)?,
            });
        }
        let new = patch.wire_node(format!("{}.residual", node.name), op, &inputs)?[0];
        patch.shunt_outside(model, out, new)?;
        replaced.insert(out, new);
    }
    patch.apply(model)?;
    model.compact()?;
    Ok(count)
}

/// Replaces each f32 weight matmul with its bias (and GELU) by one [`Linear`].
fn fuse_linear(model: &mut TypedModel, kernel: Kernel) -> TractResult<usize> {
    let mut found = vec![];
    for id in model.eval_order()? {
        if let Some(m) = match_linear(model, model.node(id)) {
            found.push(m);
        }
    }
    if found.is_empty() {
        return Ok(0);
    }
    let count = found.len();
    let mut panels: HashMap<OutletId, Arc<Panels>> = HashMap::new();
    // An input that is itself a replaced output (fc2 after fc1's GELU) reads the new op.
    let mut replaced: HashMap<OutletId, OutletId> = HashMap::new();
    let mut patch = TypedModelPatch::default();
    for (ix, (x, w_outlet, k, n, bias, gelu, out)) in found.into_iter().enumerate() {
        let weights = match panels.get(&w_outlet) {
            Some(p) => p.clone(),
            None => {
                let w = model.outlet_fact(w_outlet)?.konst.clone().context("weights")?;
                let plain = w.try_as_plain_ram()?;
                let p = Arc::new(Panels::new(k, n, panel_width(kernel), plain.as_slice::<f32>()?));
                panels.insert(w_outlet, p.clone());
                p
            }
        };
        let name = format!("{}.f32linear{ix}", model.node(out.node).name);
        let input = match replaced.get(&x) {
            Some(&new) => new,
            None => patch.tap_model(model, x)?,
        };
        let new = patch.wire_node(name, Linear { weights, bias, gelu, residual: false, kernel }, &[input])?[0];
        patch.shunt_outside(model, out, new)?;
        replaced.insert(out, new);
    }
    patch.apply(model)?;
    model.compact()?;
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::test_rng::Lcg;
    use tract_onnx::tract_core::ops::cnn::{KernelFormat, PoolSpec};
    use tract_onnx::tract_core::ops::math;

    fn ew(op: impl ElementWiseMiniOp) -> ElementWiseOp {
        ElementWiseOp(Box::new(op), None)
    }

    fn dims(values: &[usize]) -> TVec<TDim> {
        values.iter().map(|&v| v.to_dim()).collect()
    }

    /// The rewrite's softmax over the last axis of `[a, b, rows, n]` as tract declutters it;
    /// with `split`, the `Sub` split over two row ranges as tract does in the fusion layers.
    fn softmax_model(a: usize, b: usize, rows: usize, n: usize, split: Option<usize>) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([a, b, rows, n])).unwrap();
        let flat = AxisOp::Reshape(0, dims(&[a, b, rows]), dims(&[a * b * rows]));
        let m = model.wire_node("flat", flat, &[x]).unwrap()[0];
        let m = model.wire_node("chan", AxisOp::Add(1), &[m]).unwrap()[0];
        let spec = PoolSpec {
            data_format: DataFormat::NCHW,
            kernel_shape: tvec!(n),
            padding: PaddingSpec::Valid,
            dilations: None,
            strides: None,
            input_channels: 1,
            output_channels: 1,
        };
        let m = model.wire_node("pool", MaxPool { pool_spec: spec, with_index_outputs: None }, &[m]).unwrap()[0];
        let back = AxisOp::Reshape(0, dims(&[a * b * rows]), dims(&[a, b, rows]));
        let m = model.wire_node("back", back, &[m]).unwrap()[0];
        let ranges = match split {
            Some(at) => vec![(0, at), (at, rows)],
            None => vec![(0, rows)],
        };
        let mut outputs = vec![];
        for (ix, (start, end)) in ranges.into_iter().enumerate() {
            let (x, m) = if split.is_some() {
                let xs = model.wire_node(format!("xs{ix}"), Slice::new(2, start, end), &[x]).unwrap()[0];
                let ms = model.wire_node(format!("ms{ix}"), Slice::new(2, start, end), &[m]).unwrap()[0];
                (xs, ms)
            } else {
                (x, m)
            };
            let m = model.wire_node(format!("rm{ix}"), AxisOp::Rm(4), &[m]).unwrap()[0];
            let d = model.wire_node(format!("sub{ix}"), math::sub(), &[x, m]).unwrap()[0];
            let e = model.wire_node(format!("exp{ix}"), ew(math::Exp {}), &[d]).unwrap()[0];
            let s = model.wire_node(format!("sum{ix}"), Reduce::new(tvec!(3), Reducer::Sum), &[e]).unwrap()[0];
            let r = model.wire_node(format!("recip{ix}"), ew(math::Recip {}), &[s]).unwrap()[0];
            outputs.push(model.wire_node(format!("div{ix}"), math::mul(), &[e, r]).unwrap()[0]);
        }
        model.select_output_outlets(&outputs).unwrap();
        model
    }

    /// tract's decluttered LayerNorm over the last axis of `[a, rows, n]`.
    fn layer_norm_model(a: usize, rows: usize, n: usize) -> TypedModel {
        layer_norm_model_with(a, rows, n, 1.0 / n as f32)
    }

    fn layer_norm_model_with(a: usize, rows: usize, n: usize, inv_n: f32) -> TypedModel {
        let mut rng = Lcg(5);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([a, rows, n])).unwrap();
        let s = model.wire_node("sum", Reduce::new(tvec!(2), Reducer::Sum), &[x]).unwrap()[0];
        let inv = model.add_const("inv_n", tensor3(&[[[inv_n]]])).unwrap();
        let mean = model.wire_node("mean", math::mul(), &[s, inv]).unwrap()[0];
        let d = model.wire_node("d", math::sub(), &[x, mean]).unwrap()[0];
        let eps = Arc::new(tensor0(1e-6f32));
        let y = model.wire_node("rms", RmsNorm { axis: 2, eps }, &[d]).unwrap()[0];
        let gamma: Vec<f32> = (0..n).map(|_| 1.0 + 0.1 * rng.next()).collect();
        let beta: Vec<f32> = (0..n).map(|_| 0.05 * rng.next()).collect();
        let gamma = model.add_const("gamma", tensor1(&gamma).into_shape(&[1, 1, n]).unwrap()).unwrap();
        let beta = model.add_const("beta", tensor1(&beta).into_shape(&[1, 1, n]).unwrap()).unwrap();
        let y = model.wire_node("scaled", math::mul(), &[y, gamma]).unwrap()[0];
        let y = model.wire_node("shifted", math::add(), &[y, beta]).unwrap();
        model.select_output_outlets(&y).unwrap();
        model
    }

    /// Attention with tract's own `Softmax` between the two products (vit-base's form).
    fn attention_softmax_model(a: usize, m: usize, h: usize, d: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([a, m, 3 * h, d])).unwrap();
        let q = model.wire_node("q", Slice::new(2, 0, h), &[x]).unwrap()[0];
        let k = model.wire_node("k", Slice::new(2, h, 2 * h), &[x]).unwrap()[0];
        let v = model.wire_node("v", Slice::new(2, 2 * h, 3 * h), &[x]).unwrap()[0];
        let qk = EinSum::new("ambk,anbk->abmn".parse().unwrap(), f32::datum_type());
        let s = model.wire_node("scores", qk, &[q, k]).unwrap()[0];
        let op = Softmax { axes: tvec!(3), quant_output_dt: None, kind: SoftmaxKind::Softmax };
        let s = model.wire_node("softmax", op, &[s]).unwrap()[0];
        let pv = EinSum::new("abmk,akbn->ambn".parse().unwrap(), f32::datum_type());
        let o = model.wire_node("mix", pv, &[s, v]).unwrap();
        model.select_output_outlets(&o).unwrap();
        model
    }

    /// [`attention_softmax_model`] with the scores split over query rows at `split` as tract
    /// does in the fusion layers: a slice, softmax and mix per range, the outputs apart (with
    /// `softmax_first`, one softmax and the slices after it, as tract splits vit-base's).
    fn attention_split_model(m: usize, h: usize, d: usize, split: usize, softmax_first: bool) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, m, 3 * h, d])).unwrap();
        let q = model.wire_node("q", Slice::new(2, 0, h), &[x]).unwrap()[0];
        let k = model.wire_node("k", Slice::new(2, h, 2 * h), &[x]).unwrap()[0];
        let v = model.wire_node("v", Slice::new(2, 2 * h, 3 * h), &[x]).unwrap()[0];
        let qk = EinSum::new("ambk,anbk->abmn".parse().unwrap(), f32::datum_type());
        let s = model.wire_node("scores", qk, &[q, k]).unwrap()[0];
        let mut outputs = vec![];
        let op = Softmax { axes: tvec!(3), quant_output_dt: None, kind: SoftmaxKind::Softmax };
        let whole = model.wire_node("softmax", op.clone(), &[s]).unwrap()[0];
        for (ix, (start, end)) in [(0, split), (split, m)].into_iter().enumerate() {
            let p = if softmax_first {
                model.wire_node(format!("rows{ix}"), Slice::new(2, start, end), &[whole]).unwrap()[0]
            } else {
                let part = model.wire_node(format!("rows{ix}"), Slice::new(2, start, end), &[s]).unwrap()[0];
                model.wire_node(format!("softmax{ix}"), op.clone(), &[part]).unwrap()[0]
            };
            let pv = EinSum::new("abmk,akbn->ambn".parse().unwrap(), f32::datum_type());
            outputs.push(model.wire_node(format!("mix{ix}"), pv, &[p, v]).unwrap()[0]);
        }
        model.select_output_outlets(&outputs).unwrap();
        model
    }

    /// tract's own `Softmax` over the last axis of `[a, h, m, n]`.
    fn tract_softmax_model(shape: [usize; 4]) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).unwrap();
        let op = Softmax { axes: tvec!(3), quant_output_dt: None, kind: SoftmaxKind::Softmax };
        let y = model.wire_node("softmax", op, &[x]).unwrap();
        model.select_output_outlets(&y).unwrap();
        model
    }

    fn gelu_model(shape: [usize; 3]) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(shape)).unwrap();
        let y = model.wire_node("gelu", ew(GeluApproximate { fast_impl: false }), &[x]).unwrap();
        model.select_output_outlets(&y).unwrap();
        model
    }

    fn run(model: TypedModel, x: &Tensor) -> Vec<Tensor> {
        let plan = model.into_optimized().unwrap().into_runnable().unwrap();
        plan.run(tvec!(x.clone().into_tvalue())).unwrap().into_iter().map(|t| t.into_tensor()).collect()
    }

    fn values(t: &Tensor) -> Vec<f32> {
        t.try_as_plain_ram().unwrap().as_slice::<f32>().unwrap().to_vec()
    }

    /// The model fused on `kernel` against tract's own plan of the same graph, on
    /// `x = scale * U(-1, 1)`: every output within `tol * max(1, |want|)`; the fused plan run
    /// on a 3-thread pool gives the same bits as on one thread (the split only cuts rows).
    /// Returns the worst relative difference.
    fn check(kernel: Kernel, model: TypedModel, fused_ops: usize, scale: f32, tol: f32) -> f32 {
        let shape: Vec<usize> = model.input_fact(0).unwrap().shape.as_concrete().unwrap().to_vec();
        let mut rng = Lcg(11);
        let x: Vec<f32> = (0..shape.iter().product()).map(|_| rng.next() * scale).collect();
        let x = tensor1(&x).into_shape(&shape).unwrap();
        let mut fused = model.clone();
        assert_eq!(fuse(&mut fused, kernel).unwrap(), fused_ops);
        let want = run(model, &x);
        let pool = tract_linalg::multithread::Executor::multithread(3);
        let threaded = tract_linalg::multithread::multithread_tract_scope(pool, || run(fused.clone(), &x));
        let got = run(fused, &x);
        assert_eq!(want.len(), got.len());
        let mut worst = 0f32;
        for ((want, got), threaded) in want.iter().zip(&got).zip(&threaded) {
            assert_eq!(want.shape(), got.shape());
            let (want, got, threaded) = (values(want), values(got), values(threaded));
            assert!(got.iter().map(|v| v.to_bits()).eq(threaded.iter().map(|v| v.to_bits())), "threads");
            for (a, b) in want.iter().zip(&got) {
                worst = worst.max((a - b).abs() / a.abs().max(1.0));
            }
        }
        assert!(worst <= tol, "{kernel}: worst {worst} > {tol}");
        worst
    }

    /// Every pattern the fuser knows, at edge-small's sizes and at sizes past the AVX2 cache
    /// blocks (more than 144 rows, k past 256, partial panels): (what, model, fused ops,
    /// input scale, tolerance).
    fn cases() -> Vec<(&'static str, TypedModel, usize, f32, f32)> {
        vec![
            // Scores as attention leaves them (|x| up to 8), rows of 129 (a masked tail) and 48.
            ("softmax 4x129x129", softmax_model(1, 4, 129, 129, None), 1, 8.0, 1e-6),
            ("softmax 2x3x5x48", softmax_model(2, 3, 5, 48, None), 1, 8.0, 1e-6),
            ("softmax rows of 3", softmax_model(1, 2, 7, 3, None), 1, 30.0, 1e-6),
            ("split softmax", softmax_model(1, 4, 133, 133, Some(129)), 2, 8.0, 1e-6),
            ("tract softmax 2x3x9x700", tract_softmax_model([2, 3, 9, 700]), 1, 8.0, 1e-6),
            ("layernorm 129x128", layer_norm_model(1, 129, 128), 1, 3.0, 1e-5),
            ("layernorm 2x5x40", layer_norm_model(2, 5, 40), 1, 3.0, 1e-5),
            ("layernorm rows of 12", layer_norm_model(1, 5, 12), 1, 3.0, 1e-5),
            // Up to |x| = 12: both tails (x and 0) and the bend. tract's tanh is good to about
            // 4e-6; ours to about 1e-7.
            ("gelu 129x512", gelu_model([1, 129, 512]), 1, 12.0, 1e-5),
            ("gelu 3x7", gelu_model([1, 3, 7]), 1, 4.0, 1e-5),
            ("linear 129x128x128", linear_model([1, 129, 128], 128, false, None), 1, 3.0, 1e-5),
            ("linear 2x13x512x128", linear_model([2, 13, 512], 128, false, None), 1, 3.0, 1e-5),
            ("linear after a head merge", linear_model([1, 4, 128], 64, false, Some(4)), 1, 3.0, 1e-5),
            ("linear 300x640x96", linear_model([1, 300, 640], 96, false, None), 1, 3.0, 1e-5),
            // One op: the GELU row op is folded into the matmul.
            ("linear+gelu 129x128x512", linear_model([1, 129, 128], 512, true, None), 1, 3.0, 1e-5),
            ("linear+gelu 150x300x64", linear_model([1, 150, 300], 64, true, None), 1, 3.0, 1e-5),
            // k in three blocks on AVX2 (384 + 384 + 32): bias and GELU after a resumed block.
            ("linear+gelu 80x800x64", linear_model([1, 80, 800], 64, true, None), 1, 3.0, 1e-5),
            ("mlp", mlp_model(), 2, 3.0, 1e-5),
            // Three Linear ops: proj and fc2 with their residual Adds folded in.
            ("residual blocks 129x128", residual_model(129, 128, false), 3, 3.0, 1e-5),
            ("residual blocks 2x64, matmul first", residual_model(2, 64, true), 3, 3.0, 1e-5),
            ("attention 129 tokens, 4x32", attention_model(1, 129, 4, 32), 2, 1.0, 1e-5),
            ("attention 2x7 tokens, 2x48", attention_model(2, 7, 2, 48), 2, 1.0, 1e-5),
            ("attention 40 tokens, 3x16", attention_model(1, 40, 3, 16), 2, 1.0, 1e-5),
            ("attention 2x300 tokens, 2x40", attention_model(2, 300, 2, 40), 2, 1.0, 1e-5),
            // Scores, softmax and mix as one op; blocks of 72 query rows.
            ("attention+softmax 129 tokens, 4x32", attention_softmax_model(1, 129, 4, 32), 1, 3.0, 1e-5),
            ("attention+softmax 2x150 tokens, 3x40", attention_softmax_model(2, 150, 3, 40), 1, 3.0, 1e-5),
            ("attention split at 129 of 133", attention_split_model(133, 4, 32, 129, false), 2, 3.0, 1e-5),
            ("attention split after softmax", attention_split_model(133, 4, 32, 129, true), 2, 3.0, 1e-5),
            // The CLS query row only: scores of one row, Q's projection of one row.
            ("scores of one query row", sliced_scores_model(9, 2, 32), 2, 1.0, 1e-5),
            // Patch embeddings: edge-small's video frames (16 patches each) and audio; NHWC with
            // HWIO weights; a size that leaves pixels past the last whole patch.
            (
                "patches 8x3x64x64 -> 128",
                conv_model([8, 3, 64, 64], DataFormat::NCHW, KernelFormat::OIHW, 128, [16, 16], [16, 16]),
                1,
                1.0,
                1e-5,
            ),
            (
                "patches 1x1x256x128 -> 128",
                conv_model([1, 1, 256, 128], DataFormat::NCHW, KernelFormat::OIHW, 128, [16, 16], [16, 16]),
                1,
                1.0,
                1e-5,
            ),
            (
                "patches NHWC 2x35x21x3 -> 64",
                conv_model([2, 35, 21, 3], DataFormat::NHWC, KernelFormat::HWIO, 64, [8, 4], [8, 4]),
                1,
                1.0,
                1e-5,
            ),
            (
                "patches OHWI 2x2x20x33 -> 32",
                conv_model([2, 2, 20, 33], DataFormat::NCHW, KernelFormat::OHWI, 32, [5, 8], [5, 8]),
                1,
                1.0,
                1e-5,
            ),
        ]
    }

    /// Runs [`cases`] on `kernel` where this CPU has it, and says so on stderr either way
    /// (written past the test harness's capture, so a plain `cargo test` shows which paths
    /// ran and which this CPU lacks).
    fn check_path(kernel: Kernel) {
        use std::io::Write as _;
        let line = match kernel.missing() {
            Some(missing) => {
                let mut model = gelu_model([1, 3, 7]);
                assert!(fuse(&mut model, kernel).is_err(), "a path the CPU lacks is refused");
                format!("kernel path {kernel}: not available on this CPU (lacks {missing}); not run")
            }
            None => {
                let cases = cases();
                let mut worst = 0f32;
                let mut ops = 0;
                for (what, model, fused_ops, scale, tol) in cases.iter().cloned() {
                    eprintln!("{kernel}: {what}");
                    worst = worst.max(check(kernel, model, fused_ops, scale, tol));
                    ops += fused_ops;
                }
                format!(
                    "kernel path {kernel}: {} f32 patterns ({ops} fused ops) against tract's plan, \
                     worst relative difference {worst:.2e}, 3 threads bit-identical to 1",
                    cases.len()
                )
            }
        };
        let _ = writeln!(std::io::stderr(), "{line}");
    }

    #[test]
    fn kernel_path_scalar_matches_tract() {
        check_path(Kernel::Scalar);
    }

    #[test]
    fn kernel_path_avx2_matches_tract() {
        check_path(Kernel::Avx2);
    }

    #[test]
    fn kernel_path_avx512_matches_tract() {
        check_path(Kernel::Avx512);
    }

    #[test]
    fn kernel_path_amx_matches_tract() {
        // AMX only changes the int8 matmuls (int8.rs); the f32 ops run on AVX-512.
        check_path(Kernel::Amx);
    }

    /// The int8 attention (int8/attention.rs) on every VNNI path this CPU has, against the f32
    /// attention fused on the best f32 path, on `x = U(-1, 1)` (scores with a spread of 2-3,
    /// as after a LayerNorm and the 1/sqrt(d) scale): every output within 5 % of the largest
    /// |output| (1.6-2.8 % here: flatter rows average V down, and its 8-bit error less); a head size it does not take (40) and fewer keys than
    /// it takes left f32, bit for bit; 3 threads bit-identical to 1. (With scores 3x wider, rows where two keys come
    /// within the 8-bit error of each other move by up to a fifth: the price of int8 scores.)
    #[test]
    fn int8_attention_is_close_to_f32_on_every_vnni_path() {
        use std::io::Write as _;
        let Some(kernel) = Kernel::best() else { return };
        let min = attention8::MIN_KEYS;
        let cases = [
            ("300 tokens, 4x32", attention_softmax_model(1, 300, 4, 32), true),
            ("2x(min + 3) tokens, 3x16", attention_softmax_model(2, min + 3, 3, 16), true),
            ("min tokens, 2x64", attention_softmax_model(1, min, 2, 64), true),
            ("split after softmax", attention_split_model(290, 4, 32, 280, true), true),
            ("head of 40", attention_softmax_model(1, 300, 2, 40), false),
            ("min - 1 tokens", attention_softmax_model(1, min - 1, 2, 32), false),
        ];
        for path in [Int8Path::Vnni512, Int8Path::Vnni256] {
            if !path.supported() {
                let _ = writeln!(std::io::stderr(), "int8 attention {path:?}: not available on this CPU; not run");
                continue;
            }
            let mut worst = 0f32;
            for (what, model, int8) in &cases {
                let shape: Vec<usize> = model.input_fact(0).unwrap().shape.as_concrete().unwrap().to_vec();
                let mut rng = Lcg(5);
                let x: Vec<f32> = (0..shape.iter().product()).map(|_| rng.next()).collect();
                let x = tensor1(&x).into_shape(&shape).unwrap();
                let mut f32s = model.clone();
                fuse(&mut f32s, kernel).unwrap();
                let mut int8s = f32s.clone();
                let ops = f32s.nodes.iter().filter(|n| n.op_as::<Attention>().is_some()).count();
                assert!(ops > 0, "{what}: no attention fused");
                let taken = if *int8 { ops } else { 0 };
                assert_eq!(int8_attention(&mut int8s, path, attention8::MIN_KEYS), (ops, taken), "{what}");
                let want = run(f32s, &x);
                let pool = tract_linalg::multithread::Executor::multithread(3);
                let threaded = tract_linalg::multithread::multithread_tract_scope(pool, || run(int8s.clone(), &x));
                let got = run(int8s, &x);
                for ((want, got), threaded) in want.iter().zip(&got).zip(&threaded) {
                    let (want, got, threaded) = (values(want), values(got), values(threaded));
                    assert!(
                        got.iter().map(|v| v.to_bits()).eq(threaded.iter().map(|v| v.to_bits())),
                        "{what}: threads"
                    );
                    let largest = want.iter().fold(0f32, |m, v| m.max(v.abs()));
                    let diff = want.iter().zip(&got).fold(0f32, |m, (a, b)| m.max((a - b).abs())) / largest;
                    if *int8 {
                        assert!(diff > 0.0 && diff <= 0.05, "{path:?} {what}: {diff} of the largest output");
                        worst = worst.max(diff);
                    } else {
                        assert_eq!(diff, 0.0, "{path:?} {what}: what it does not take stays f32");
                    }
                }
            }
            let _ = writeln!(
                std::io::stderr(),
                "int8 attention {path:?}: {} cases against f32, worst {worst:.2e} of the largest output, \
                 3 threads bit-identical to 1",
                cases.len()
            );
        }
    }

    /// The vector exps (softmax, GELU, the int8 attention's softmax) over the whole clamped
    /// range, every 1e-3: within 2e-7 of exp in f64 (f32's rounding is 6e-8).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn vector_exp_is_within_f32_rounding_of_exact() {
        use std::arch::x86_64::*;
        let xs: Vec<f32> = (0..176_000).map(|i| EXP_LO + i as f32 * 1e-3).filter(|x| *x <= EXP_HI).collect();
        let worst = |ys: &[f32]| {
            xs.iter().zip(ys).map(|(&x, &y)| (y as f64 / (x as f64).exp() - 1.0).abs()).fold(0f64, f64::max)
        };
        if Kernel::Avx512.supported() {
            let mut ys = xs.clone();
            for chunk in ys.chunks_exact_mut(16) {
                // SAFETY: AVX-512F is present (checked above); 16 floats in `chunk`.
                unsafe { _mm512_storeu_ps(chunk.as_mut_ptr(), exp16(_mm512_loadu_ps(chunk.as_ptr()))) }
            }
            let n = ys.len() / 16 * 16;
            assert!(worst(&ys[..n]) < 2e-7, "avx512: worst {}", worst(&ys[..n]));
        }
        if Kernel::Avx2.supported() {
            let mut ys = xs.clone();
            for chunk in ys.chunks_exact_mut(8) {
                // SAFETY: AVX2 and FMA are present (checked above); 8 floats in `chunk`.
                unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), exp8(_mm256_loadu_ps(chunk.as_ptr()))) }
            }
            let n = ys.len() / 8 * 8;
            assert!(worst(&ys[..n]) < 2e-7, "avx2: worst {}", worst(&ys[..n]));
        }
    }

    #[test]
    fn gelu_is_within_f32_rounding_of_exact() {
        let xs: Vec<f32> = (0..24000).map(|i| -12.0 + i as f32 * 0.001).collect();
        for kernel in Kernel::ALL.into_iter().filter(|k| k.supported()) {
            let mut ys = xs.clone();
            RowOp { kind: Kind::Gelu, kernel }.run(&mut ys, xs.len());
            let mut worst = 0f64;
            for (&x, &y) in xs.iter().zip(&ys) {
                let x = x as f64;
                let exact = 0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x * x * x)).tanh());
                worst = worst.max((y as f64 - exact).abs() / exact.abs().max(1.0));
            }
            assert!(worst < 3e-7, "{kernel}: worst {worst}");
        }
    }

    /// `x . W + bias` (then tract's tanh GELU with `gelu`) as tract declutters a Linear, on
    /// `x` of `shape`; `heads`: the input as `[a, m, heads, k / heads]` (a head merge).
    fn linear_model(shape: [usize; 3], n: usize, gelu: bool, heads: Option<usize>) -> TypedModel {
        let mut rng = Lcg(9);
        let [a, m, k] = shape;
        let mut model = TypedModel::default();
        let w: Vec<f32> = (0..k * n).map(|_| rng.next() * 0.1).collect();
        let bias: Vec<f32> = (0..n).map(|_| rng.next() * 0.05).collect();
        let (x, w, expr) = match heads {
            Some(h) => {
                let x = model.add_source("x", f32::fact([a, m, h, k / h])).unwrap();
                let w = tensor1(&w).into_shape(&[h, k / h, n]).unwrap();
                (x, w, "ambk,bkn->amn")
            }
            None => {
                let x = model.add_source("x", f32::fact(shape)).unwrap();
                (x, tensor1(&w).into_shape(&[k, n]).unwrap(), "amk,kn->amn")
            }
        };
        let w = model.add_const("w", w).unwrap();
        let bias = model.add_const("bias", tensor1(&bias).into_shape(&[1, 1, n]).unwrap()).unwrap();
        let op = EinSum::new(expr.parse().unwrap(), f32::datum_type());
        let y = model.wire_node("mm", op, &[x, w]).unwrap()[0];
        let mut y = model.wire_node("add", math::add(), &[bias, y]).unwrap();
        if gelu {
            y = model.wire_node("gelu", ew(GeluApproximate { fast_impl: false }), &y).unwrap();
        }
        model.select_output_outlets(&y).unwrap();
        model
    }

    /// fc1, GELU, fc2: fc2's input is fc1's replaced output (one patch for both).
    fn mlp_model() -> TypedModel {
        let mut rng = Lcg(13);
        let (k, hidden) = (128, 512);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 20, k])).unwrap();
        let mut y = x;
        for (ix, (k, n)) in [(k, hidden), (hidden, k)].into_iter().enumerate() {
            let w: Vec<f32> = (0..k * n).map(|_| rng.next() * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.next() * 0.05).collect();
            let w = model.add_const(format!("w{ix}"), tensor1(&w).into_shape(&[k, n]).unwrap()).unwrap();
            let b = model.add_const(format!("b{ix}"), tensor1(&b).into_shape(&[1, 1, n]).unwrap()).unwrap();
            let op = EinSum::new("amk,kn->amn".parse().unwrap(), f32::datum_type());
            y = model.wire_node(format!("mm{ix}"), op, &[y, w]).unwrap()[0];
            y = model.wire_node(format!("add{ix}"), math::add(), &[b, y]).unwrap()[0];
            if ix == 0 {
                y = model.wire_node("gelu", ew(GeluApproximate { fast_impl: false }), &[y]).unwrap()[0];
            }
        }
        model.select_output_outlets(&[y]).unwrap();
        model
    }

    /// Two residual blocks as a transformer layer has them: `a = x + proj(x)`, then
    /// `a + fc2(gelu(fc1(a)))` (the second block's residual is the first's output); with
    /// `swapped`, the residual `Add`s take the matmul first.
    fn residual_model(rows: usize, d: usize, swapped: bool) -> TypedModel {
        let mut rng = Lcg(19);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, rows, d])).unwrap();
        let mut linear = |model: &mut TypedModel, name: &str, x: OutletId, k: usize, n: usize| {
            let w: Vec<f32> = (0..k * n).map(|_| rng.next() * 0.1).collect();
            let b: Vec<f32> = (0..n).map(|_| rng.next() * 0.05).collect();
            let w = model.add_const(format!("{name}.w"), tensor1(&w).into_shape(&[k, n]).unwrap()).unwrap();
            let b = model.add_const(format!("{name}.b"), tensor1(&b).into_shape(&[1, 1, n]).unwrap()).unwrap();
            let op = EinSum::new("amk,kn->amn".parse().unwrap(), f32::datum_type());
            let y = model.wire_node(format!("{name}.mm"), op, &[x, w]).unwrap()[0];
            model.wire_node(format!("{name}.add"), math::add(), &[b, y]).unwrap()[0]
        };
        let residual = |model: &mut TypedModel, name: &str, r: OutletId, y: OutletId| {
            let inputs = if swapped { [y, r] } else { [r, y] };
            model.wire_node(name, math::add(), &inputs).unwrap()[0]
        };
        let y = linear(&mut model, "proj", x, d, d);
        let a = residual(&mut model, "res1", x, y);
        let h = linear(&mut model, "fc1", a, d, 4 * d);
        let h = model.wire_node("gelu", ew(GeluApproximate { fast_impl: false }), &[h]).unwrap()[0];
        let y = linear(&mut model, "fc2", h, 4 * d, d);
        let o = residual(&mut model, "res2", a, y);
        model.select_output_outlets(&[o]).unwrap();
        model
    }

    /// Scores of one query row (a CLS read, gather.rs), then the exp: `x` `[1, m, 2h, d]`
    /// holds Q and K side by side; Q comes out of a Linear (rows 0..1 kept of it too).
    fn sliced_scores_model(m: usize, h: usize, d: usize) -> TypedModel {
        let mut rng = Lcg(31);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, m, h * d])).unwrap();
        let w: Vec<f32> = (0..h * d * h * d).map(|_| rng.next() * 0.1).collect();
        let w = model.add_const("w", tensor1(&w).into_shape(&[h * d, h * d]).unwrap()).unwrap();
        let b = model.add_const("b", tensor1(&vec![0.1f32; h * d]).into_shape(&[1, 1, h * d]).unwrap()).unwrap();
        let op = EinSum::new("amk,kn->amn".parse().unwrap(), f32::datum_type());
        let q = model.wire_node("q.mm", op, &[x, w]).unwrap()[0];
        let q = model.wire_node("q.add", math::add(), &[b, q]).unwrap()[0];
        let q = model.wire_node("q.heads", AxisOp::Reshape(2, dims(&[h * d]), dims(&[h, d])), &[q]).unwrap()[0];
        let k = model.wire_node("k.heads", AxisOp::Reshape(2, dims(&[h * d]), dims(&[h, d])), &[x]).unwrap()[0];
        let qk = EinSum::new("ambk,anbk->abmn".parse().unwrap(), f32::datum_type());
        let s = model.wire_node("scores", qk, &[q, k]).unwrap()[0];
        let s = model.wire_node("rows", Slice::new(2, 0, 1), &[s]).unwrap()[0];
        let s = model.wire_node("exp", ew(math::Exp {}), &[s]).unwrap();
        model.select_output_outlets(&s).unwrap();
        model
    }

    #[test]
    fn scores_of_one_query_row_take_that_row_of_q_and_of_its_projection() {
        let mut model = sliced_scores_model(9, 2, 32);
        fuse(&mut model, Kernel::Scalar).unwrap();
        let scores = model.nodes.iter().find(|n| n.op_as::<HeadProduct>().is_some()).unwrap();
        assert_eq!(scores.outputs[0].fact.shape.as_concrete(), Some(&[1, 2, 1, 9][..]), "{model}");
        let linear = model.nodes.iter().find(|n| n.op_as::<Linear>().is_some()).unwrap();
        assert_eq!(linear.outputs[0].fact.shape.as_concrete(), Some(&[1, 1, 64][..]), "{model}");
    }

    /// Attention's two products as tract declutters them: `x` holds Q, K and V side by side
    /// (`[a, m, 3, h, d]` sliced), scores, softmax, mix.
    fn attention_model(a: usize, m: usize, h: usize, d: usize) -> TypedModel {
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([a, m, 3 * h, d])).unwrap();
        let q = model.wire_node("q", Slice::new(2, 0, h), &[x]).unwrap()[0];
        let k = model.wire_node("k", Slice::new(2, h, 2 * h), &[x]).unwrap()[0];
        let v = model.wire_node("v", Slice::new(2, 2 * h, 3 * h), &[x]).unwrap()[0];
        let qk = EinSum::new("ambk,anbk->abmn".parse().unwrap(), f32::datum_type());
        let s = model.wire_node("scores", qk, &[q, k]).unwrap()[0];
        let s = model.wire_node("exp", ew(math::Exp {}), &[s]).unwrap()[0];
        let pv = EinSum::new("abmk,akbn->ambn".parse().unwrap(), f32::datum_type());
        let o = model.wire_node("mix", pv, &[s, v]).unwrap();
        model.select_output_outlets(&o).unwrap();
        model
    }

    /// A conv with kernel `patch`, stride `stride`, over `input` (in `format`), `o` output
    /// channels, weights in `kernel_fmt`: a patch embedding where the stride is the patch.
    fn conv_model(
        input: [usize; 4],
        format: DataFormat,
        kernel_fmt: KernelFormat,
        o: usize,
        patch: [usize; 2],
        stride: [usize; 2],
    ) -> TypedModel {
        let mut rng = Lcg(17);
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact(input)).unwrap();
        let c = *format.shape(input.to_vec()).unwrap().c();
        let [kh, kw] = patch;
        let shape = match kernel_fmt {
            KernelFormat::OIHW => [o, c, kh, kw],
            KernelFormat::HWIO => [kh, kw, c, o],
            KernelFormat::OHWI => [o, kh, kw, c],
        };
        let w: Vec<f32> = (0..o * c * kh * kw).map(|_| rng.next() * 0.1).collect();
        let b: Vec<f32> = (0..o).map(|_| rng.next() * 0.05).collect();
        let w = model.add_const("w", tensor1(&w).into_shape(&shape).unwrap()).unwrap();
        let b = model.add_const("b", tensor1(&b)).unwrap();
        let pool_spec = PoolSpec {
            data_format: format,
            kernel_shape: tvec!(kh, kw),
            padding: PaddingSpec::Valid,
            dilations: None,
            strides: Some(tvec!(stride[0], stride[1])),
            input_channels: c,
            output_channels: o,
        };
        let y = model.wire_node("conv", Conv::new(pool_spec, kernel_fmt, 1, None), &[x, w, b]).unwrap();
        model.select_output_outlets(&y).unwrap();
        model
    }

    #[test]
    fn residual_adds_are_folded_into_the_products() {
        let mut model = residual_model(5, 32, false);
        fuse(&mut model, Kernel::Scalar).unwrap();
        let residual = model.nodes.iter().filter(|n| n.op_as::<Linear>().is_some_and(|op| op.residual)).count();
        let adds = model.nodes.iter().filter(|n| bin(n, "Add").is_some()).count();
        assert_eq!((residual, adds), (2, 0), "{model}");
        // An Add of a GELU'd output, or of a value read elsewhere too, stays an Add.
        let mut model = TypedModel::default();
        let x = model.add_source("x", f32::fact([1, 3, 32])).unwrap();
        let w = model.add_const("w", Tensor::zero::<f32>(&[32, 32]).unwrap()).unwrap();
        let b = model.add_const("b", Tensor::zero::<f32>(&[1, 1, 32]).unwrap()).unwrap();
        let op = EinSum::new("amk,kn->amn".parse().unwrap(), f32::datum_type());
        let y = model.wire_node("mm", op, &[x, w]).unwrap()[0];
        let y = model.wire_node("bias", math::add(), &[b, y]).unwrap()[0];
        let a = model.wire_node("res", math::add(), &[x, y]).unwrap()[0];
        model.select_output_outlets(&[a, y]).unwrap();
        fuse(&mut model, Kernel::Scalar).unwrap();
        assert_eq!(model.nodes.iter().filter(|n| bin(n, "Add").is_some()).count(), 1, "{model}");
    }

    #[test]
    fn other_chains_are_left_alone() {
        // A max over part of the row is not a softmax's row max.
        let mut model = softmax_model(1, 2, 3, 8, None);
        let pool = model.nodes.iter().position(|n| n.op_as::<MaxPool>().is_some()).unwrap();
        let mut op = model.nodes[pool].op_as::<MaxPool>().unwrap().clone();
        op.pool_spec.kernel_shape = tvec!(4);
        op.pool_spec.strides = Some(tvec!(4));
        model.nodes[pool].op = Box::new(op);
        // (the model is not re-typed: only matching is looked at)
        let before = format!("{model:?}");
        assert_eq!(fuse(&mut model, Kernel::Scalar).unwrap(), 0);
        assert_eq!(format!("{model:?}"), before);
        // A mean by another factor is not a LayerNorm's.
        let mut model = layer_norm_model_with(1, 3, 16, 0.5);
        assert_eq!(fuse(&mut model, Kernel::Scalar).unwrap(), 0);
        // Overlapping patches (stride below the kernel) are a conv, not a patch embedding.
        let mut model = conv_model([1, 3, 32, 32], DataFormat::NCHW, KernelFormat::OIHW, 32, [16, 16], [8, 8]);
        assert_eq!(fuse(&mut model, Kernel::Scalar).unwrap(), 0);
    }
}
