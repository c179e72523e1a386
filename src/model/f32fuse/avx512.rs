//! The AVX-512F path of the fused f32 ops (16 lanes, 32 zmm registers): the row ops, and the
//! matrix product of [`super::Linear`] and the attention products.
//!
//! The product is blocked for the caches as the AVX2 path's (`avx2.rs`), since at the paper's
//! size (1568 tokens, k up to 3072) neither the activations nor the weights fit in L2. The
//! weights come in panels of [`WIDTH`] = 32 columns (two zmm registers: each k row of a
//! panel is two whole cache lines), each panel's k rows contiguous. Rows go in blocks of
//! [`MC`]; for each row block every panel is finished (all its k blocks of [`KC`]) before the
//! next, so the partial sums being resumed are the tile just written, still in L1. The
//! 12-row x 32-column micro-kernel keeps 24 accumulators. A k block after the first reloads
//! the partial sums from `y` and goes on with the same FMA chain, so the result is the
//! unblocked chain's, bit for bit (and the AVX2 path's: the same chain per output); bias and
//! GELU come with the last k block. Every function here must only run where AVX-512F was
//! detected.

use std::arch::x86_64::*;

use super::{EXP_HI, EXP_LO, GELU_A, SQRT_2_OVER_PI, scalar};

/// Columns per packed weight panel on this path: two zmm registers.
pub const WIDTH: usize = 32;
/// Rows per micro-kernel call: 12 rows x 2 registers = 24 accumulators.
const MR: usize = 12;
/// Rows per cache block: its `KC` columns of activations stay in L2.
const MC: usize = 144;
/// k per cache block: a panel's k block of weights (`KC` x 32 x 4 bytes = 32 KiB) stays in
/// L1 while the row block's micro-kernels pass over it.
const KC: usize = 256;

/// exp of 16 lanes: `2^n * p(r)`, `x = n ln2 + r`, `|r| <= ln2/2`, p of degree 7.
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
    let mut p = _mm512_set1_ps(1.0 / 5040.0);
    for c in [1.0 / 720.0, 1.0 / 120.0, 1.0 / 24.0, 1.0 / 6.0, 0.5, 1.0, 1.0] {
        p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
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
            _mm512_mask_storeu_ps(p.add(whole), tail, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, p.add(whole)), inv));
        }
    }
}

#[inline]
#[target_feature(enable = "avx512f")]
pub fn gelu16(x: __m512) -> __m512 {
    let x3 = _mm512_mul_ps(_mm512_mul_ps(x, x), x);
    let y = _mm512_mul_ps(_mm512_set1_ps(SQRT_2_OVER_PI), _mm512_fmadd_ps(_mm512_set1_ps(GELU_A), x3, x));
    let e = exp(_mm512_mul_ps(_mm512_set1_ps(-2.0), y));
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

/// What a micro-kernel call does besides the products.
#[derive(Clone, Copy)]
struct Step {
    /// Go on from the partial sums in `y` (a k block after the first).
    resume: bool,
    /// Last k block: add the bias (unless null) and apply GELU (with `gelu`), as tract does.
    finish: bool,
    gelu: bool,
}

/// Lanes `0..len` of a 16-lane mask (`len` clamped to 0..=16).
#[inline]
fn lanes(len: usize) -> __mmask16 {
    if len >= 16 { 0xffff } else { ((1u32 << len) - 1) as __mmask16 }
}

/// `R` rows x up to 32 columns (`cols`) of `y = x . w`: `x` at row stride `xs`, `kc` values
/// of k; `w` a panel's k block (`kc` rows of [`WIDTH`] floats, contiguous); `y` at row
/// stride `ys`.
///
/// # Safety
/// AVX-512F present; `x` readable for `R` rows of `kc` values at stride `xs`; `w` for
/// `kc * 32` floats; `y` readable and writable for `R` rows of `cols` <= 32 values at stride
/// `ys`; `bias`, unless null, readable for `cols` values.
#[inline]
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
unsafe fn kernel<const R: usize>(
    x: *const f32,
    xs: usize,
    kc: usize,
    w: *const f32,
    bias: *const f32,
    step: Step,
    y: *mut f32,
    ys: usize,
    cols: usize,
) {
    let (m0, m1) = (lanes(cols), lanes(cols.saturating_sub(16)));
    // SAFETY: the caller's contract above covers every pointer offset: rows `r < R`, k
    // offsets `kk < kc`, the panel's 32 columns, and `y` and `bias` masked to `cols` columns.
    unsafe {
        let mut acc = [[_mm512_setzero_ps(); 2]; R];
        if step.resume {
            for (r, acc) in acc.iter_mut().enumerate() {
                let yr = y.add(r * ys);
                acc[0] = _mm512_maskz_loadu_ps(m0, yr);
                acc[1] = _mm512_maskz_loadu_ps(m1, yr.add(16));
            }
        }
        for kk in 0..kc {
            let w0 = _mm512_loadu_ps(w.add(kk * WIDTH));
            let w1 = _mm512_loadu_ps(w.add(kk * WIDTH + 16));
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm512_set1_ps(*x.add(r * xs + kk));
                acc[0] = _mm512_fmadd_ps(a, w0, acc[0]);
                acc[1] = _mm512_fmadd_ps(a, w1, acc[1]);
            }
        }
        let add_bias = step.finish && !bias.is_null();
        let (b0, b1) = if add_bias {
            (_mm512_maskz_loadu_ps(m0, bias), _mm512_maskz_loadu_ps(m1, bias.add(16)))
        } else {
            (_mm512_setzero_ps(), _mm512_setzero_ps())
        };
        for (r, acc) in acc.iter().enumerate() {
            let (mut v0, mut v1) = (acc[0], acc[1]);
            if add_bias {
                v0 = _mm512_add_ps(v0, b0);
                v1 = _mm512_add_ps(v1, b1);
            }
            if step.finish && step.gelu {
                v0 = gelu16(v0);
                v1 = gelu16(v1);
            }
            let yr = y.add(r * ys);
            _mm512_mask_storeu_ps(yr, m0, v0);
            _mm512_mask_storeu_ps(yr.add(16), m1, v1);
        }
    }
}

/// `y[i][c] = sum_kk x[i * xs + kk] w[kk][c] (+ bias[c], then GELU with `gelu`)` for `rows`
/// rows and `cols` columns; `w` packed in panels of [`WIDTH`] columns (`k` rows each, zero
/// past `cols`), `y` at row stride `ys`; `bias` empty for none, else `cols` values.
///
/// # Safety
/// AVX-512F present (the slices' lengths are checked here).
#[target_feature(enable = "avx512f")]
#[allow(clippy::too_many_arguments)]
pub unsafe fn product(
    x: &[f32],
    xs: usize,
    rows: usize,
    k: usize,
    w: &[f32],
    bias: &[f32],
    gelu: bool,
    y: &mut [f32],
    ys: usize,
    cols: usize,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    assert!(x.len() >= (rows - 1) * xs + k && y.len() >= (rows - 1) * ys + cols);
    assert!(w.len() >= cols.div_ceil(WIDTH) * k * WIDTH && (bias.is_empty() || bias.len() >= cols));
    let (x, w, y) = (x.as_ptr(), w.as_ptr(), y.as_mut_ptr());
    let bias = if bias.is_empty() { std::ptr::null() } else { bias.as_ptr() };
    for r0 in (0..rows).step_by(MC) {
        let mc = (rows - r0).min(MC);
        for p in 0..cols.div_ceil(WIDTH) {
            let c0 = p * WIDTH;
            let width = (cols - c0).min(WIDTH);
            // k = 0 still takes one (empty) block: y = bias.
            let mut k0 = 0;
            loop {
                let kc = (k - k0).min(KC);
                let step = Step { resume: k0 > 0, finish: k0 + kc == k, gelu };
                // SAFETY: the asserts above: panel `p` holds `k` rows of WIDTH floats from
                // `p * k * WIDTH`; rows `r0..r0 + mc` of x, y and columns `c0..c0 + width`
                // of y and bias are in bounds.
                unsafe {
                    let wp = w.add((p * k + k0) * WIDTH);
                    let b = if bias.is_null() { bias } else { bias.add(c0) };
                    let mut r = r0;
                    while r < r0 + mc {
                        let block = (r0 + mc - r).min(MR);
                        let (xr, yr) = (x.add(r * xs + k0), y.add(r * ys + c0));
                        match block {
                            12 => kernel::<12>(xr, xs, kc, wp, b, step, yr, ys, width),
                            11 => kernel::<11>(xr, xs, kc, wp, b, step, yr, ys, width),
                            10 => kernel::<10>(xr, xs, kc, wp, b, step, yr, ys, width),
                            9 => kernel::<9>(xr, xs, kc, wp, b, step, yr, ys, width),
                            8 => kernel::<8>(xr, xs, kc, wp, b, step, yr, ys, width),
                            7 => kernel::<7>(xr, xs, kc, wp, b, step, yr, ys, width),
                            6 => kernel::<6>(xr, xs, kc, wp, b, step, yr, ys, width),
                            5 => kernel::<5>(xr, xs, kc, wp, b, step, yr, ys, width),
                            4 => kernel::<4>(xr, xs, kc, wp, b, step, yr, ys, width),
                            3 => kernel::<3>(xr, xs, kc, wp, b, step, yr, ys, width),
                            2 => kernel::<2>(xr, xs, kc, wp, b, step, yr, ys, width),
                            _ => kernel::<1>(xr, xs, kc, wp, b, step, yr, ys, width),
                        }
                        r += block;
                    }
                }
                k0 += kc;
                if k0 >= k {
                    break;
                }
            }
        }
    }
}
