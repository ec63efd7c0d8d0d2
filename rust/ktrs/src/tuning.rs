//! Tuning knobs of the kernels, each with a measured default, overridable by an
//! environment variable (read once) or at run time through [`set`] — the benchmarks
//! sweep them in one process instead of rebuilding a 1 GB layer per setting.
//!
//! Knobs change speed (or, `KTRS_PROFILE`, print timings; `KTRS_TRANSPOSED_CACHE_MB`
//! trades memory for backward speed). Those that pick another
//! kernel for some experts (`KTRS_AMX_MIN_ROWS`, `KTRS_BWD_DIRECT_ROWS`) change rounding;
//! the others give the same bits (tests/test_experts.py checks each). `KTRS_AMX_TAIL16`
//! is among the latter: a layer's GEMM inputs have rows to spare, so a last block of
//! ≤ 16 rows runs the same tile products either way (only a GEMM whose A ends at its
//! last row would hand such a tail to AVX-512 under `KTRS_AMX_TAIL16=0`).

use std::sync::atomic::{AtomicUsize, Ordering};

/// The knobs, with their environment variable and default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Knob {
    /// Panels per GEMM task; 0 = chosen per call from the routing (`MoeLayer::task_panels`).
    TaskPanels,
    /// Experts with fewer rows use AVX-512 under AMX.
    AmxMinRows,
    /// K block of the AMX loop in units of 32; 0 = all of K in one pass.
    AmxKBlock,
    /// AMX loop order: 1 = row chunks outside, 0 = panel pairs outside.
    AmxRowsOuter,
    /// Software prefetch of the B stream, KiB ahead; 0 = none.
    AmxPrefetchKib,
    /// 1 = that prefetch goes to L2 only (`prefetcht1`), 0 = to L1.
    AmxPrefetchL2,
    /// 1 = print every phase's wall time to stderr.
    Profile,
    /// 1 = software-pipelined AMX K loop (loads overlap products), 0 = loads first.
    AmxPipeline,
    /// Experts with at most this many rows (≤ 16) multiply by the transposed weights
    /// straight from the forward panels in backward; more rows repack a block first.
    BwdDirectRows,
    /// Microseconds an idle worker spins before it sleeps: a wake-up from sleep costs
    /// more than a short spin, and decode leaves gaps of a few hundred µs between layers.
    SpinUs,
    /// MiB of transposed expert weights all layers together may keep for their backward
    /// (`moe/transposed_cache.rs`); 0 = none (every backward repacks). Default: a quarter
    /// of physical memory (0 if unknown). Lowering it frees nothing already kept; it
    /// bounds what is added.
    TransposedCacheMb,
    /// Rows per GEMM call inside a task (`moe::driver::gemm_rows`), at most 384; the C
    /// block of that many rows stays in the thread's cache for the epilogue.
    GemmRows,
    /// 1 = AMX takes an expert's rows in steps of 16 (a last block of ≤ 16 rows runs one
    /// A tile), 0 = in steps of 32 (the padded rows of the last block cost full products).
    AmxTail16,
}

/// Marks a default computed at first use (see [`default_of`]).
const COMPUTED: usize = usize::MAX - 1;

const ALL: [(Knob, &str, usize); 13] = [
    (Knob::TaskPanels, "KTRS_NB", 0),
    (Knob::AmxMinRows, "KTRS_AMX_MIN_ROWS", 8),
    (Knob::AmxKBlock, "KTRS_AMX_KBLOCK", 0),
    (Knob::AmxRowsOuter, "KTRS_AMX_ROWS_OUTER", 0),
    (Knob::AmxPrefetchKib, "KTRS_AMX_PF", 1),
    (Knob::AmxPrefetchL2, "KTRS_AMX_PF_L2", 0),
    (Knob::Profile, "KTRS_PROFILE", 0),
    (Knob::AmxPipeline, "KTRS_AMX_PIPELINE", 1),
    (Knob::BwdDirectRows, "KTRS_BWD_DIRECT_ROWS", 8),
    (Knob::SpinUs, "KTRS_SPIN_US", 200),
    (
        Knob::TransposedCacheMb,
        "KTRS_TRANSPOSED_CACHE_MB",
        COMPUTED,
    ),
    (Knob::GemmRows, "KTRS_MC", 96),
    (Knob::AmxTail16, "KTRS_AMX_TAIL16", 1),
];

/// The default of a knob whose table entry is [`COMPUTED`].
fn default_of(knob: Knob, table: usize) -> usize {
    match (table, knob) {
        (COMPUTED, Knob::TransposedCacheMb) => crate::moe::transposed_cache_default_mb(),
        (COMPUTED, _) => unreachable!("no computed default for {knob:?}"),
        (v, _) => v,
    }
}

const UNSET: usize = usize::MAX;
static VALUES: [AtomicUsize; ALL.len()] = [const { AtomicUsize::new(UNSET) }; ALL.len()];

impl Knob {
    /// The knob named by its environment variable (e.g. `"KTRS_NB"`).
    pub fn from_name(name: &str) -> Option<Knob> {
        ALL.iter().find(|(_, n, _)| *n == name).map(|(k, _, _)| *k)
    }
    /// Position in `ALL` (listed in declaration order; a test checks it): `get` runs
    /// in every micro-kernel call, so no search.
    fn index(self) -> usize {
        self as usize
    }
}

/// The knob's value: set at run time, else from the environment, else the default.
pub fn get(knob: Knob) -> usize {
    let slot = &VALUES[knob.index()];
    match slot.load(Ordering::Relaxed) {
        UNSET => {
            let (_, name, default) = ALL[knob.index()];
            let v = std::env::var(name)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| default_of(knob, default));
            slot.store(v, Ordering::Relaxed);
            v
        }
        v => v,
    }
}

/// Overrides a knob for the rest of the process (benchmarks); `None` restores the
/// environment's value or the default.
pub fn set(knob: Knob, value: Option<usize>) {
    VALUES[knob.index()].store(value.unwrap_or(UNSET), Ordering::Relaxed);
}

/// Every knob with its environment variable and current value.
pub fn all() -> Vec<(&'static str, usize)> {
    ALL.iter().map(|&(k, n, _)| (n, get(k))).collect()
}

/// Held by tests that override knobs: the values are process-wide and tests run in
/// parallel, so one test's override must not land inside another's read-back.
#[cfg(test)]
pub(crate) fn test_override_guard() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_resolve_and_set_restores() {
        for (i, (k, n, _)) in ALL.into_iter().enumerate() {
            assert_eq!(k.index(), i, "ALL is in declaration order");
            assert_eq!(Knob::from_name(n), Some(k));
        }
        assert_eq!(Knob::from_name("KTRS_NOPE"), None);
        for (k, _, d) in ALL {
            assert_ne!(
                default_of(k, d),
                UNSET,
                "{k:?}: a default that reads as unset"
            );
        }
        let _guard = test_override_guard();
        let before = get(Knob::AmxKBlock);
        set(Knob::AmxKBlock, Some(7));
        assert_eq!(get(Knob::AmxKBlock), 7);
        set(Knob::AmxKBlock, None);
        assert_eq!(get(Knob::AmxKBlock), before);
    }
}
