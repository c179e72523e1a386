//! The AVX2 + FMA path of the fused f32 ops (8 lanes, 16 ymm registers): the same arithmetic
//! as the AVX-512 path (same exp polynomial, same FMA chain per output), for CPUs without
//! AVX-512 such as AMD Zen 2/3 and most desktop Intel parts.
//!
//! The matrix product is blocked for the caches, since at the paper's size (1568 tokens,
//! k up to 3072) neither the activations nor the weights fit in L2. The weights come in
//! panels of [`WIDTH`] = 16 columns (two ymm registers), each panel's k rows contiguous, so a
//! k block of one panel is one contiguous run that spreads over every L1 set (32-column
//! panels read half of each 128-byte row, which maps a k block onto half the sets and lets
//! the activations evict it). Rows go in blocks of [`MC`]; for each row block every panel is
//! finished (all its k blocks of [`KC`]) before the next, so the partial sums being resumed
//! are the 72 x 16 tile just written, still in L1, not a row block of the whole output from
//! L3. The 6-row x 16-column micro-kernel keeps 12 accumulators. A k block after the first
//! reloads the partial sums from `y` and goes on with the same FMA chain, so the result is
//! the unblocked chain's, bit for bit; bias and GELU come with the last k block. Every
//! function here must only run where AVX2 and FMA were detected.

use std::arch::x86_64::*;

use super::{EXP_HI, EXP_LO, EXP_POLY, GELU_C1, GELU_C3, scalar};

/// Rows per micro-kernel call: 6 rows x 2 registers = 12 accumulators, plus the two weight
/// registers and the broadcast, of 16.
const MR: usize = 6;
/// Columns per packed weight panel on this path (the AVX-512 path's panels are 32 wide).
pub const WIDTH: usize = 16;
/// Rows per cache block: its `KC` columns of activations (108 KiB) stay in L2.
const MC: usize = 72;
/// k per cache block: a panel's k block of weights (`KC` x 16 x 4 bytes = 24 KiB) stays in L1
/// while the row block's micro-kernels pass over it.
const KC: usize = 384;

/// exp of 8 lanes: `2^n * p(r)`, `x = n ln2 + r`, `|r| <= ln2/2`, p = `EXP_POLY` (as the
/// AVX-512 path). `2^n` is built as two powers `2^(n/2) 2^(n - n/2)` so that n = 128 (at
/// `EXP_HI`) and n = -126 stay in the normal exponent range of each factor.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn exp(x: __m256) -> __m256 {
    let x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(EXP_LO)), _mm256_set1_ps(EXP_HI));
    let n = _mm256_round_ps::<{ _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC }>(_mm256_mul_ps(
        x,
        _mm256_set1_ps(std::f32::consts::LOG2_E),
    ));
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693_145_75), x);
    let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428_606_8e-6), r);
    let mut p = _mm256_set1_ps(EXP_POLY[0]);
    for c in &EXP_POLY[1..] {
        p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(*c));
    }
    let ni = _mm256_cvtps_epi32(n);
    let half = _mm256_srai_epi32::<1>(ni);
    let rest = _mm256_sub_epi32(ni, half);
    let bias = _mm256_set1_epi32(127);
    let f1 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(half, bias)));
    let f2 = _mm256_castsi256_ps(_mm256_slli_epi32::<23>(_mm256_add_epi32(rest, bias)));
    _mm256_mul_ps(_mm256_mul_ps(p, f1), f2)
}

/// Lanes `0..len` set (`len` <= 8), as a mask for `maskload` / `maskstore` / blends.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn tail_mask(len: usize) -> __m256i {
    _mm256_cmpgt_epi32(_mm256_set1_epi32(len as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7))
}

/// Horizontal sum and max of 8 lanes.
#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn sum8(v: __m256) -> f32 {
    let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_add_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn max8(v: __m256) -> f32 {
    let s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps::<1>(v));
    let s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps::<1>(s, s)))
}

#[target_feature(enable = "avx2,fma")]
pub fn softmax(row: &mut [f32]) {
    let n = row.len();
    let whole = n / 8 * 8;
    let rem = n - whole;
    let mask = tail_mask(rem);
    let p = row.as_mut_ptr();
    // SAFETY: every load and store below is at `p + i` with `i + 8 <= whole <= n`, or at
    // `p + whole` masked to the `rem = n - whole` lanes left, all inside `row`.
    unsafe {
        let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut vmax = neg_inf;
        for i in (0..whole).step_by(8) {
            vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(p.add(i)));
        }
        if rem != 0 {
            let t = _mm256_maskload_ps(p.add(whole), mask);
            vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(neg_inf, t, _mm256_castsi256_ps(mask)));
        }
        let max = _mm256_set1_ps(max8(vmax));
        let mut vsum = _mm256_setzero_ps();
        for i in (0..whole).step_by(8) {
            let e = exp(_mm256_sub_ps(_mm256_loadu_ps(p.add(i)), max));
            _mm256_storeu_ps(p.add(i), e);
            vsum = _mm256_add_ps(vsum, e);
        }
        if rem != 0 {
            let e = exp(_mm256_sub_ps(_mm256_maskload_ps(p.add(whole), mask), max));
            _mm256_maskstore_ps(p.add(whole), mask, e);
            vsum = _mm256_add_ps(vsum, _mm256_and_ps(e, _mm256_castsi256_ps(mask)));
        }
        let inv = _mm256_set1_ps(1.0 / sum8(vsum));
        for i in (0..whole).step_by(8) {
            _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), inv));
        }
        if rem != 0 {
            let t = _mm256_maskload_ps(p.add(whole), mask);
            _mm256_maskstore_ps(p.add(whole), mask, _mm256_mul_ps(t, inv));
        }
    }
}

#[inline]
#[target_feature(enable = "avx2,fma")]
pub fn gelu8(x: __m256) -> __m256 {
    let t = _mm256_fmadd_ps(_mm256_set1_ps(GELU_C3), _mm256_mul_ps(x, x), _mm256_set1_ps(GELU_C1));
    let e = exp(_mm256_mul_ps(x, t));
    _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
}

#[target_feature(enable = "avx2,fma")]
pub fn gelu(data: &mut [f32]) {
    let mut chunks = data.chunks_exact_mut(8);
    for chunk in &mut chunks {
        // SAFETY: `chunk` holds exactly 8 floats.
        unsafe { _mm256_storeu_ps(chunk.as_mut_ptr(), gelu8(_mm256_loadu_ps(chunk.as_ptr()))) };
    }
    chunks.into_remainder().iter_mut().for_each(|x| *x = scalar::gelu(*x));
}

#[target_feature(enable = "avx2,fma")]
pub fn layer_norm(row: &mut [f32], gamma: &[f32], beta: &[f32], eps: f32) {
    let n = row.len();
    if !n.is_multiple_of(8) || gamma.len() != n || beta.len() != n {
        return scalar::layer_norm(row, gamma, beta, eps);
    }
    let p = row.as_mut_ptr();
    // SAFETY: `row`, `gamma` and `beta` all hold `n` floats, a multiple of 8, and every access
    // is 8 floats at an offset `i` with `i + 8 <= n`.
    unsafe {
        let mut vsum = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            vsum = _mm256_add_ps(vsum, _mm256_loadu_ps(p.add(i)));
        }
        let inv_n = 1.0 / n as f32;
        let mean = _mm256_set1_ps(sum8(vsum) * inv_n);
        let mut vsq = _mm256_setzero_ps();
        for i in (0..n).step_by(8) {
            let d = _mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mean);
            vsq = _mm256_fmadd_ps(d, d, vsq);
        }
        let var = sum8(vsq) * inv_n;
        let inv = _mm256_set1_ps(1.0 / (var + eps).sqrt());
        for i in (0..n).step_by(8) {
            let d = _mm256_sub_ps(_mm256_loadu_ps(p.add(i)), mean);
            let y = _mm256_fmadd_ps(
                _mm256_mul_ps(d, inv),
                _mm256_loadu_ps(gamma.as_ptr().add(i)),
                _mm256_loadu_ps(beta.as_ptr().add(i)),
            );
            _mm256_storeu_ps(p.add(i), y);
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

/// `R` rows x up to 16 columns (`cols`) of `y = x . w`: `x` at row stride `xs`, `kc` values
/// of k; `w` a panel's k block (`kc` rows of [`WIDTH`] floats, contiguous); `y` at row
/// stride `ys`.
///
/// # Safety
/// AVX2 and FMA present; `x` readable for `R` rows of `kc` values at stride `xs`; `w` for
/// `kc * 16` floats; `y` readable and writable for `R` rows of `cols` <= 16
/// values at stride `ys`; `bias`, unless null, readable for `cols` values.
#[inline]
#[target_feature(enable = "avx2,fma")]
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
    let full = cols >= 16;
    let m0 = tail_mask(cols.min(8));
    let m1 = tail_mask(cols.saturating_sub(8).min(8));
    // SAFETY: the caller's contract above covers every pointer offset: rows `r < R`, k
    // offsets `kk < kc`, columns below `cols` (masked loads and stores when `cols < 16`).
    unsafe {
        let mut acc = [[_mm256_setzero_ps(); 2]; R];
        if step.resume {
            for (r, acc) in acc.iter_mut().enumerate() {
                let yr = y.add(r * ys);
                if full {
                    acc[0] = _mm256_loadu_ps(yr);
                    acc[1] = _mm256_loadu_ps(yr.add(8));
                } else {
                    acc[0] = _mm256_maskload_ps(yr, m0);
                    acc[1] = _mm256_maskload_ps(yr.add(8), m1);
                }
            }
        }
        for kk in 0..kc {
            let w0 = _mm256_loadu_ps(w.add(kk * WIDTH));
            let w1 = _mm256_loadu_ps(w.add(kk * WIDTH + 8));
            for (r, acc) in acc.iter_mut().enumerate() {
                let a = _mm256_broadcast_ss(&*x.add(r * xs + kk));
                acc[0] = _mm256_fmadd_ps(a, w0, acc[0]);
                acc[1] = _mm256_fmadd_ps(a, w1, acc[1]);
            }
        }
        let (b0, b1) = if step.finish && !bias.is_null() {
            if full {
                (_mm256_loadu_ps(bias), _mm256_loadu_ps(bias.add(8)))
            } else {
                (_mm256_maskload_ps(bias, m0), _mm256_maskload_ps(bias.add(8), m1))
            }
        } else {
            (_mm256_setzero_ps(), _mm256_setzero_ps())
        };
        let add_bias = step.finish && !bias.is_null();
        for (r, acc) in acc.iter().enumerate() {
            let (mut v0, mut v1) = (acc[0], acc[1]);
            if add_bias {
                v0 = _mm256_add_ps(v0, b0);
                v1 = _mm256_add_ps(v1, b1);
            }
            if step.finish && step.gelu {
                v0 = gelu8(v0);
                v1 = gelu8(v1);
            }
            let yr = y.add(r * ys);
            if full {
                _mm256_storeu_ps(yr, v0);
                _mm256_storeu_ps(yr.add(8), v1);
            } else {
                _mm256_maskstore_ps(yr, m0, v0);
                _mm256_maskstore_ps(yr.add(8), m1, v1);
            }
        }
    }
}

/// `y[i][c] = sum_kk x[i * xs + kk] w[kk][c] (+ bias[c], then GELU with `gelu`)` for `rows`
/// rows and `cols` columns; `w` packed in panels of [`WIDTH`] columns (`k` rows each, zero
/// past `cols`), `y` at row stride `ys`; `bias` empty for none, else `cols` values.
///
/// # Safety
/// AVX2 and FMA present (the slices' lengths are checked here).
#[target_feature(enable = "avx2,fma")]
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
