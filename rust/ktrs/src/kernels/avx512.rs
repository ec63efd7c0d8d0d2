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
