//! How one layer call is cut into tasks for the worker pool: GEMM tasks per (expert,
//! block of panels) and their width, row-wise phases in chunks of pairs or tokens, and
//! the phase runner (with `KTRS_PROFILE=1` timings).

use super::{routing, MoeLayer, NB_MAX, WIDE_TASK_ROWS};
use crate::cpu::Isa;
use std::ops::Range;

/// `(expert, block)` pairs for every expert with tokens, `blocks` blocks each.
pub(super) fn expert_blocks(offsets: &[usize], blocks: usize) -> Vec<(usize, usize)> {
    let mut v = Vec::new();
    for e in 0..offsets.len() - 1 {
        if offsets[e + 1] > offsets[e] {
            v.extend((0..blocks).map(|b| (e, b)));
        }
    }
    v
}

/// Most pairs (or tokens) per task in the row-wise phases (gather, LoRA projections,
/// reductions).
const ROW_CHUNK: usize = 16;

/// How a row-wise phase splits `n` rows into tasks: `ROW_CHUNK` rows each, or fewer
/// when that would leave threads idle. At decode (6 pairs) one 16-row task projected
/// every LoRA-A matrix of the layer alone, 768 KB of weights on one core.
#[derive(Clone, Copy)]
pub(super) struct RowChunks {
    n: usize,
    size: usize,
}

impl RowChunks {
    pub(super) fn new(n: usize, threads: usize) -> RowChunks {
        let size = n.div_ceil(threads.max(1)).clamp(1, ROW_CHUNK);
        RowChunks { n, size }
    }
    pub(super) fn tasks(&self) -> usize {
        self.n.div_ceil(self.size)
    }
    pub(super) fn range(&self, task: usize) -> Range<usize> {
        task * self.size..((task + 1) * self.size).min(self.n)
    }
}

/// Splits pair rows at expert boundaries: `f(expert, rows of that expert)`, in order.
pub(super) fn expert_runs(
    routing: &routing::Routing,
    rows: Range<usize>,
    mut f: impl FnMut(usize, Range<usize>),
) {
    let mut p = rows.start;
    while p < rows.end {
        let e = routing.expert_of(p);
        let end = routing.offsets[e + 1].min(rows.end);
        f(e, p..end);
        p = end;
    }
}

impl MoeLayer {
    /// Panels per GEMM task (an even number, at most `NB_MAX`) for `pairs` rows spread
    /// over `active` experts: the widest that still leaves 8 tasks per thread.
    /// Experts with many rows (AMX) take at most 8 panels: each task reads its expert's
    /// rows once, so 8 panels read them half as often as 4; 16 measured slower (its
    /// transposed backward block, 1.4 MB, crowds L2). Experts with few rows are a weight
    /// stream: 16 panels (1 MB contiguous per task) measured 11% faster at T=32 than 4.
    /// `KTRS_NB` (tuning knob) overrides it.
    pub(super) fn task_panels(&self, pairs: usize, active: usize) -> usize {
        match crate::tuning::get(crate::tuning::Knob::TaskPanels) {
            0 => {}
            v => return (v.max(2) & !1).min(NB_MAX),
        }
        let rows = pairs / active.max(1);
        let widest = if self.isa == Isa::Amx && rows >= WIDE_TASK_ROWS {
            8
        } else {
            16
        };
        let panels = self.gate_up.shape.panels().min(self.down.shape.panels());
        let threads = self.pool.threads();
        [16, 8]
            .into_iter()
            .filter(|&nb| nb <= widest)
            .find(|&nb| active * panels.div_ceil(nb) >= 8 * threads)
            .unwrap_or(4)
    }

    /// The task split of a row-wise phase over `n` rows on this layer's pool.
    pub(super) fn row_chunks(&self, n: usize) -> RowChunks {
        RowChunks::new(n, self.pool.threads())
    }

    /// `pool.run` that, with `KTRS_PROFILE=1`, prints how long the phase took (stderr).
    pub(super) fn run_phase<F: Fn(usize, usize) + Sync>(&self, name: &str, n_tasks: usize, f: F) {
        self.phase(name, || self.pool.run(n_tasks, f))
    }

    pub(super) fn phase<R>(&self, name: &str, f: impl FnOnce() -> R) -> R {
        if crate::tuning::get(crate::tuning::Knob::Profile) != 1 {
            return f();
        }
        let t = std::time::Instant::now();
        let r = f();
        eprintln!(
            "ktrs profile: {name:<24} {:8.3} ms",
            t.elapsed().as_secs_f64() * 1e3
        );
        r
    }
}
