//! Block-wise fp8 → bf16 dequantisation, for checkpoints that ship float8 weights with a
//! float32 scale per block (DeepSeek-V3/R1, the "-FP8" Qwen3/GLM releases): `X.weight`
//! [n, k] in float8 and `X.weight_scale_inv` [⌈n/bn⌉, ⌈k/bk⌉], the last block of a
//! dimension possibly partial.
//!
//! Every element becomes `bf16(f32(w8) · scale)` rounded to nearest even, which is what
//! torch computes for `(w.float() * scale).to(torch.bfloat16)`, bit for bit (NaN stays a
//! NaN, whose payload torch itself does not keep consistently). Inside a block the scale
//! is fixed, so the 256 possible results are computed once per block and every element is
//! one byte-indexed lookup: loading a model is bound by this loop, and a lookup is several
//! times cheaper than decoding, multiplying and rounding each element.

use crate::bf16;
use crate::error::{checked_size, KtrsError, Result};
use crate::pool::ThreadPool;
use std::ops::Range;

/// The two float8 encodings of checkpoints (torch's `float8_e4m3fn`, `float8_e5m2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fp8Format {
    /// 4 exponent bits (bias 7), 3 mantissa bits, no infinities; S.1111.111 is NaN.
    E4M3Fn,
    /// 5 exponent bits (bias 15), 2 mantissa bits; IEEE-like infinities and NaNs.
    E5M2,
}

/// 2^e for the exponents float8 reaches (all normal f32s), exactly.
fn pow2(e: i32) -> f32 {
    f32::from_bits(((e + 127) as u32) << 23)
}

impl Fp8Format {
    /// The exact f32 value of bit pattern `b`.
    pub fn decode(self, b: u8) -> f32 {
        let (man_bits, bias, max_exp) = match self {
            Fp8Format::E4M3Fn => (3, 7, 15),
            Fp8Format::E5M2 => (2, 15, 31),
        };
        let e = i32::from((b & 0x7f) >> man_bits);
        let m = i32::from(b) & ((1 << man_bits) - 1);
        let mag = match self {
            Fp8Format::E4M3Fn if e == max_exp && m == 7 => f32::NAN,
            Fp8Format::E5M2 if e == max_exp && m == 0 => f32::INFINITY,
            Fp8Format::E5M2 if e == max_exp => f32::NAN,
            _ if e == 0 => m as f32 * pow2(1 - bias - man_bits),
            _ => (1.0 + m as f32 * pow2(-man_bits)) * pow2(e - bias),
        };
        if b & 0x80 != 0 {
            -mag
        } else {
            mag
        }
    }

    /// [`Self::decode`] of every bit pattern.
    pub fn table(self) -> [f32; 256] {
        std::array::from_fn(|b| self.decode(b as u8))
    }
}

/// Rows per task at most: small enough that an expert's few block rows still spread over
/// every thread, large enough that the 256 products per block and task stay a few
/// percent of the work (64 × 128 columns: 3%).
const ROWS_PER_TASK: usize = 64;

/// Dequantises `weight` ([n, k] row-major float8 bits in `format`) with `scale`
/// ([⌈n/bn⌉, ⌈k/bk⌉] row-major, `block` = [bn, bk]) into `out` ([n, k] bf16 bits), on
/// `pool` when given.
pub fn dequantize_bf16(
    format: Fp8Format,
    weight: &[u8],
    shape: [usize; 2],
    scale: &[f32],
    block: [usize; 2],
    out: &mut [u16],
    pool: Option<&ThreadPool>,
) -> Result<()> {
    let simd = vbmi::available();
    dequantize_with(
        format,
        weight,
        shape,
        scale,
        block,
        0..shape[0],
        out,
        pool,
        simd,
    )
}

/// [`dequantize_bf16`] of rows `rows` of the [n, k] matrix only: `weight` and `out` hold
/// just those rows ([rows.len(), k]), so a loader can read, convert and pack a strip while
/// it is still in cache instead of holding the whole matrix (or its bf16) in memory.
pub fn dequantize_rows(
    format: Fp8Format,
    weight: &[u8],
    shape: [usize; 2],
    scale: &[f32],
    block: [usize; 2],
    rows: Range<usize>,
    out: &mut [u16],
) -> Result<()> {
    let simd = vbmi::available();
    dequantize_with(format, weight, shape, scale, block, rows, out, None, simd)
}

#[allow(clippy::too_many_arguments)]
fn dequantize_with(
    format: Fp8Format,
    weight: &[u8],
    [n, k]: [usize; 2],
    scale: &[f32],
    block: [usize; 2],
    rows: Range<usize>,
    out: &mut [u16],
    pool: Option<&ThreadPool>,
    simd: bool,
) -> Result<()> {
    let [bn, bk] = block;
    if bn == 0 || bk == 0 {
        return Err(KtrsError::invalid(
            "block",
            "two positive sizes",
            format!("{block:?}"),
        ));
    }
    let (gn, gk) = (n.div_ceil(bn), k.div_ceil(bk));
    if scale.len() != gn * gk {
        return Err(KtrsError::invalid(
            "scale",
            format!(
                "{} elements ([{gn}, {gk}]: [{n}, {k}] in blocks of [{bn}, {bk}])",
                gn * gk
            ),
            scale.len(),
        ));
    }
    if rows.start > rows.end || rows.end > n {
        return Err(KtrsError::invalid(
            "rows",
            format!("rows of 0..{n}"),
            format!("{rows:?}"),
        ));
    }
    let len = checked_size("weight", &[rows.len(), k])?;
    if weight.len() != len {
        return Err(KtrsError::invalid(
            "weight",
            format!("{len} elements ([{}, {k}])", rows.len()),
            weight.len(),
        ));
    }
    if out.len() != rows.len() * k {
        return Err(KtrsError::invalid(
            "out",
            format!("{} elements ([{}, {k}])", rows.len() * k, rows.len()),
            out.len(),
        ));
    }
    if out.is_empty() {
        return Ok(());
    }
    let values = format.table();
    // Tasks never straddle a block row, so each sees one row of scales. A block taller
    // than the matrix (one scale per tensor) counts as n rows, not as bn / 64 tasks.
    let per_block_row = bn.min(n).div_ceil(ROWS_PER_TASK);
    let chunk = bn.min(n).div_ceil(per_block_row);
    let first_block_row = rows.start / bn;
    let tasks = (rows.end.div_ceil(bn) - first_block_row) * per_block_row;
    let dst = crate::buffer::SendPtr(out.as_mut_ptr());
    let task = |t: usize, _: usize| {
        let br = first_block_row + t / per_block_row;
        let r0 = (br * bn + t % per_block_row * chunk).max(rows.start);
        let r1 = (br * bn + (t % per_block_row + 1) * chunk)
            .min((br + 1) * bn)
            .min(rows.end);
        if r0 >= r1 {
            return;
        }
        // SAFETY: tasks own disjoint row ranges r0..r1 of `out` (rows.len()·k, checked
        // above), which starts at row rows.start, as `weight` does.
        let dst = unsafe { dst.slice_mut((r0 - rows.start) * k, (r1 - r0) * k) };
        let src = &weight[(r0 - rows.start) * k..(r1 - rows.start) * k];
        for (bc, &s) in scale[br * gk..(br + 1) * gk].iter().enumerate() {
            let table: [u16; 256] = std::array::from_fn(|b| bf16::from_f32(values[b] * s));
            let (c0, c1) = (bc * bk, ((bc + 1) * bk).min(k));
            if simd {
                // SAFETY: `simd` is only set where `vbmi::available()` said so.
                unsafe { vbmi::map_columns(&table, src, dst, k, c0, c1) };
                continue;
            }
            for (o, w) in dst.chunks_exact_mut(k).zip(src.chunks_exact(k)) {
                for (o, &b) in o[c0..c1].iter_mut().zip(&w[c0..c1]) {
                    *o = table[usize::from(b)];
                }
            }
        }
    };
    match pool {
        Some(p) => p.run(tasks, task),
        None => (0..tasks).for_each(|t| task(t, 0)),
    }
    Ok(())
}

/// The per-block table lookup 64 bytes at a time with AVX-512 VBMI byte permutes (Ice
/// Lake / Sapphire Rapids, Zen 4): the table's low and high bytes are four registers each,
/// and a lookup is two two-register permutes blended by the index's top bit, per byte
/// plane. The scalar lookup is one element per cycle at best, slower than reading.
#[cfg(target_arch = "x86_64")]
mod vbmi {
    use std::arch::x86_64::*;

    pub fn available() -> bool {
        is_x86_feature_detected!("avx512f")
            && is_x86_feature_detected!("avx512bw")
            && is_x86_feature_detected!("avx512vbmi")
    }

    /// `out[r][c] = table[src[r][c]]` for columns `c0..c1` of every row (`k` long).
    ///
    /// # Safety
    /// The CPU must have AVX-512 F, BW and VBMI; `src` and `out` hold whole rows of `k`.
    #[target_feature(enable = "avx512f,avx512bw,avx512vbmi")]
    pub unsafe fn map_columns(
        table: &[u16; 256],
        src: &[u8],
        out: &mut [u16],
        k: usize,
        c0: usize,
        c1: usize,
    ) {
        let lo: [u8; 256] = std::array::from_fn(|b| table[b] as u8);
        let hi: [u8; 256] = std::array::from_fn(|b| (table[b] >> 8) as u8);
        let reg = |plane: &[u8; 256], q: usize| _mm512_loadu_si512(plane[64 * q..].as_ptr().cast());
        let (l0, l1, l2, l3) = (reg(&lo, 0), reg(&lo, 1), reg(&lo, 2), reg(&lo, 3));
        let (h0, h1, h2, h3) = (reg(&hi, 0), reg(&hi, 1), reg(&hi, 2), reg(&hi, 3));
        // Byte unpacks interleave within 128-bit lanes; these put the 64 u16 back in order.
        let first = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
        let second = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
        for (w, o) in src.chunks_exact(k).zip(out.chunks_exact_mut(k)) {
            let mut c = c0;
            while c < c1 {
                let left = c1 - c;
                let m: __mmask64 = if left >= 64 { !0 } else { (1u64 << left) - 1 };
                let x = _mm512_maskz_loadu_epi8(m, w[c..].as_ptr().cast());
                let top = _mm512_movepi8_mask(x);
                let lo_b = _mm512_mask_blend_epi8(
                    top,
                    _mm512_permutex2var_epi8(l0, x, l1),
                    _mm512_permutex2var_epi8(l2, x, l3),
                );
                let hi_b = _mm512_mask_blend_epi8(
                    top,
                    _mm512_permutex2var_epi8(h0, x, h1),
                    _mm512_permutex2var_epi8(h2, x, h3),
                );
                let a = _mm512_unpacklo_epi8(lo_b, hi_b);
                let b = _mm512_unpackhi_epi8(lo_b, hi_b);
                let p = o[c..].as_mut_ptr().cast::<i16>();
                _mm512_mask_storeu_epi16(p, m as __mmask32, _mm512_permutex2var_epi64(a, first, b));
                _mm512_mask_storeu_epi16(
                    p.add(32),
                    (m >> 32) as __mmask32,
                    _mm512_permutex2var_epi64(a, second, b),
                );
                c += 64;
            }
        }
    }
}

#[cfg(not(target_arch = "x86_64"))]
mod vbmi {
    pub fn available() -> bool {
        false
    }

    /// # Safety
    /// Never called: [`available`] is false.
    pub unsafe fn map_columns(
        _: &[u16; 256],
        _: &[u8],
        _: &mut [u16],
        _: usize,
        _: usize,
        _: usize,
    ) {
        unreachable!()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The definition, element by element: decode, multiply by the block's scale in f32,
    /// round to bf16.
    fn reference(
        f: Fp8Format,
        w: &[u8],
        n: usize,
        k: usize,
        s: &[f32],
        bn: usize,
        bk: usize,
    ) -> Vec<u16> {
        let gk = k.div_ceil(bk);
        (0..n * k)
            .map(|x| {
                let (r, c) = (x / k, x % k);
                bf16::from_f32(f.decode(w[x]) * s[r / bn * gk + c / bk])
            })
            .collect()
    }

    fn lcg(seed: &mut u64) -> u32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        (*seed >> 33) as u32
    }

    #[test]
    fn decode_known_values() {
        use Fp8Format::*;
        assert_eq!(E4M3Fn.decode(0x00), 0.0);
        assert_eq!(E4M3Fn.decode(0x80).to_bits(), (-0.0f32).to_bits());
        assert_eq!(E4M3Fn.decode(0x38), 1.0);
        assert_eq!(E4M3Fn.decode(0x7e), 448.0);
        assert_eq!(E4M3Fn.decode(0xfe), -448.0);
        assert_eq!(E4M3Fn.decode(0x01), 2.0f32.powi(-9));
        assert_eq!(E4M3Fn.decode(0x07), 7.0 * 2.0f32.powi(-9));
        assert_eq!(E4M3Fn.decode(0x08), 2.0f32.powi(-6));
        assert!(E4M3Fn.decode(0x7f).is_nan() && E4M3Fn.decode(0xff).is_nan());
        assert_eq!(E4M3Fn.decode(0x78), 256.0); // S.1111.000 is a number in e4m3fn
        assert_eq!(E5M2.decode(0x3c), 1.0);
        assert_eq!(E5M2.decode(0x7b), 57344.0);
        assert_eq!(E5M2.decode(0x01), 2.0f32.powi(-16));
        assert_eq!(E5M2.decode(0x7c), f32::INFINITY);
        assert_eq!(E5M2.decode(0xfc), f32::NEG_INFINITY);
        assert!((0x7d..=0x7f).all(|b| E5M2.decode(b).is_nan()));
        // Finite values are ordered by their bit patterns (a decode error would show).
        for f in [E4M3Fn, E5M2] {
            let t = f.table();
            let pos: Vec<f32> = t[..0x80]
                .iter()
                .copied()
                .filter(|v| v.is_finite())
                .collect();
            assert!(pos.windows(2).all(|w| w[0] < w[1]), "{f:?}");
        }
    }

    #[test]
    fn matches_the_scalar_reference() {
        let pool = ThreadPool::new(3, false).unwrap();
        let mut seed = 7u64;
        // Whole blocks, partial last blocks along either dim, a single per-tensor scale,
        // one-element blocks, empty.
        for (n, k, bn, bk) in [
            (256usize, 256, 128, 128),
            (200, 300, 128, 128),
            (48, 64, 32, 24),
            (7, 5, 7, 5),
            (5, 9, 1, 1),
            (130, 1, 64, 4),
            (3, 200, 2, 100),
            (2, 129, 2, 129),
            (70, 9, usize::MAX, usize::MAX),
            (0, 8, 4, 4),
        ] {
            for f in [Fp8Format::E4M3Fn, Fp8Format::E5M2] {
                // Every bit pattern (NaN and infinity included) appears.
                let w: Vec<u8> = (0..n * k)
                    .map(|x| (x as u32 ^ lcg(&mut seed)) as u8)
                    .collect();
                let grid = n.div_ceil(bn) * k.div_ceil(bk);
                let s: Vec<f32> = (0..grid)
                    .map(|x| match x % 4 {
                        0 => 0.0,
                        1 => 1e-12,
                        _ => (lcg(&mut seed) % 10_000) as f32 * 1.37e-5,
                    })
                    .collect();
                let want = reference(f, &w, n, k, &s, bn, bk);
                for p in [None, Some(&pool)] {
                    for simd in [false, vbmi::available()] {
                        let mut got = vec![0xabcdu16; n * k];
                        let all = 0..n;
                        dequantize_with(f, &w, [n, k], &s, [bn, bk], all, &mut got, p, simd)
                            .unwrap();
                        assert_eq!(
                            got, want,
                            "{f:?} n={n} k={k} block=[{bn}, {bk}] simd={simd}"
                        );
                        // Strips that start and end inside blocks, and straddle them.
                        for strip in [1, 16, 37] {
                            for r0 in (0..n).step_by(strip) {
                                let rows = r0..(r0 + strip).min(n);
                                let mut got = vec![0xabcdu16; rows.len() * k];
                                let (b, r) = ([bn, bk], rows.clone());
                                let w = &w[r0 * k..rows.end * k];
                                dequantize_with(f, w, [n, k], &s, b, r, &mut got, p, simd).unwrap();
                                assert!(
                                    got == want[r0 * k..rows.end * k],
                                    "{f:?} n={n} k={k} block={b:?} rows={rows:?} simd={simd}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn wrong_sizes_name_the_argument() {
        let mut out = vec![0u16; 12];
        let arg = |r: Result<()>| match r {
            Err(KtrsError::InvalidArgument { arg, .. }) => arg,
            other => panic!("{other:?}"),
        };
        let f = Fp8Format::E4M3Fn;
        let w = [0u8; 12];
        assert_eq!(
            arg(dequantize_bf16(
                f,
                &w[..11],
                [3, 4],
                &[1.0],
                [4, 4],
                &mut out,
                None
            )),
            "weight"
        );
        assert_eq!(
            arg(dequantize_bf16(
                f,
                &w,
                [3, 4],
                &[1.0, 2.0],
                [4, 4],
                &mut out,
                None
            )),
            "scale"
        );
        assert_eq!(
            arg(dequantize_bf16(
                f,
                &w,
                [3, 4],
                &[1.0; 2],
                [2, 4],
                &mut out[..6],
                None
            )),
            "out"
        );
        assert_eq!(
            arg(dequantize_bf16(
                f,
                &w,
                [3, 4],
                &[1.0],
                [0, 4],
                &mut out,
                None
            )),
            "block"
        );
        let rows = |w: &[u8], r: Range<usize>, len: usize| {
            dequantize_rows(f, w, [3, 4], &[1.0; 2], [2, 4], r, &mut vec![0; len])
        };
        assert_eq!(arg(rows(&w[..8], 2..4, 8)), "rows");
        // The weight of just the rows, not the whole matrix.
        assert_eq!(arg(rows(&w, 1..3, 8)), "weight");
        assert_eq!(arg(rows(&w[..8], 1..3, 12)), "out");
        rows(&w[..8], 1..3, 8).unwrap();
        dequantize_bf16(f, &w, [3, 4], &[1.0; 2], [2, 4], &mut out, None).unwrap();
    }
}
