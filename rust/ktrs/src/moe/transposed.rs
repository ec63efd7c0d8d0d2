//! The backward's products by transposed expert weights, `A[rows] · W` for a block of
//! W's input columns.
//!
//! Experts with few rows (`KTRS_BWD_DIRECT_ROWS`) read the forward panels directly
//! (`kernels::gemm_transposed`): their product is a weight stream, and repacking a block
//! costs more than using it a few times. The others take the block in the transposed
//! panel layout from the layer's cache of transposed weights (`transposed_cache.rs`,
//! filled on first use within the `KTRS_TRANSPOSED_CACHE_MB` budget: while it is on, a
//! second copy of the active experts' weights lives in memory) and run the GEMM kernels
//! on it; when the cache cannot hold it, they repack the block
//! (`kernels::transpose_block`, the same bytes) in their thread's scratch on every call.
//! (Repacking a panel pair at a time, right before its GEMM, so it stays in L2 at
//! H=7168, was measured slower on the AMX machine; see docs/architecture.md.)

use super::transposed_cache::MatrixCache;
use super::{add_terms, gemm_rows, NB_MAX};
use crate::cpu::Isa;
use crate::kernels;
use crate::kernels::vec::LowRank;
use crate::pack::{ExpertPack, PANEL};
use std::cell::RefCell;
use std::ops::Range;

thread_local! {
    /// This thread's repacked block (only `gemm_t_rows` touches it).
    static TRANSPOSED: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
}

/// `A[rows] · W` for the 16·np columns from `c0` of expert e's weights (given by their
/// forward packing; `cache` holds the transposed blocks of this matrix);
/// plus the rank-r `terms` (as in `gemm_rows`); `epi(pair, row)` gets each finished row.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_t_rows(
    isa: Isa,
    a: &[u16],
    lda: usize,
    rows: Range<usize>,
    pack: &ExpertPack,
    cache: &MatrixCache,
    e: usize,
    c0: usize,
    np: usize,
    terms: &[LowRank<'_>],
    mut epi: impl FnMut(usize, &mut [f32]),
) {
    let m = rows.len();
    if m > direct_rows() {
        if let Some(blk) = cache.block(isa, pack, e, c0, np) {
            return gemm_rows(isa, a, lda, pack.shape.n_pad, rows, blk, np, terms, epi);
        }
        return TRANSPOSED.with(|cell| {
            let mut buf = cell.borrow_mut();
            let len = np * PANEL * pack.shape.n_pad;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            kernels::transpose_block(isa, pack.expert(e), pack.shape, c0, np, &mut buf[..len]);
            gemm_rows(
                isa,
                a,
                lda,
                pack.shape.n_pad,
                rows,
                &buf[..len],
                np,
                terms,
                epi,
            )
        });
    }
    let ldc = np * PANEL;
    let mut c = [0f32; DIRECT_ROWS_MAX * NB_MAX * PANEL];
    let g = kernels::TransposedGemm {
        m,
        a: &a[rows.start * lda..],
        lda,
        w: pack.expert(e),
        shape: pack.shape,
        c0,
        np,
        c: &mut c,
        ldc,
    };
    kernels::gemm_transposed(isa, g);
    add_terms(isa, terms, 0, m, &mut c, ldc);
    for (r, p) in rows.enumerate() {
        epi(p, &mut c[r * ldc..(r + 1) * ldc]);
    }
}

/// Most rows for which `gemm_t_rows` reads the forward panels directly.
const DIRECT_ROWS_MAX: usize = 16;

fn direct_rows() -> usize {
    crate::tuning::get(crate::tuning::Knob::BwdDirectRows).min(DIRECT_ROWS_MAX)
}

/// Speed probe (`cargo test -p ktrs --release --lib -- --ignored --nocapture
/// repack_probe`; `PROBE_THREADS`, `PROBE_EXPERTS`, `KTRS_ISA`): one backward GEMM
/// phase's work at DeepSeek-V3 sizes over weights that do not fit in cache, against the
/// forward GEMM over the same weights: the repack alone, the backward's product
/// (repack of each 8-panel task block, then its GEMM), and that product from a warm
/// transposed cache.
#[cfg(test)]
mod probe {
    use super::*;
    use crate::moe::gemm_rows;
    use crate::moe::transposed_cache::CacheBudget;

    fn env(name: &str, default: usize) -> usize {
        std::env::var(name)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    #[test]
    #[ignore]
    fn repack_probe() {
        let isa = std::env::var("KTRS_ISA")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(Isa::best);
        let threads = env("PROBE_THREADS", 1);
        let experts = env("PROBE_EXPERTS", 8).max(threads);
        let np = 8;
        // (name, packed n, packed k): the backward multiplies by the transposed weights.
        for (name, n, k) in [("down", 7168, 2048), ("gate/up", 4096, 7168)] {
            let shape = crate::pack::PackShape::new(n, k);
            let mut pack = ExpertPack::zeroed(experts, shape);
            for e in 0..experts {
                for (i, v) in pack.expert_mut(e).iter_mut().enumerate() {
                    *v = 0x3c00 | ((i * 7 + e) & 0xff) as u16;
                }
            }
            let bytes = (experts * shape.len() * 2) as f64;
            for m in [16, 64] {
                let (lda_f, lda_t) = (shape.k_pad + 32, shape.n_pad + 32);
                let a_f = vec![0x3c00u16; (m + 32) * lda_f];
                let a_t = vec![0x3c00u16; (m + 32) * lda_t];
                // "cached gemm": best of 3, so the cache filled by the first run is warm.
                let off = MatrixCache::new(&pack, CacheBudget::with_limit(0));
                let on = MatrixCache::new(&pack, CacheBudget::with_limit(usize::MAX));
                for label in [
                    "forward gemm",
                    "repack only",
                    "repack + gemm",
                    "cached gemm",
                ] {
                    let cache = if label == "cached gemm" { &on } else { &off };
                    let run = |e: usize| {
                        let w = pack.expert(e);
                        let mut sink = 0f32;
                        if label == "forward gemm" {
                            for b in 0..shape.panels() / np {
                                let bw = &w[b * np * shape.panel_len()..];
                                gemm_rows(
                                    isa,
                                    &a_f,
                                    lda_f,
                                    shape.k_pad,
                                    0..m,
                                    bw,
                                    np,
                                    &[],
                                    |_, c| sink += c[0],
                                );
                            }
                        } else if label == "repack only" {
                            let mut t = vec![0u16; np * PANEL * shape.n_pad];
                            for b in 0..shape.k_pad / PANEL / np {
                                kernels::transpose_block(isa, w, shape, b * np * PANEL, np, &mut t);
                                sink += t[0] as f32;
                            }
                        } else {
                            for b in 0..shape.k_pad / PANEL / np {
                                gemm_t_rows(
                                    isa,
                                    &a_t,
                                    lda_t,
                                    0..m,
                                    &pack,
                                    cache,
                                    e,
                                    b * np * PANEL,
                                    np,
                                    &[],
                                    |_, c| sink += c[0],
                                );
                            }
                        }
                        sink
                    };
                    let mut best = f64::MAX;
                    for _ in 0..3 {
                        let t0 = std::time::Instant::now();
                        std::thread::scope(|s| {
                            for t in 0..threads {
                                let run = &run;
                                s.spawn(move || {
                                    (t..experts).step_by(threads).map(run).sum::<f32>()
                                });
                            }
                        });
                        best = best.min(t0.elapsed().as_secs_f64());
                    }
                    println!(
                        "repack probe {name:8} m={m:3} {label:13}: {:8.2} ms  {:6.1} GB/s of weights ({isa}, {threads} threads, {experts} experts)",
                        best * 1e3,
                        bytes / best / 1e9
                    );
                }
            }
        }
    }
}
