//! GEMM on the VNNI panels for CPUs without a bf16 dot product (the `avx2` and `avx512f`
//! tiers, one generic kernel): each 64-byte pair line (16 outputs × an input pair) is
//! widened in registers into f32 vectors, the even input by a 16-bit shift and the odd
//! one by masking the low half, and multiplied by the broadcast f32 activations. A is
//! widened to f32 once per call (a block of rows at a time) so each broadcast is a
//! plain load, not load + shift.
//!
//! AVX2 register block: 5 rows × 1 panel (16 outputs = 2 ymm per row), i.e. 10 f32
//! accumulators + 4 widened weight vectors + 2 broadcasts = 16 ymm. Each accumulator
//! takes two dependent FMAs per input pair, so fewer than 4 rows would wait on FMA
//! latency: 1-4 rows (a weight stream) take 2 or 4 panels at once. Measured on one
//! Xeon (Emerald Rapids) core, `probe_fma_peak_and_gemm` / `weight_stream`: 5×1 reaches
//! 61-66% of the ymm FMA peak (4×1: 56-61%, 3×2: 47-50%); with 3 rows, 3×2 streams
//! 7.6 GB/s against 6.0 for 5×1. AVX-512F (32 zmm, one zmm per panel line): 6 rows ×
//! 2 panels, 12 accumulators.

use super::Gemm;
use crate::pack::PANEL;
use std::arch::x86_64::*;
use std::cell::RefCell;

/// Rows widened to f32 at a time: their f32 copy (up to 240 KiB at k = 2048) stays in
/// L2 while every panel of the call passes over it.
const MB: usize = 30;

thread_local! {
    /// The f32 copy of the current row block of A.
    static AF: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// An f32 vector register and what the kernel does with it. Methods are
/// `#[inline(always)]` without target features: they are only called from the
/// `#[target_feature]` entry points below, into which they inline.
trait Lanes: Copy {
    /// Vectors per 16-output panel line (2 ymm, 1 zmm).
    const PER_LINE: usize;
    /// (rows, panels) of the register block for a block of `rows` rows.
    fn block(rows: usize) -> (usize, usize);
    unsafe fn zero() -> Self;
    /// Even and odd inputs of part `h` of the line at `p`, as f32.
    unsafe fn widen_line(p: *const u16, h: usize) -> (Self, Self);
    unsafe fn bcast(x: *const f32) -> Self;
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self;
    unsafe fn store(p: *mut f32, v: Self);
}

impl Lanes for __m256 {
    const PER_LINE: usize = 2;
    fn block(rows: usize) -> (usize, usize) {
        match rows {
            1 => (1, 4),
            2 | 4 => (2, 2),
            3 => (3, 2),
            _ => (5, 1),
        }
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm256_setzero_ps()
    }
    #[inline(always)]
    unsafe fn widen_line(p: *const u16, h: usize) -> (Self, Self) {
        let v = _mm256_loadu_si256(p.add(h * 16) as *const __m256i);
        let hi = _mm256_set1_epi32(0xFFFF_0000u32 as i32);
        (
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(v)),
            _mm256_castsi256_ps(_mm256_and_si256(v, hi)),
        )
    }
    #[inline(always)]
    unsafe fn bcast(x: *const f32) -> Self {
        _mm256_broadcast_ss(&*x)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        _mm256_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self) {
        _mm256_storeu_ps(p, v)
    }
}

impl Lanes for __m512 {
    const PER_LINE: usize = 1;
    fn block(rows: usize) -> (usize, usize) {
        match rows {
            1..=4 => (rows, 4),
            _ => (6, 2),
        }
    }
    #[inline(always)]
    unsafe fn zero() -> Self {
        _mm512_setzero_ps()
    }
    #[inline(always)]
    unsafe fn widen_line(p: *const u16, _h: usize) -> (Self, Self) {
        let v = _mm512_loadu_si512(p as *const _);
        let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
        (
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(v)),
            _mm512_castsi512_ps(_mm512_and_si512(v, hi)),
        )
    }
    #[inline(always)]
    unsafe fn bcast(x: *const f32) -> Self {
        _mm512_set1_ps(*x)
    }
    #[inline(always)]
    unsafe fn fmadd(a: Self, b: Self, c: Self) -> Self {
        _mm512_fmadd_ps(a, b, c)
    }
    #[inline(always)]
    unsafe fn store(p: *mut f32, v: Self) {
        _mm512_storeu_ps(p, v)
    }
}

/// # Safety
/// The CPU must support AVX2, FMA and F16C; bounds were checked by `Gemm::check`.
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn gemm(g: Gemm<'_>) {
    // The closure inherits this function's target features (one defined in the generic
    // `gemm_on` would not, and the intrinsics would become calls: 1 GFLOPS).
    AF.with(|cell| gemm_on::<__m256>(g, &mut cell.borrow_mut()))
}

/// # Safety
/// As [`gemm`], plus AVX-512 F/BW/VL.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl")]
pub(crate) unsafe fn gemm_avx512f(g: Gemm<'_>) {
    AF.with(|cell| gemm_on::<__m512>(g, &mut cell.borrow_mut()))
}

#[inline(always)]
unsafe fn gemm_on<V: Lanes>(g: Gemm<'_>, af: &mut Vec<f32>) {
    {
        let k = g.k_pad;
        if af.len() < MB.min(g.m) * k {
            af.resize(MB.min(g.m) * k, 0.0);
        }
        let panel_len = k * PANEL;
        let kp2 = k / 2;
        let mut i0 = 0;
        while i0 < g.m {
            let mb = (g.m - i0).min(MB);
            widen_rows(&g.a[i0 * g.lda..], g.lda, mb, k, af);
            let a = af.as_ptr();
            let b = g.b.as_ptr();
            let c = g.c.as_mut_ptr().add(i0 * g.ldc);
            let (mr_max, nps) = V::block(mb);
            let mut p = 0;
            while p < g.np {
                let np = (g.np - p).min(nps);
                let bp = b.add(p * panel_len);
                let mut i = 0;
                while i < mb {
                    let mr = (mb - i).min(mr_max);
                    let (ap, cp) = (a.add(i * k), c.add(i * g.ldc + p * PANEL));
                    let args = (ap, k, bp, panel_len, kp2, cp, g.ldc);
                    macro_rules! blocks {
                        ($(($m:literal, $n:literal)),*) => {
                            match (mr, np) {
                                $(($m, $n) => tile::<V, $m, $n>(args),)*
                                _ => unreachable!("no {mr}x{np} register block"),
                            }
                        };
                    }
                    blocks!(
                        (1, 1),
                        (1, 2),
                        (1, 3),
                        (1, 4),
                        (2, 1),
                        (2, 2),
                        (2, 3),
                        (2, 4),
                        (3, 1),
                        (3, 2),
                        (3, 3),
                        (3, 4),
                        (4, 1),
                        (4, 2),
                        (4, 3),
                        (4, 4),
                        (5, 1),
                        (5, 2),
                        (6, 1),
                        (6, 2)
                    );
                    i += mr;
                }
                p += np;
            }
            i0 += mb;
        }
    }
}

/// bf16 rows `a[r·lda ..][..k]` for `r < rows` into f32 rows of stride k.
#[inline(always)]
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
unsafe fn tile<V: Lanes, const M: usize, const NP: usize>(
    (a, lda, b, panel_len, kp2, c, ldc): TileArgs,
) {
    let per = V::PER_LINE;
    let mut acc = [[[V::zero(); 2]; NP]; M];
    for j in 0..kp2 {
        for q in 0..NP {
            let line = b.add(q * panel_len + j * 2 * PANEL);
            let mut even = [V::zero(); 2];
            let mut odd = [V::zero(); 2];
            for h in 0..per {
                (even[h], odd[h]) = V::widen_line(line, h);
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let ae = V::bcast(a.add(r * lda + 2 * j));
                let ao = V::bcast(a.add(r * lda + 2 * j + 1));
                for h in 0..per {
                    row[q][h] = V::fmadd(ae, even[h], row[q][h]);
                    row[q][h] = V::fmadd(ao, odd[h], row[q][h]);
                }
            }
        }
    }
    let width = PANEL / per;
    for (r, row) in acc.iter().enumerate() {
        for (q, parts) in row.iter().enumerate() {
            for (h, v) in parts.iter().enumerate().take(per) {
                V::store(c.add(r * ldc + q * PANEL + h * width), *v);
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

/// AVX2 version of [`crate::pack::pack_transposed_block`] (same arguments, same result):
/// the 8×8 u64 transpose of each 16×16 bf16 block as four 4×4 transposes
/// (`vpunpck{l,h}qdq` + `vperm2i128`), then one `vpshufb` per output half swaps the
/// middle two bf16 of every u64.
///
/// # Safety
/// AVX2; slice bounds are checked by the caller (`kernels::transpose_block`).
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn pack_transposed_block(
    src: &[u16],
    shape: crate::pack::PackShape,
    c0: usize,
    np: usize,
    dst: &mut [u16],
) {
    let kp2 = shape.k_pad / 2;
    let lane: [i8; 16] = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15];
    let l = _mm_loadu_si128(lane.as_ptr() as *const __m128i);
    let swap = _mm256_set_m128i(l, l);
    let (s, d) = (src.as_ptr(), dst.as_mut_ptr());
    for q in 0..np {
        let j0 = (c0 + q * PANEL) / 2;
        for p in 0..shape.panels() {
            let sp = s.add((p * kp2 + j0) * 2 * PANEL);
            let dp = d.add(q * PANEL * shape.n_pad + 8 * p * 2 * PANEL);
            // Source row jj (u64 columns 4h .. 4h+4) of the block.
            let row = |jj: usize, h: usize| {
                _mm256_loadu_si256(sp.add(jj * 2 * PANEL + h * PANEL) as *const __m256i)
            };
            // Rows r0 .. r0+4 × u64 columns 4h .. 4h+4 → output rows 4h .. 4h+4, half r0/4.
            for h in 0..2 {
                for r0 in [0, 4] {
                    let (a, b, c, e) = (row(r0, h), row(r0 + 1, h), row(r0 + 2, h), row(r0 + 3, h));
                    let (t0, t1) = (_mm256_unpacklo_epi64(a, b), _mm256_unpackhi_epi64(a, b));
                    let (t2, t3) = (_mm256_unpacklo_epi64(c, e), _mm256_unpackhi_epi64(c, e));
                    let cols = [
                        _mm256_permute2x128_si256::<0x20>(t0, t2),
                        _mm256_permute2x128_si256::<0x20>(t1, t3),
                        _mm256_permute2x128_si256::<0x31>(t0, t2),
                        _mm256_permute2x128_si256::<0x31>(t1, t3),
                    ];
                    for (m, v) in cols.iter().enumerate() {
                        let out = dp.add((4 * h + m) * 2 * PANEL + (r0 / 4) * PANEL);
                        _mm256_storeu_si256(out as *mut __m256i, _mm256_shuffle_epi8(*v, swap));
                    }
                }
            }
        }
    }
}
