//! Attention's two products on VNNI for the int8 models: `softmax(Q . K^T) . V` per head, the
//! f32 [`Attention`](super::super::f32fuse) op's work with both products in integers.
//!
//! In `avsynth/quantize.py`'s files the weight matmuls are int8 but Q . K^T and P . V stay f32
//! (both operands are activations): at vit-base's 1569 tokens they are a fifth of the
//! multiply-adds and, once the weight matmuls ran on `vpdpbusd`, a third of the time. Here
//! each head's operands are quantised as they come, symmetric, with their own scales:
//!
//! - K per key (row) and V per channel (column) to s8, packed as quads of k in panels of 16
//!   columns, as [`Weights::quads`](super::Weights) holds the weights;
//! - Q per query row to s8, stored as u8 `q + 128` (`vpdpbusd` takes u8 x s8): the sums then
//!   carry `128 x` each key's sum, which the epilogue takes off as a zero point;
//! - the softmax writes its probabilities as u8 `round(255 e)` with `e = exp(s - max)` in
//!   (0, 1], and the row's scale `1 / (255 sum e)`: the largest weight of each row keeps 8
//!   bits, the sum is the exact f32 one.
//!
//! Each product is then [`quads_product`] with a scale per row and per column: exact i32
//! sums, scaled once. Errors are those of 8-bit operands (about 0.5 % of the largest value of
//! each row or column), against the int8 weights' own; the runtime runs it only for models
//! whose weight matmuls are int8 already, and `MBT_EDGE_INT8_ATTENTION=0` keeps it f32.

use std::cell::RefCell;
use std::ops::Range;

#[cfg(target_arch = "x86_64")]
use super::{Epilogue, quads_product};
use super::{Int8Path, QUAD_PANEL};
use crate::model::f32fuse::AttentionDims;

/// Environment variable: `0` keeps the attention products of int8 models in f32, `always`
/// runs every head the path takes in int8, however few its keys (tests, benchmarks).
pub const INT8_ATTENTION_ENV: &str = "MBT_EDGE_INT8_ATTENTION";

/// When an int8 model's attention products run in int8.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Int8Attention {
    /// Never: f32, as onnxruntime runs them.
    Off,
    /// For heads of at least [`MIN_KEYS`] keys (the default).
    Auto,
    /// For every head the path takes.
    Always,
}

impl Int8Attention {
    /// From [`INT8_ATTENTION_ENV`]: `0` or `off`, `always`, else (unset too) [`Int8Attention::Auto`].
    pub fn from_env() -> Int8Attention {
        match std::env::var(INT8_ATTENTION_ENV).unwrap_or_default().trim().to_ascii_lowercase().as_str() {
            "0" | "off" => Int8Attention::Off,
            "always" => Int8Attention::Always,
            _ => Int8Attention::Auto,
        }
    }

    /// Whether an int8 model loaded on `selection` has a path for int8 attention on this CPU
    /// (its weight matmuls fused, and VNNI for the products).
    pub fn runs_on(selection: crate::model::Selection) -> bool {
        match selection {
            crate::model::Selection::Fused(kernel) => Int8Path::for_kernel(kernel).and_then(path_for).is_some(),
            crate::model::Selection::Tract => false,
        }
    }

    /// The fewest keys a head needs to run in int8 (None: none does).
    pub fn min_keys(self) -> Option<usize> {
        match self {
            Int8Attention::Off => None,
            Int8Attention::Auto => Some(MIN_KEYS),
            Int8Attention::Always => Some(1),
        }
    }
}

/// Query rows per block: their f32 scores (72 x 1584 at vit-base, 456 KiB) and u8
/// probabilities stay in L2 between the two products; a multiple of both micro-kernels' rows.
#[cfg(target_arch = "x86_64")]
const ROWS: usize = 72;

/// The int8 attention path for an int8 model whose weight matmuls run on `linear` (None: keep
/// the products f32): VNNI-512 where present (with AMX too), else AVX-VNNI; nothing for the
/// AVX2 pairs or the portable path.
pub fn path_for(linear: Int8Path) -> Option<Int8Path> {
    match linear {
        Int8Path::Amx | Int8Path::Vnni512 if super::vnni512_available() => Some(Int8Path::Vnni512),
        Int8Path::Vnni256 if super::vnni256_available() => Some(Int8Path::Vnni256),
        _ => None,
    }
}

/// Fewest keys for which [`attend`] pays: below, quantising and packing each head costs more
/// than the integer products save (edge-small's 129-133 tokens ran 5-10 % slower).
pub const MIN_KEYS: usize = 256;

/// Whether [`attend`] takes a head of `dv` values over `n` keys on `path`: at least
/// `min_keys` keys (see [`Int8Attention::min_keys`]), the mix's columns filling panels of 16;
/// the f32 attention takes the others.
pub fn takes(path: Int8Path, n: usize, dv: usize, min_keys: usize) -> bool {
    matches!(path, Int8Path::Vnni512 | Int8Path::Vnni256)
        && path.supported()
        && n >= min_keys.max(1)
        && dv > 0
        && dv.is_multiple_of(QUAD_PANEL)
}

/// One thread's buffers, reused between calls.
#[derive(Default)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Buffers {
    /// K of one head: quads (d) in panels of 16 keys, the zero point `128 x sum` and the
    /// scale of each key (zero for the pad keys up to a multiple of 16).
    k: Vec<i8>,
    k_zp: Vec<i32>,
    k_scale: Vec<f32>,
    /// V of one head: quads (keys, padded with zero keys to a multiple of 16) in panels of 16
    /// channels, and each channel's scale; zero points all zero.
    v: Vec<i8>,
    v_zp: Vec<i32>,
    v_scale: Vec<f32>,
    /// A block of query rows as u8 and their scales.
    q: Vec<u8>,
    q_scale: Vec<f32>,
    /// The block's scores (a row of keys padded to 16), probabilities and their scales.
    s: Vec<f32>,
    p: Vec<u8>,
    p_scale: Vec<f32>,
    mixed: Vec<f32>,
}

thread_local! {
    static BUFFERS: RefCell<Buffers> = RefCell::new(Buffers::default());
}

/// Head `h` of batch entry `a` for query rows `rows`, as the f32 `attend`: `write(i, values)`
/// gets the `dv` outputs of query row `i`.
///
/// # Panics
/// If [`takes`] refuses `path` and `dims` (however many keys).
#[cfg_attr(not(target_arch = "x86_64"), allow(unused_variables, unused_mut))]
pub fn attend(
    path: Int8Path,
    qkv: [&[f32]; 3],
    dims: &AttentionDims,
    a: usize,
    h: usize,
    rows: Range<usize>,
    write: impl FnMut(usize, &[f32]),
) {
    assert!(takes(path, dims.n, dims.dv, 1), "int8 attention on {path:?}: {} keys, heads of {}", dims.n, dims.dv);
    let head = Head { qkv, dims, a, h, rows };
    BUFFERS.with_borrow_mut(|b| match path {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `takes` confirmed the path's CPU features.
        Int8Path::Vnni512 => unsafe { attend_512(b, head, write) },
        #[cfg(target_arch = "x86_64")]
        // SAFETY: as above.
        Int8Path::Vnni256 => unsafe { attend_256(b, head, write) },
        other => unreachable!("int8 attention on {other:?}: {:?}", head.rows),
    })
}

/// What one [`attend`] call works on: Q, K and V, their shapes, batch entry `a`, head `h`,
/// the query rows.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
struct Head<'a> {
    qkv: [&'a [f32]; 3],
    dims: &'a AttentionDims,
    a: usize,
    h: usize,
    rows: Range<usize>,
}

/// [`attend`] on AVX-512 VNNI.
///
/// # Safety
/// AVX-512F and AVX-512 VNNI present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512vnni")]
unsafe fn attend_512(b: &mut Buffers, head: Head, write: impl FnMut(usize, &[f32])) {
    // SAFETY: this function's features cover `softmax_u8_512` and the path's product.
    unsafe { body(Int8Path::Vnni512, b, head, write, |s, n, p| softmax_u8_512(s, n, p)) }
}

/// [`attend`] on AVX-VNNI (ymm).
///
/// # Safety
/// AVX2, FMA and AVX-VNNI present.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma,avxvnni")]
unsafe fn attend_256(b: &mut Buffers, head: Head, write: impl FnMut(usize, &[f32])) {
    // SAFETY: this function's features cover `softmax_u8_256` and the path's product.
    unsafe { body(Int8Path::Vnni256, b, head, write, |s, n, p| softmax_u8_256(s, n, p)) }
}

#[cfg(target_arch = "x86_64")]
/// `round(x)` to the nearest integer, ties to even (the default rounding mode), for
/// `|x| < 2^22`: plain arithmetic the compiler vectorises.
#[inline(always)]
fn round(x: f32) -> f32 {
    const MAGIC: f32 = 12_582_912.0; // 1.5 x 2^23
    (x + MAGIC) - MAGIC
}

#[cfg(target_arch = "x86_64")]
/// The scale of a symmetric 8-bit quantisation of values up to `amax` and its inverse (both
/// zero for an all-zero set, which then quantises to zeros).
#[inline(always)]
fn scales(amax: f32) -> (f32, f32) {
    if amax > 0.0 && amax.is_finite() { (amax / 127.0, 127.0 / amax) } else { (0.0, 0.0) }
}

/// Rows ahead that the loops over K, V and Q rows prefetch: each head's rows are a few cache
/// lines `heads` times as far apart, so the hardware prefetcher does not see them coming.
#[cfg(target_arch = "x86_64")]
const AHEAD: usize = 8;

/// Asks for the cache lines of `values` (a hint: no effect on results).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn prefetch(values: &[f32]) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    for line in values.chunks(16) {
        // SAFETY: a prefetch reads nothing; the address is inside `values`.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr() as *const i8) };
    }
}

/// The largest |x| of `values`.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn amax(values: &[f32]) -> f32 {
    values.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// `x` rounded and clamped to -127..=127 (NaN to -127), as an i32.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn s8(x: f32) -> i32 {
    // `max` takes the other operand for a NaN, so the value is finite and in range (`clamp`
    // would keep the NaN).
    #[allow(clippy::manual_clamp)]
    let clamped = round(x).max(-127.0).min(127.0);
    // SAFETY: `clamped` is finite and within i32 (the plain conversion, which vectorises;
    // `as` checks for NaN and overflow per value).
    unsafe { clamped.to_int_unchecked::<i32>() }
}

/// `values` times `inv`, quantised by [`s8`], into `out` (as long).
#[cfg(target_arch = "x86_64")]
#[inline(always)]
fn quantise(values: &[f32], inv: f32, out: &mut [i8]) {
    for (q, &x) in out.iter_mut().zip(values) {
        *q = s8(x * inv) as i8;
    }
}

#[cfg(target_arch = "x86_64")]
/// The work of [`attend`], inlined into each path's function (and compiled with its
/// features); `softmax_u8(s, n, p)` turns a row of scores (`s.len()` a multiple of 16, the
/// first `n` real) into u8 probabilities and returns their scale.
///
/// # Safety
/// `path`'s CPU features present, and those `softmax_u8` needs.
#[inline(always)]
unsafe fn body(
    path: Int8Path,
    b: &mut Buffers,
    head: Head,
    mut write: impl FnMut(usize, &[f32]),
    softmax_u8: impl Fn(&[f32], usize, &mut [u8]) -> f32,
) {
    let Head { qkv: [q, k, v], dims, a, h, rows } = head;
    let AttentionDims { m, n, heads, d, dv } = *dims;
    let (q_row, v_row) = (heads * d, heads * dv);
    let n16 = n.next_multiple_of(QUAD_PANEL);
    let dq = d.div_ceil(4);
    assert!(rows.end <= m && q.len() >= (a + 1) * m * q_row && k.len() >= (a + 1) * n * q_row);
    assert!(v.len() >= (a + 1) * n * v_row && h < heads);
    // K: per key j (a column of the scores), s8 in panel j / 16, lane j % 16, quad dd / 4:
    // each key quantised into `row` (contiguous, so vectorised), then its quads stored.
    b.k.clear();
    b.k.resize(n16 * dq * 4, 0);
    b.k_zp.clear();
    b.k_zp.resize(n16, 0);
    b.k_scale.clear();
    b.k_scale.resize(n16, 0.0);
    let mut row = vec![0i8; dq * 4];
    for j in 0..n {
        if j + AHEAD < n {
            prefetch(&k[(a * n + j + AHEAD) * q_row + h * d..][..d]);
        }
        let key = &k[(a * n + j) * q_row + h * d..][..d];
        let (scale, inv) = scales(amax(key));
        quantise(key, inv, &mut row[..d]);
        let panel = &mut b.k[(j / QUAD_PANEL) * dq * 64 + (j % QUAD_PANEL) * 4..];
        for (quad, values) in row.chunks_exact(4).enumerate() {
            panel[quad * 64..][..4].copy_from_slice(values);
        }
        b.k_zp[j] = 128 * row.iter().map(|&v| v as i32).sum::<i32>();
        b.k_scale[j] = scale;
    }
    // V: per channel c (a column of the mix) one scale; s8 in panel c / 16, lane c % 16, quad
    // j / 4 of the keys: four keys quantised into `rows`, then each channel's four bytes stored.
    let kv = n16 / 4;
    b.v_scale.clear();
    b.v_scale.resize(dv, 0.0);
    for j in 0..n {
        if j + AHEAD < n {
            prefetch(&v[(a * n + j + AHEAD) * v_row + h * dv..][..dv]);
        }
        let values = &v[(a * n + j) * v_row + h * dv..][..dv];
        for (amax, &x) in b.v_scale.iter_mut().zip(values) {
            *amax = amax.max(x.abs());
        }
    }
    let mut inv = vec![0f32; dv];
    for (scale, inv) in b.v_scale.iter_mut().zip(&mut inv) {
        (*scale, *inv) = scales(*scale);
    }
    b.v.clear();
    b.v.resize(dv * kv * 4, 0);
    b.v_zp.clear();
    b.v_zp.resize(dv, 0);
    let mut rows4 = vec![0i8; 4 * dv];
    for j0 in (0..n).step_by(4) {
        for (t, quantised) in rows4.chunks_exact_mut(dv).enumerate() {
            if j0 + t < n {
                let values = &v[(a * n + j0 + t) * v_row + h * dv..][..dv];
                for ((q, &x), &inv) in quantised.iter_mut().zip(values).zip(&inv) {
                    *q = s8(x * inv) as i8;
                }
            } else {
                quantised.fill(0);
            }
        }
        let (r0, rest) = rows4.split_at(dv);
        let (r1, rest) = rest.split_at(dv);
        let (r2, r3) = rest.split_at(dv);
        for c in 0..dv {
            let at = ((c / QUAD_PANEL) * kv + j0 / 4) * 64 + (c % QUAD_PANEL) * 4;
            b.v[at..at + 4].copy_from_slice(&[r0[c], r1[c], r2[c], r3[c]]);
        }
    }
    b.q.resize(ROWS * dq * 4, 0);
    b.q_scale.resize(ROWS, 0.0);
    b.s.resize(ROWS * n16, 0.0);
    b.p.resize(ROWS * n16, 0);
    b.p_scale.resize(ROWS, 0.0);
    b.mixed.resize(ROWS * dv, 0.0);
    for r0 in rows.clone().step_by(ROWS) {
        let count = (rows.end - r0).min(ROWS);
        for i in 0..count {
            if r0 + i + AHEAD < rows.end {
                prefetch(&q[(a * m + r0 + i + AHEAD) * q_row + h * d..][..d]);
            }
            let query = &q[(a * m + r0 + i) * q_row + h * d..][..d];
            let (scale, inv) = scales(amax(query));
            // The pad past d meets the zero pad of every key: whatever it holds adds nothing.
            for (byte, &x) in b.q[i * dq * 4..][..d].iter_mut().zip(query) {
                *byte = (s8(x * inv) + 128) as u8;
            }
            b.q_scale[i] = scale;
        }
        let e = Epilogue { zp: &b.k_zp, scale: &b.k_scale, bias: &[], rows: &b.q_scale[..count] };
        // SAFETY: the path's features per this function's contract; the lengths are checked
        // by `quads_product`.
        unsafe { quads_product(path, &b.q[..count * dq * 4], dq, &b.k, &e, &mut b.s[..count * n16], n16) };
        for i in 0..count {
            b.p_scale[i] = softmax_u8(&b.s[i * n16..][..n16], n, &mut b.p[i * n16..][..n16]);
        }
        let e = Epilogue { zp: &b.v_zp, scale: &b.v_scale, bias: &[], rows: &b.p_scale[..count] };
        // SAFETY: as above; the probabilities past n meet V's zero pad keys.
        unsafe { quads_product(path, &b.p[..count * n16], kv, &b.v, &e, &mut b.mixed[..count * dv], dv) };
        for (i, values) in b.mixed[..count * dv].chunks_exact(dv).enumerate() {
            write(r0 + i, values);
        }
    }
}

/// A row of scores `s` (a multiple of 16 long, the first `n` real) into u8 probabilities `p`
/// (`round(255 exp(s - max))`; past `n` whatever the pad scores give) and their scale
/// `1 / (255 sum exp(s - max))` over the first `n`.
///
/// # Safety
/// AVX-512F present; `p` as long as `s` (checked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn softmax_u8_512(s: &[f32], n: usize, p: &mut [u8]) -> f32 {
    use std::arch::x86_64::*;
    assert!(s.len().is_multiple_of(16) && p.len() == s.len() && n <= s.len());
    if n == 0 {
        return 0.0;
    }
    let last = (n - 1) / 16 * 16;
    let tail = (u32::MAX >> (32 - (n - last))) as __mmask16;
    // SAFETY: every access is 16 values at `i <= last`, `last + 16 <= s.len() = p.len()`.
    unsafe {
        let ps = s.as_ptr();
        let mut vmax = _mm512_set1_ps(f32::NEG_INFINITY);
        for i in (0..last).step_by(16) {
            vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(ps.add(i)));
        }
        vmax = _mm512_mask_max_ps(vmax, tail, vmax, _mm512_loadu_ps(ps.add(last)));
        let max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
        let scale = _mm512_set1_ps(255.0);
        let mut vsum = _mm512_setzero_ps();
        for i in (0..=last).step_by(16) {
            let e = crate::model::f32fuse::exp16(_mm512_sub_ps(_mm512_loadu_ps(ps.add(i)), max));
            vsum = if i == last { _mm512_mask_add_ps(vsum, tail, vsum, e) } else { _mm512_add_ps(vsum, e) };
            let bytes = _mm512_cvtusepi32_epi8(_mm512_cvtps_epi32(_mm512_mul_ps(e, scale)));
            _mm_storeu_si128(p.as_mut_ptr().add(i) as *mut __m128i, bytes);
        }
        1.0 / (255.0 * _mm512_reduce_add_ps(vsum))
    }
}

/// [`softmax_u8_512`] on AVX2.
///
/// # Safety
/// AVX2 and FMA present; `p` as long as `s` (checked).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn softmax_u8_256(s: &[f32], n: usize, p: &mut [u8]) -> f32 {
    use std::arch::x86_64::*;
    assert!(s.len().is_multiple_of(16) && p.len() == s.len() && n <= s.len());
    if n == 0 {
        return 0.0;
    }
    use crate::model::f32fuse::{exp8, max8, sum8, tail_mask8};
    let last = (n - 1) / 8 * 8;
    let tail = _mm256_castsi256_ps(tail_mask8(n - last));
    // SAFETY: every access is 8 values at `i <= last`, `last + 8 <= s.len() = p.len()`.
    unsafe {
        let ps = s.as_ptr();
        let neg_inf = _mm256_set1_ps(f32::NEG_INFINITY);
        let mut vmax = neg_inf;
        for i in (0..last).step_by(8) {
            vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(ps.add(i)));
        }
        vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(neg_inf, _mm256_loadu_ps(ps.add(last)), tail));
        let max = _mm256_set1_ps(max8(vmax));
        let scale = _mm256_set1_ps(255.0);
        let mut vsum = _mm256_setzero_ps();
        for i in (0..=last).step_by(8) {
            let e = exp8(_mm256_sub_ps(_mm256_loadu_ps(ps.add(i)), max));
            vsum = _mm256_add_ps(vsum, if i == last { _mm256_and_ps(e, tail) } else { e });
            let words = _mm256_cvtps_epi32(_mm256_mul_ps(e, scale));
            let half = _mm_packus_epi32(_mm256_castsi256_si128(words), _mm256_extracti128_si256::<1>(words));
            _mm_storel_epi64(p.as_mut_ptr().add(i) as *mut __m128i, _mm_packus_epi16(half, half));
        }
        1.0 / (255.0 * sum8(vsum))
    }
}
