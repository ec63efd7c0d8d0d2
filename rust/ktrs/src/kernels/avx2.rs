//! AVX2 + FMA GEMM on the VNNI panels: no bf16 dot product here, so each 64-byte pair
//! line (16 outputs × an input pair) is widened in registers into two f32 vectors per
//! 8 outputs, the even input by a 16-bit shift and the odd one by masking the low half,
//! and multiplied by the broadcast f32 activations. A is widened to f32 once per call
//! (a block of rows at a time) so each broadcast is a plain load, not load + shift.
//!
//! Register block: `MR` rows × 1 panel (16 outputs = 2 ymm per row), i.e. 10 f32
//! accumulators + 4 widened weight vectors + 2 broadcasts = 16 ymm. Each accumulator
//! takes two dependent FMAs per input pair, so fewer than 4 rows would wait on FMA
//! latency: 1-4 rows (a weight stream) take 2 or 4 panels at once. Measured on one
//! Xeon (Emerald Rapids) core, `probe_fma_peak_and_gemm` / `weight_stream`: 5×1 reaches
//! 61-66% of the ymm FMA peak (4×1: 56-61%, 3×2: 47-50%); with 3 rows, 3×2 streams
//! 7.6 GB/s against 6.0 for 5×1.

use super::Gemm;
use crate::pack::PANEL;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Rows of the register block.
const MR: usize = 5;
/// Rows widened to f32 at a time: their f32 copy (up to 240 KiB at k = 2048) stays in
/// L2 while every panel of the call passes over it.
const MB: usize = 6 * MR;

thread_local! {
    /// The f32 copy of the current row block of A.
    static AF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// # Safety
/// The CPU must support AVX2 and FMA; bounds were checked by `Gemm::check`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm(g: Gemm<'_>) {
    AF.with(|cell| {
        let mut af = cell.borrow_mut();
        let k = g.k_pad;
        if af.len() < MB.min(g.m) * k {
            af.resize(MB.min(g.m) * k, 0.0);
        }
        let panel_len = k * PANEL;
        let kp2 = k / 2;
        let mut i0 = 0;
        while i0 < g.m {
            let mb = (g.m - i0).min(MB);
            widen_rows(&g.a[i0 * g.lda..], g.lda, mb, k, &mut af);
            let a = af.as_ptr();
            let b = g.b.as_ptr();
            let c = g.c.as_mut_ptr().add(i0 * g.ldc);
            // (rows, panels) of the register block: see module doc.
            let (mr_max, nps) = match mb {
                1 => (1, 4),
                2 | 4 => (2, 2),
                3 => (3, 2),
                _ => (MR, 1),
            };
            let mut p = 0;
            while p < g.np {
                let np = (g.np - p).min(nps);
                let bp = b.add(p * panel_len);
                let mut i = 0;
                while i < mb {
                    let mr = (mb - i).min(mr_max);
                    let (ap, cp) = (a.add(i * k), c.add(i * g.ldc + p * PANEL));
                    let args = (ap, k, bp, panel_len, kp2, cp, g.ldc);
                    match (mr, np) {
                        (1, 4) => tile::<1, 4>(args),
                        (1, 3) => tile::<1, 3>(args),
                        (1, 2) => tile::<1, 2>(args),
                        (1, _) => tile::<1, 1>(args),
                        (2, 2) => tile::<2, 2>(args),
                        (2, _) => tile::<2, 1>(args),
                        (3, 2) => tile::<3, 2>(args),
                        (3, _) => tile::<3, 1>(args),
                        (4, _) => tile::<4, 1>(args),
                        _ => tile::<5, 1>(args),
                    }
                    i += mr;
                }
                p += np;
            }
            i0 += mb;
        }
    })
}

/// bf16 rows `a[r·lda ..][..k]` for `r < rows` into f32 rows of stride k.
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn widen_rows(a: &[u16], lda: usize, rows: usize, k: usize, out: &mut [f32]) {
    assert!(out.len() >= rows * k && a.len() >= (rows - 1) * lda + k);
    for r in 0..rows {
        let (src, dst) = (a.as_ptr().add(r * lda), out.as_mut_ptr().add(r * k));
        // k is a multiple of 32.
        for c in (0..k).step_by(8) {
            let v = _mm256_cvtepu16_epi32(_mm_loadu_si128(src.add(c) as *const __m128i));
            _mm256_storeu_ps(dst.add(c), _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)));
        }
    }
}

type TileArgs = (*const f32, usize, *const u16, usize, usize, *mut f32, usize);

/// `M` rows × `NP` panels: C = A·Bᵀ over the whole K (f32 A rows of stride `lda`).
#[inline(always)]
unsafe fn tile<const M: usize, const NP: usize>((a, lda, b, panel_len, kp2, c, ldc): TileArgs) {
    let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut acc = [[[_mm256_setzero_ps(); 2]; NP]; M];
    for j in 0..kp2 {
        for q in 0..NP {
            let line = b.add(q * panel_len + j * 2 * PANEL);
            let mut even = [_mm256_setzero_ps(); 2];
            let mut odd = [_mm256_setzero_ps(); 2];
            for h in 0..2 {
                let v = _mm256_loadu_si256(line.add(h * PANEL) as *const __m256i);
                even[h] = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                odd[h] = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let ae = _mm256_broadcast_ss(&*a.add(r * lda + 2 * j));
                let ao = _mm256_broadcast_ss(&*a.add(r * lda + 2 * j + 1));
                for h in 0..2 {
                    row[q][h] = _mm256_fmadd_ps(ae, even[h], row[q][h]);
                    row[q][h] = _mm256_fmadd_ps(ao, odd[h], row[q][h]);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (q, pair) in row.iter().enumerate() {
            for (h, v) in pair.iter().enumerate() {
                _mm256_storeu_ps(c.add(r * ldc + q * PANEL + h * 8), *v);
            }
        }
    }
}

/// `kernels::gemm_transposed` (`c[i, q] = Σ_n a[i, n] · W[n, c0 + q]`, few rows, read
/// from the forward panels) on the shared sweep, with the blocks in ymm registers.
///
/// # Safety
/// AVX2 + FMA; bounds checked by `kernels::gemm_transposed`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm_transposed(g: super::TransposedGemm<'_>) {
    super::scalar::transposed_sweep(g, |g, part, chunk, i0, rows, line0| {
        // SAFETY: the sweep keeps rows, panels and lines inside the checked bounds.
        unsafe {
            if rows == 2 {
                transposed_block::<2, 2>(g, part, chunk.clone(), i0, line0);
                transposed_block::<2, 2>(g, part, chunk, i0, line0 + 2);
            } else {
                transposed_block::<1, 4>(g, part, chunk, i0, line0);
            }
        }
    })
}

/// Rows `i0 .. i0 + R` × lines `line0 .. line0 + L` of the sweep: per line, 2 loads and
/// 4 widening ops feed 4·R FMAs into `R·2L` accumulators (R = 2, L = 2: 8 accumulators,
/// 4 row vectors, 2 weight vectors live).
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
unsafe fn transposed_block<const R: usize, const L: usize>(
    g: &super::TransposedGemm<'_>,
    part: &mut [[f32; 8]],
    chunk: std::ops::Range<usize>,
    i0: usize,
    line0: usize,
) {
    let panel_len = g.shape.panel_len();
    let cols = g.np * PANEL;
    let j0 = g.c0 / 2 + line0;
    let (ap, wp) = (g.a.as_ptr(), g.w.as_ptr());
    let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
    let mut acc = [[[_mm256_setzero_ps(); 2]; L]; R];
    for p in chunk {
        let mut av = [[_mm256_setzero_ps(); 2]; R];
        for (r, v) in av.iter_mut().enumerate() {
            let row = ap.add((i0 + r) * g.lda + p * PANEL);
            for (h, x) in v.iter_mut().enumerate() {
                let w = _mm256_cvtepu16_epi32(_mm_loadu_si128(row.add(8 * h) as *const __m128i));
                *x = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(w));
            }
        }
        for li in 0..L {
            let line = wp.add(p * panel_len + (j0 + li) * 2 * PANEL);
            for h in 0..2 {
                let v = _mm256_loadu_si256(line.add(h * PANEL) as *const __m256i);
                let even = _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v));
                let odd = _mm256_castsi256_ps(_mm256_and_si256(v, hi));
                for (row, x) in acc.iter_mut().zip(&av) {
                    row[li][0] = _mm256_fmadd_ps(x[h], even, row[li][0]);
                    row[li][1] = _mm256_fmadd_ps(x[h], odd, row[li][1]);
                }
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (li, pair) in row.iter().enumerate() {
            for (b, v) in pair.iter().enumerate() {
                let dst = part[(i0 + r) * cols + 2 * (line0 + li) + b].as_mut_ptr();
                _mm256_storeu_ps(dst, _mm256_add_ps(_mm256_loadu_ps(dst), *v));
            }
        }
    }
}
