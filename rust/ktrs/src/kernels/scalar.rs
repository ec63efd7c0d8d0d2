//! Portable reference GEMM on the packed layout.

use super::Gemm;
use crate::bf16::to_f32;
use crate::pack::PANEL;

pub(crate) fn gemm(g: Gemm<'_>) {
    let kp2 = g.k_pad / 2;
    let panel_len = g.k_pad * PANEL;
    for i in 0..g.m {
        let a = &g.a[i * g.lda..i * g.lda + g.k_pad];
        for p in 0..g.np {
            let panel = &g.b[p * panel_len..(p + 1) * panel_len];
            let mut acc = [0f32; PANEL];
            for j in 0..kp2 {
                let (a0, a1) = (to_f32(a[2 * j]), to_f32(a[2 * j + 1]));
                let row = &panel[j * 2 * PANEL..(j + 1) * 2 * PANEL];
                for l in 0..PANEL {
                    acc[l] += a0 * to_f32(row[2 * l]) + a1 * to_f32(row[2 * l + 1]);
                }
            }
            g.c[i * g.ldc + p * PANEL..i * g.ldc + (p + 1) * PANEL].copy_from_slice(&acc);
        }
    }
}

/// Reference of `kernels::gemm_transposed`: `c[i, q] = Σ_n a[i, n] · W[n, c0 + q]`.
pub(crate) fn gemm_transposed(g: super::TransposedGemm<'_>) {
    let panel_len = g.shape.panel_len();
    for i in 0..g.m {
        for q in 0..g.np * PANEL {
            let k = g.c0 + q;
            let mut acc = 0f32;
            for n in 0..g.shape.n_pad {
                let (p, l) = (n / PANEL, n % PANEL);
                let wv = g.w[p * panel_len + (k / 2) * 2 * PANEL + 2 * l + k % 2];
                acc += to_f32(g.a[i * g.lda + n]) * to_f32(wv);
            }
            g.c[i * g.ldc + q] = acc;
        }
    }
}
