//! Portable reference GEMM on the packed layout.

use super::{Gemm, TransposedGemm};
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

/// Reference of `kernels::gemm_transposed`: `c[i, q] = Σ_n a[i, n] · W[n, c0 + q]`, on
/// the sweep every non-AVX-512 tier shares ([`transposed_sweep`]).
pub(crate) fn gemm_transposed(g: TransposedGemm<'_>) {
    transposed_sweep(g, |g, part, chunk, i0, rows, line0| {
        if rows == 2 {
            transposed_block::<2, 2>(g, part, (chunk.clone(), i0, line0));
            transposed_block::<2, 2>(g, part, (chunk, i0, line0 + 2));
        } else {
            transposed_block::<1, 4>(g, part, (chunk, i0, line0));
        }
    })
}

/// The loop structure of `gemm_transposed`; `block(g, part, panels, i0, rows, line0)`
/// adds rows `i0 .. i0 + rows` (1 or 2) × lines `line0 .. line0 + 4` (8 columns of the
/// block) over those panels into the partial sums. Reads each 64-byte panel line once per
/// block of rows, in address order. (Walking W column by column, one 2-byte element per
/// 64-byte line, made the scalar backward 30-50× its forward.)
///
/// Each column gets 8 lanes of partial sums: a line's 16 lanes (outputs n) fold into 8
/// with two multiply-adds, so the accumulators fit 8-lane registers; the lanes are
/// summed at the end. Panels go `T_CHUNK` at a time so only that many streams are open
/// while each group of columns sweeps them.
#[inline(always)]
pub(crate) fn transposed_sweep(
    g: TransposedGemm<'_>,
    mut block: impl FnMut(
        &TransposedGemm<'_>,
        &mut [[f32; 8]],
        std::ops::Range<usize>,
        usize,
        usize,
        usize,
    ),
) {
    thread_local! {
        /// Per (row, column) partial sums: reused, up to 128 KiB per call.
        static PART: std::cell::RefCell<Vec<[f32; 8]>> =
            const { std::cell::RefCell::new(Vec::new()) };
    }
    PART.with(|cell| {
        let mut part = cell.borrow_mut();
        let cols = g.np * PANEL;
        part.clear();
        part.resize(g.m * cols, [0f32; 8]);
        let panels = g.shape.panels();
        for p0 in (0..panels).step_by(T_CHUNK) {
            let chunk = p0..(p0 + T_CHUNK).min(panels);
            let mut i0 = 0;
            while i0 < g.m {
                let rows = (g.m - i0).min(2);
                for line0 in (0..cols / 2).step_by(4) {
                    block(&g, &mut part, chunk.clone(), i0, rows, line0);
                }
                i0 += rows;
            }
        }
        for i in 0..g.m {
            for q in 0..cols {
                g.c[i * g.ldc + q] = part[i * cols + q].iter().sum();
            }
        }
    })
}

/// Source panels per chunk of `gemm_transposed`.
const T_CHUNK: usize = 16;

/// Rows `i0 .. i0 + R` × lines `line0 .. line0 + L` (columns `2·line0 ..+ 2L` of the
/// block) of `gemm_transposed` over the panels in `chunk`, added into `part`.
#[inline(always)]
fn transposed_block<const R: usize, const L: usize>(
    g: &TransposedGemm<'_>,
    part: &mut [[f32; 8]],
    (chunk, i0, line0): (std::ops::Range<usize>, usize, usize),
) {
    let panel_len = g.shape.panel_len();
    let cols = g.np * PANEL;
    let j0 = g.c0 / 2 + line0;
    let mut accs = [[[[0f32; 8]; 2]; L]; R];
    for p in chunk {
        let mut av = [[0f32; 16]; R];
        for (r, v) in av.iter_mut().enumerate() {
            let row = &g.a[(i0 + r) * g.lda + p * PANEL..][..PANEL];
            for l in 0..PANEL {
                v[l] = to_f32(row[l]);
            }
        }
        for li in 0..L {
            let line = &g.w[p * panel_len + (j0 + li) * 2 * PANEL..][..2 * PANEL];
            let (mut even, mut odd) = ([0f32; 16], [0f32; 16]);
            for l in 0..PANEL {
                even[l] = to_f32(line[2 * l]);
                odd[l] = to_f32(line[2 * l + 1]);
            }
            for (acc, v) in accs.iter_mut().zip(&av) {
                let a = &mut acc[li];
                for l in 0..8 {
                    a[0][l] += v[l] * even[l] + v[8 + l] * even[8 + l];
                    a[1][l] += v[l] * odd[l] + v[8 + l] * odd[8 + l];
                }
            }
        }
    }
    for (r, row) in accs.iter().enumerate() {
        for (li, pair) in row.iter().enumerate() {
            for (b, v) in pair.iter().enumerate() {
                let dst = &mut part[(i0 + r) * cols + 2 * (line0 + li) + b];
                for l in 0..8 {
                    dst[l] += v[l];
                }
            }
        }
    }
}

/// `kernels::transpose_block` in portable code, the same result as
/// [`crate::pack::pack_transposed_block`]: a 16×16 block is 8 pair rows of 64 bytes in
/// both layouts, i.e. an 8×8 matrix of u64 (2×2 bf16 each) that is transposed, with
/// the middle two bf16 of every u64 swapped; 512 contiguous bytes in, 512 out.
pub(crate) fn pack_transposed_block(
    src: &[u16],
    shape: crate::pack::PackShape,
    c0: usize,
    np: usize,
    dst: &mut [u16],
) {
    const BLK: usize = 8 * 2 * PANEL;
    let kp2 = shape.k_pad / 2;
    let u64_at = |s: &[u16], i: usize| -> u64 {
        (s[i] as u64) | (s[i + 2] as u64) << 16 | (s[i + 1] as u64) << 32 | (s[i + 3] as u64) << 48
    };
    for q in 0..np {
        let j0 = (c0 + q * PANEL) / 2;
        for p in 0..shape.panels() {
            let s = &src[(p * kp2 + j0) * 2 * PANEL..][..BLK];
            let d = &mut dst[q * PANEL * shape.n_pad + 8 * p * 2 * PANEL..][..BLK];
            for m in 0..8 {
                for jj in 0..8 {
                    let v = u64_at(s, jj * 2 * PANEL + 4 * m);
                    d[m * 2 * PANEL + 4 * jj..][..4].copy_from_slice(&[
                        v as u16,
                        (v >> 16) as u16,
                        (v >> 32) as u16,
                        (v >> 48) as u16,
                    ]);
                }
            }
        }
    }
}
