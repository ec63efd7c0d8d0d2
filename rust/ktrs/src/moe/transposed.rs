//! The backward's products by transposed expert weights, `A[rows] · W` for a block of
//! W's input columns, without a stored transposed copy (expert memory stays one copy).
//!
//! Experts with few rows (`KTRS_BWD_DIRECT_ROWS`) read the forward panels directly
//! (`kernels::gemm_transposed`): their product is a weight stream, and repacking a block
//! costs more than using it a few times. The others repack the block into the transposed
//! panel layout (`kernels::transpose_block`) and run the GEMM kernels on it, a few panels
//! at a time (`group_panels`): each group is multiplied by all of the expert's rows right
//! after its repack, while it is still in L2. Repacking the task's whole block first
//! (1.75 MB at H=7168 with 8 panels) left its first panels evicted by the time the
//! kernel read them, so they were written and read back through L3.

use super::driver::{gemm_isa, gemm_rows_on};
use super::{MC, NB_MAX};
use crate::cpu::Isa;
use crate::kernels;
use crate::pack::{ExpertPack, PANEL};
use std::cell::RefCell;
use std::ops::Range;

thread_local! {
    /// This thread's repacked panel group (only `repacked_rows` touches it).
    static GROUP: RefCell<Vec<u16>> = const { RefCell::new(Vec::new()) };
    /// The rows of this thread's output block, filled group by group (only
    /// `repacked_rows` touches it).
    static ROWS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Most rows whose output block `repacked_rows` holds at once: beyond it the panel groups
/// are repacked again for the next rows, which at this many rows costs little and keeps
/// the block at most `SPAN_ROWS · 16 · NB_MAX` f32 (480 KiB). A multiple of `MC`, so
/// the GEMM calls cover the same rows as one `gemm_rows` over all of them would.
const SPAN_ROWS: usize = 5 * MC;

/// Panels repacked and multiplied at a time on `isa`. AMX (`KTRS_AMX_BWD_GROUP`, 0 =
/// whole block): groups of a panel pair, the panels one pass of its kernel holds, keep
/// the repacked panels in L2 while they are used (at H=7168 an 8-panel block is 1.75 MB
/// and crowds L2 out with the rows); A is read as often as with the whole block. On the
/// AMX machine it was slower (V3 shape T=512 backward 224 vs 211 ms), so the whole
/// block stays the default. The AVX-512 and
/// AVX2 kernels are slower than L3 and take the whole block: 4-panel groups (their
/// register block) measured 3-9% slower than the whole 8-panel block on the dev VM
/// (`repack_probe`).
fn group_panels(isa: Isa) -> usize {
    match (isa, crate::tuning::get(crate::tuning::Knob::AmxBwdGroup)) {
        (Isa::Amx, g) if g > 0 => g.next_multiple_of(2),
        _ => NB_MAX,
    }
}

/// `A[rows] · W` for the 16·np columns from `c0` of expert e's weights (given by their
/// forward packing); `epi(pair, row)` gets each finished row.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_t_rows(
    isa: Isa,
    a: &[u16],
    lda: usize,
    rows: Range<usize>,
    pack: &ExpertPack,
    e: usize,
    c0: usize,
    np: usize,
    mut epi: impl FnMut(usize, &mut [f32]),
) {
    let m = rows.len();
    if m > direct_rows() {
        return repacked_rows(isa, a, lda, rows, pack, e, c0, np, epi);
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
    for (r, p) in rows.enumerate() {
        epi(p, &mut c[r * ldc..(r + 1) * ldc]);
    }
}

/// [`gemm_t_rows`] through repacked panel groups. Every output element is the same
/// kernel's sum over the same inputs in the same order as with the whole block repacked
/// at once: only which columns one GEMM call covers changes, and the ISA is chosen for
/// the expert's rows as `gemm_rows` chooses it.
#[allow(clippy::too_many_arguments)]
fn repacked_rows(
    isa: Isa,
    a: &[u16],
    lda: usize,
    rows: Range<usize>,
    pack: &ExpertPack,
    e: usize,
    c0: usize,
    np: usize,
    epi: impl FnMut(usize, &mut [f32]),
) {
    let group = group_panels(gemm_isa(isa, rows.len()));
    repacked_in_groups(group, isa, a, lda, rows, pack, e, c0, np, epi)
}

/// [`repacked_rows`] with `group` panels per repack.
#[allow(clippy::too_many_arguments)]
fn repacked_in_groups(
    group: usize,
    isa: Isa,
    a: &[u16],
    lda: usize,
    rows: Range<usize>,
    pack: &ExpertPack,
    e: usize,
    c0: usize,
    np: usize,
    mut epi: impl FnMut(usize, &mut [f32]),
) {
    let isa_rows = gemm_isa(isa, rows.len());
    let (w, shape) = (pack.expert(e), pack.shape);
    let group = group.min(np);
    if group == np {
        return GROUP.with(|gcell| {
            let mut buf = gcell.borrow_mut();
            let len = np * PANEL * shape.n_pad;
            if buf.len() < len {
                buf.resize(len, 0);
            }
            kernels::transpose_block(isa, w, shape, c0, np, &mut buf[..len]);
            gemm_rows_on(isa_rows, a, lda, shape.n_pad, rows, &buf[..len], np, epi)
        });
    }
    let ldc = np * PANEL;
    GROUP.with(|gcell| {
        ROWS.with(|rcell| {
            let (mut buf, mut out) = (gcell.borrow_mut(), rcell.borrow_mut());
            let glen = group * PANEL * shape.n_pad;
            if buf.len() < glen {
                buf.resize(glen, 0);
            }
            let olen = rows.len().min(SPAN_ROWS) * ldc;
            if out.len() < olen {
                out.resize(olen, 0.0);
            }
            let mut s0 = rows.start;
            while s0 < rows.end {
                let span = s0..(s0 + SPAN_ROWS).min(rows.end);
                for q0 in (0..np).step_by(group) {
                    let gp = group.min(np - q0);
                    let b = &mut buf[..gp * PANEL * shape.n_pad];
                    kernels::transpose_block(isa, w, shape, c0 + q0 * PANEL, gp, b);
                    gemm_rows_on(
                        isa_rows,
                        a,
                        lda,
                        shape.n_pad,
                        span.clone(),
                        b,
                        gp,
                        |p, c| {
                            let at = (p - span.start) * ldc + q0 * PANEL;
                            out[at..at + gp * PANEL].copy_from_slice(&c[..gp * PANEL]);
                        },
                    );
                }
                for (r, p) in span.clone().enumerate() {
                    epi(p, &mut out[r * ldc..(r + 1) * ldc]);
                }
                s0 = span.end;
            }
        })
    })
}

/// Most rows for which `gemm_t_rows` reads the forward panels directly.
const DIRECT_ROWS_MAX: usize = 16;

fn direct_rows() -> usize {
    crate::tuning::get(crate::tuning::Knob::BwdDirectRows).min(DIRECT_ROWS_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::moe::{gemm_rows, ROW_PAD};
    use crate::pack::{pack_into, PackShape};

    fn rand_bf16(n: usize, seed: &mut u64) -> Vec<u16> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                crate::bf16::from_f32(((*seed >> 40) as f32) / (1u64 << 24) as f32 - 0.5)
            })
            .collect()
    }

    /// Panel groups and row spans give, bit for bit, what one repack of the whole block
    /// and one `gemm_rows` over all rows give, on every ISA (AMX emulated if absent) and
    /// group size.
    #[test]
    fn grouped_repack_matches_whole_block() {
        let mut isas = Isa::available();
        if !isas.contains(&Isa::Amx) && isas.contains(&Isa::Avx512) {
            kernels::EMULATE_AMX.store(true, std::sync::atomic::Ordering::Relaxed);
            isas.push(Isa::Amx);
        }
        let mut seed = 11u64;
        let (n, k) = (80, 230);
        let shape = PackShape::new(n, k);
        let mut pack = ExpertPack::zeroed(2, shape);
        for e in 0..2 {
            pack_into(&rand_bf16(n * k, &mut seed), shape, pack.expert_mut(e));
        }
        let lda = shape.n_pad + 32;
        let rows_max = 2 * SPAN_ROWS + 40;
        let mut a = rand_bf16((rows_max + ROW_PAD) * lda, &mut seed);
        for r in 0..rows_max + ROW_PAD {
            let pad = r >= rows_max;
            a[r * lda..(r + 1) * lda]
                .iter_mut()
                .enumerate()
                .filter(|(c, _)| pad || *c >= n)
                .for_each(|(_, v)| *v = 0);
        }
        for isa in isas {
            for (rows, c0, np) in [
                (3..40, 0, 8),
                (0..rows_max, 32, 6),
                (5..17, 16, 2),
                (100..100 + SPAN_ROWS + 1, 0, shape.k_pad / PANEL),
            ] {
                let ldc = np * PANEL;
                let mut want = vec![0f32; rows.len() * ldc];
                let mut blk = vec![0u16; np * PANEL * shape.n_pad];
                kernels::transpose_block(isa, pack.expert(1), shape, c0, np, &mut blk);
                gemm_rows(isa, &a, lda, shape.n_pad, rows.clone(), &blk, np, |p, c| {
                    want[(p - rows.start) * ldc..][..ldc].copy_from_slice(c)
                });
                for group in [2, 4, NB_MAX] {
                    let mut got = vec![f32::NAN; rows.len() * ldc];
                    let r0 = rows.start;
                    let (a, lda) = (&a[..], lda);
                    repacked_in_groups(
                        group,
                        isa,
                        a,
                        lda,
                        rows.clone(),
                        &pack,
                        1,
                        c0,
                        np,
                        |p, c| got[(p - r0) * ldc..][..ldc].copy_from_slice(c),
                    );
                    let same = got
                        .iter()
                        .zip(&want)
                        .all(|(x, y)| x.to_bits() == y.to_bits());
                    assert!(same, "{isa:?} rows {rows:?} c0 {c0} np {np} group {group}");
                }
            }
        }
    }
}

/// Speed probe (`cargo test -p ktrs --release --lib -- --ignored --nocapture
/// repack_probe`; `PROBE_THREADS`, `PROBE_EXPERTS`, `KTRS_ISA`): one backward GEMM
/// phase's work at DeepSeek-V3 sizes over weights that do not fit in cache, against the
/// forward GEMM over the same weights: the repack alone, and the repack with the GEMM in
/// groups of 8 panels (the whole task block), 4 and 2.
#[cfg(test)]
mod probe {
    use super::*;
    use crate::moe::gemm_rows;

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
                for label in [
                    "forward gemm",
                    "repack only",
                    "groups of 8",
                    "groups of 4",
                    "groups of 2",
                ] {
                    let run = |e: usize| {
                        let w = pack.expert(e);
                        let mut sink = 0f32;
                        if label == "forward gemm" {
                            for b in 0..shape.panels() / np {
                                let bw = &w[b * np * shape.panel_len()..];
                                gemm_rows(isa, &a_f, lda_f, shape.k_pad, 0..m, bw, np, |_, c| {
                                    sink += c[0]
                                });
                            }
                        } else if label == "repack only" {
                            let mut t = vec![0u16; np * PANEL * shape.n_pad];
                            for b in 0..shape.k_pad / PANEL / np {
                                kernels::transpose_block(isa, w, shape, b * np * PANEL, np, &mut t);
                                sink += t[0] as f32;
                            }
                        } else {
                            let group = label[10..].parse().unwrap();
                            for b in 0..shape.k_pad / PANEL / np {
                                let c0 = b * np * PANEL;
                                repacked_in_groups(
                                    group,
                                    isa,
                                    &a_t,
                                    lda_t,
                                    0..m,
                                    &pack,
                                    e,
                                    c0,
                                    np,
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
