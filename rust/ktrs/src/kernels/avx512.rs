//! AVX-512 BF16 GEMM: `vdpbf16ps` with an M×NP register block (up to 6 rows × 4 panels,
//! 24 zmm accumulators), B streamed from the packed panels, A pairs broadcast.

use super::Gemm;
use crate::pack::PANEL;
use std::arch::x86_64::*;

const MR: usize = 6;
const NR: usize = 4;

/// # Safety
/// The CPU must support AVX-512 F/BW/VL/BF16; bounds were checked by `Gemm::check`.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(crate) unsafe fn gemm(g: Gemm<'_>) {
    let panel_len = g.k_pad * PANEL;
    let kp2 = g.k_pad / 2;
    let a = g.a.as_ptr();
    let b = g.b.as_ptr();
    let c = g.c.as_mut_ptr();
    let mut p = 0;
    while p < g.np {
        let np = (g.np - p).min(NR);
        let bp = b.add(p * panel_len);
        let mut i = 0;
        while i < g.m {
            let mr = (g.m - i).min(MR);
            let ap = a.add(i * g.lda);
            let cp = c.add(i * g.ldc + p * PANEL);
            macro_rules! call {
                ($nn:literal; $($mm:literal)*) => {
                    match mr {
                        $( $mm => tile::<$mm, $nn>(ap, g.lda, bp, panel_len, kp2, cp, g.ldc), )*
                        _ => unreachable!(),
                    }
                };
            }
            // Every (rows, panels) pair of the register block.
            match np {
                4 => call!(4; 1 2 3 4 5 6),
                3 => call!(3; 1 2 3 4 5 6),
                2 => call!(2; 1 2 3 4 5 6),
                _ => call!(1; 1 2 3 4 5 6),
            }
            i += mr;
        }
        p += np;
    }
}

#[inline(always)]
unsafe fn tile<const M: usize, const NP: usize>(
    a: *const u16,
    lda: usize,
    b: *const u16,
    panel_len: usize,
    kp2: usize,
    c: *mut f32,
    ldc: usize,
) {
    let mut acc = [[_mm512_setzero_ps(); NP]; M];
    for j in 0..kp2 {
        let mut bv = [_mm512_setzero_si512(); NP];
        for (q, v) in bv.iter_mut().enumerate() {
            *v = _mm512_loadu_si512(b.add(q * panel_len + j * 2 * PANEL) as *const _);
        }
        for (r, row) in acc.iter_mut().enumerate() {
            let pair = (a.add(r * lda + 2 * j) as *const i32).read_unaligned();
            let av: __m512bh = std::mem::transmute(_mm512_set1_epi32(pair));
            for (q, x) in row.iter_mut().enumerate() {
                *x = _mm512_dpbf16_ps(*x, av, std::mem::transmute::<__m512i, __m512bh>(bv[q]));
            }
        }
    }
    for (r, row) in acc.iter().enumerate() {
        for (q, x) in row.iter().enumerate() {
            _mm512_storeu_ps(c.add(r * ldc + q * PANEL), *x);
        }
    }
}

/// AVX-512 version of [`crate::pack::pack_transposed_block`] (same arguments, same result).
///
/// A 16×16 bf16 block is 8 pair rows of 64 bytes in both layouts; seen as an 8×8 matrix
/// of u64 (each a 2×2 bf16 block), the new layout is its transpose with the middle two
/// bf16 of every u64 swapped. Three `vpermt2q` stages plus one `vpshufb` per row.
///
/// # Safety
/// The CPU must support AVX-512 F/BW; slice bounds are checked by the caller
/// (`kernels::transpose_block`).
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn pack_transposed_block(
    src: &[u16],
    shape: crate::pack::PackShape,
    c0: usize,
    np: usize,
    dst: &mut [u16],
) {
    let t_k = shape.n_pad;
    let kp2 = shape.k_pad / 2;
    let idx = |v: [i64; 8]| _mm512_loadu_si512(v.as_ptr() as *const _);
    let (s1lo, s1hi) = (
        idx([0, 8, 2, 10, 4, 12, 6, 14]),
        idx([1, 9, 3, 11, 5, 13, 7, 15]),
    );
    let (s2lo, s2hi) = (
        idx([0, 1, 8, 9, 4, 5, 12, 13]),
        idx([2, 3, 10, 11, 6, 7, 14, 15]),
    );
    let (s3lo, s3hi) = (
        idx([0, 1, 2, 3, 8, 9, 10, 11]),
        idx([4, 5, 6, 7, 12, 13, 14, 15]),
    );
    let lane: [i8; 16] = [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15];
    let swap = _mm512_broadcast_i32x4(_mm_loadu_si128(lane.as_ptr() as *const _));
    let s = src.as_ptr();
    let d = dst.as_mut_ptr();
    for q in 0..np {
        let j0 = (c0 + q * PANEL) / 2;
        for p in 0..shape.panels() {
            let mut r = [_mm512_setzero_si512(); 8];
            for (jj, v) in r.iter_mut().enumerate() {
                *v = _mm512_loadu_si512(s.add((p * kp2 + j0 + jj) * 2 * PANEL) as *const _);
            }
            let mut a = [_mm512_setzero_si512(); 8];
            for k in 0..4 {
                a[2 * k] = _mm512_permutex2var_epi64(r[2 * k], s1lo, r[2 * k + 1]);
                a[2 * k + 1] = _mm512_permutex2var_epi64(r[2 * k], s1hi, r[2 * k + 1]);
            }
            let mut b = [_mm512_setzero_si512(); 8];
            for h in [0, 4] {
                b[h] = _mm512_permutex2var_epi64(a[h], s2lo, a[h + 2]);
                b[h + 2] = _mm512_permutex2var_epi64(a[h], s2hi, a[h + 2]);
                b[h + 1] = _mm512_permutex2var_epi64(a[h + 1], s2lo, a[h + 3]);
                b[h + 3] = _mm512_permutex2var_epi64(a[h + 1], s2hi, a[h + 3]);
            }
            for jj in 0..4 {
                let lo = _mm512_permutex2var_epi64(b[jj], s3lo, b[jj + 4]);
                let hi = _mm512_permutex2var_epi64(b[jj], s3hi, b[jj + 4]);
                let out = d.add(q * PANEL * t_k + (8 * p) * 2 * PANEL);
                _mm512_storeu_si512(
                    out.add(jj * 2 * PANEL) as *mut _,
                    _mm512_shuffle_epi8(lo, swap),
                );
                _mm512_storeu_si512(
                    out.add((jj + 4) * 2 * PANEL) as *mut _,
                    _mm512_shuffle_epi8(hi, swap),
                );
            }
        }
    }
}

/// `c[i, q] = Σ_n a[i, n] · W[n, c0 + q]` for `m` rows and `q < 16·np`: the product with
/// the transposed weights, read straight from the forward panels (no repack). For rows
/// that are few, repacking cost more than the product: here each 64-byte line of a
/// panel (16 outputs n × one input pair) is split into two f32 vectors and multiplied by
/// the row's 16 values of `a`; per 16 output columns, 16 register accumulators collect
/// the n lanes and are summed horizontally at the end.
///
/// Panels are visited `T_CHUNK` at a time, each group of 8 columns sweeping the chunk
/// before the next, with the rows in blocks of up to 3 that share each loaded line;
/// partial sums move to the thread's `PARTIALS` block after each chunk. One Zen 4 thread
/// streaming 738 MB with 3 rows (`weight_stream` probe): 22 GB/s from DRAM, 47 cached
/// (forward GEMM: 34.5 and 104); sweeping all panels per column group, one row at a
/// time: 10.9 and 30.
///
/// # Safety
/// AVX-512 F/BW; bounds checked by `kernels::gemm_transposed`.
#[target_feature(enable = "avx512f,avx512bw")]
pub(crate) unsafe fn gemm_transposed(g: super::TransposedGemm<'_>) {
    PARTIALS.with(|cell| {
        let mut part = cell.borrow_mut();
        part.clear();
        part.resize(g.m * g.np * PANEL, _mm512_setzero_ps());
        transposed_partials(&g, &mut part);
        let cp = g.c.as_mut_ptr();
        for i in 0..g.m {
            let row = &part[i * g.np * PANEL..(i + 1) * g.np * PANEL];
            for (x, v) in row.iter().enumerate() {
                *cp.add(i * g.ldc + x) = _mm512_reduce_add_ps(*v);
            }
        }
    })
}

thread_local! {
    /// Partial sums of `gemm_transposed` per (row, column), 16 lanes each: reused, as
    /// the kernel runs once per backward task (up to 256 KiB; a fresh allocation of that
    /// size goes to the OS and back each time).
    static PARTIALS: std::cell::RefCell<Vec<__m512>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The chunked sweep of `gemm_transposed`, adding into `part` (zeroed by the caller).
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn transposed_partials(g: &super::TransposedGemm<'_>, part: &mut [__m512]) {
    let (m, np) = (g.m, g.np);
    let panels = g.shape.panels();
    for p0 in (0..panels).step_by(T_CHUNK) {
        let chunk = p0..(p0 + T_CHUNK).min(panels);
        for q16 in 0..np {
            for half in 0..2 {
                // Rows in blocks of up to 3 that share each loaded line.
                let mut i0 = 0;
                while i0 < m {
                    let rows = if m - i0 == 4 { 2 } else { (m - i0).min(3) };
                    let args = (g, &mut *part, chunk.clone(), q16, half, i0);
                    match rows {
                        1 => transposed_block::<1>(args),
                        2 => transposed_block::<2>(args),
                        _ => transposed_block::<3>(args),
                    }
                    i0 += rows;
                }
            }
        }
    }
}

/// Source panels per chunk of `gemm_transposed`.
const T_CHUNK: usize = 16;

/// Rows `i0 .. i0 + R` × columns `16·q16 + 8·half ..+ 8` of `gemm_transposed` over the
/// panels in `chunk`, added into `part`: each of the 4 lines per panel is loaded and
/// unpacked once for the R rows (8 accumulators per row).
#[inline]
#[target_feature(enable = "avx512f,avx512bw")]
unsafe fn transposed_block<const R: usize>(
    (g, part, chunk, q16, half, i0): (
        &super::TransposedGemm<'_>,
        &mut [__m512],
        std::ops::Range<usize>,
        usize,
        usize,
        usize,
    ),
) {
    // K-pair groups ahead that the first rows prefetch (lines of later columns).
    const PF_GROUPS: usize = 2;
    let panel_len = g.shape.panel_len();
    let (ap, wp) = (g.a.as_ptr(), g.w.as_ptr());
    let hi = _mm512_set1_epi32(0xFFFF_0000u32 as i32);
    let kp0 = (g.c0 + q16 * PANEL) / 2 + half * 4;
    let mut acc = [[_mm512_setzero_ps(); 8]; R];
    for p in chunk {
        let mut av = [_mm512_setzero_ps(); R];
        for (r, v) in av.iter_mut().enumerate() {
            *v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                _mm256_loadu_si256(ap.add((i0 + r) * g.lda + p * PANEL) as *const _),
            )));
        }
        let base = wp.add(p * panel_len + kp0 * 2 * PANEL);
        if i0 == 0 {
            let ahead = base.wrapping_add(PF_GROUPS * 16 * PANEL) as *const i8;
            for q in 0..4 {
                _mm_prefetch::<_MM_HINT_T0>(ahead.wrapping_add(q * 64));
            }
        }
        for q in 0..4 {
            let line = _mm512_loadu_si512(base.add(q * 2 * PANEL) as *const _);
            let even = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(line));
            let odd = _mm512_castsi512_ps(_mm512_and_si512(line, hi));
            for (row, x) in acc.iter_mut().zip(&av) {
                row[2 * q] = _mm512_fmadd_ps(*x, even, row[2 * q]);
                row[2 * q + 1] = _mm512_fmadd_ps(*x, odd, row[2 * q + 1]);
            }
        }
    }
    let np = g.np;
    for (r, row) in acc.iter().enumerate() {
        let at = ((i0 + r) * np + q16) * PANEL + half * 8;
        for (d, v) in part[at..at + 8].iter_mut().zip(row) {
            *d = _mm512_add_ps(*d, *v);
        }
    }
}
