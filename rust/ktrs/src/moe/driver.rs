//! The GEMM driver of the expert phases and the row-wise data movement around it:
//! gathering token rows into expert order, the GEMM over an expert's rows in blocks of
//! `KTRS_MC` rows (rank-r terms added per block) with a per-row epilogue, and the
//! weighted sum of each token's pairs.

use super::{amx_min_rows, gemm_call_rows, routing, MC_MAX, NB_MAX};
use crate::buffer::SendPtr;
use crate::cpu::Isa;
use crate::kernels::vec::LowRank;
use crate::kernels::{self, Gemm};
use crate::pack::PANEL;
use std::ops::Range;

/// `C = A·Bᵀ` over `np` panels for the pair rows in `rows`, in chunks of `KTRS_MC` rows, plus
/// the rank-r `terms` (their `z` rows start at `rows.start`; LoRA-B of the adapter);
/// `epi(pair, row)` receives each finished row of `16·np` f32 values.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_rows(
    isa: Isa,
    a: &[u16],
    lda: usize,
    k_pad: usize,
    rows: Range<usize>,
    b: &[u16],
    np: usize,
    terms: &[LowRank<'_>],
    mut epi: impl FnMut(usize, &mut [f32]),
) {
    thread_local! {
        /// The C block of this thread's GEMM calls (only `gemm_rows` touches it).
        static C: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    assert!(np <= NB_MAX, "at most NB_MAX panels per call");
    let isa = if isa == Isa::Amx && rows.len() < amx_min_rows() {
        Isa::Avx512
    } else {
        isa
    };
    C.with(|cell| {
        let mut c = cell.borrow_mut();
        if c.is_empty() {
            c.resize(MC_MAX * NB_MAX * PANEL, 0.0);
        }
        let ldc = np * PANEL;
        let mc = gemm_call_rows();
        let mut p0 = rows.start;
        while p0 < rows.end {
            let m = (rows.end - p0).min(mc);
            kernels::gemm(
                isa,
                Gemm {
                    m,
                    a: &a[p0 * lda..],
                    lda,
                    b,
                    np,
                    k_pad,
                    // All mc rows (whole 32-row blocks): the rows past m are scratch the
                    // kernel may write.
                    c: &mut c[..mc.next_multiple_of(32) * ldc],
                    ldc,
                },
            );
            add_terms(isa, terms, p0 - rows.start, m, &mut c[..], ldc);
            for r in 0..m {
                epi(p0 + r, &mut c[r * ldc..r * ldc + np * PANEL]);
            }
            p0 += m;
        }
    })
}

/// Adds each of `terms` to the `m` rows of block `c` that are rows `first..first + m` of
/// the terms' `z`.
pub(super) fn add_terms(
    isa: Isa,
    terms: &[LowRank<'_>],
    first: usize,
    m: usize,
    c: &mut [f32],
    ldc: usize,
) {
    for t in terms {
        let z = &t.z[first * t.r..];
        kernels::vec::add_low_rank(isa, &LowRank { z, ..*t }, m, c, ldc);
    }
}

/// `out[t] = bf16(Σ_slot w(p) · rows[p])` over token t's pairs p (skipped slots add
/// nothing), for the tokens of one task; `visit(t, slot, p)` runs for every pair on the way.
#[allow(clippy::too_many_arguments)]
pub(super) fn sum_pairs_into(
    isa: Isa,
    routing: &routing::Routing,
    tokens: std::ops::Range<usize>,
    rows: &[f32],
    ld: usize,
    h: usize,
    weight: impl Fn(usize) -> f32,
    mut visit: impl FnMut(usize, usize, usize),
    out: SendPtr<u16>,
) {
    let k = routing.k;
    let mut acc = vec![0f32; h];
    for t in tokens {
        acc.fill(0.0);
        for slot in 0..k {
            let p = routing.pos[t * k + slot];
            if p == routing::NO_PAIR {
                continue;
            }
            let p = p as usize;
            kernels::vec::axpy(isa, weight(p), &rows[p * ld..p * ld + h], &mut acc);
            visit(t, slot, p);
        }
        // SAFETY: token row t is written by the task that owns t alone.
        crate::bf16::from_f32_slice(&acc, unsafe { out.slice_mut(t * h, h) });
    }
}

/// Copies the token rows (from `src [T, h]`) of the pairs in `rows` into their rows of a
/// pair-ordered buffer with row stride `ld`, zeroing columns `h .. h_pad`; returns those
/// rows of the buffer.
///
/// # Safety
/// `dst` is valid for `rows.end` rows of `ld` elements and no other task touches `rows`.
pub(super) unsafe fn gather_pairs<'a>(
    routing: &routing::Routing,
    rows: Range<usize>,
    src: &[u16],
    (h, h_pad, ld): (usize, usize, usize),
    dst: SendPtr<u16>,
) -> &'a mut [u16] {
    let mine = dst.slice_mut(rows.start * ld, rows.len() * ld);
    for (p, row) in rows.zip(mine.chunks_mut(ld)) {
        let t = routing.pair_token[p] as usize;
        row[h..h_pad].fill(0);
        row[..h].copy_from_slice(&src[t * h..(t + 1) * h]);
    }
    mine
}
