//! GEMM micro-kernels per ISA behind one dispatch point, plus the small f32 helpers LoRA
//! and the epilogues use.
//!
//! Every kernel computes the same thing on the [`crate::pack`] layout:
//! `C[i, 16p + l] = Σ_k A[i, k] · W[16p + l, k]` for `np` panels, with bf16 inputs and f32
//! accumulation; `scalar` is the reference the others are tested against (see the tests
//! at the bottom, shared by every ISA).
//!
//! ISA dispatch: `dispatch.rs` maps each [`Isa`] to its kernels (a `KernelSet` of function
//! pointers) and compiles the portable helpers per tier (`multiversion!`); the functions
//! here and in the submodules check bounds, then call through `KernelSet::of(isa)`. The
//! `avx2` and `avx512` functions are `unsafe` and crate-private: they are only reached
//! that way, with an `Isa` from a layer that checked [`Isa::check_available`]. Choices
//! that depend on the tier but are about work, not code (`moe/driver.rs` runs AMX GEMMs
//! of few rows as AVX-512, `moe/schedule.rs` sizes AMX tasks) stay with the scheduler.
//!
//! Adding a tier: a row in `cpu.rs`'s tier table and a `KernelSet` in `dispatch.rs` (the
//! compiler lists the `match` that lacks it); a new set of target features for portable
//! code is a `Portable` variant and its copy in `multiversion!`.

pub(crate) mod amx;
pub(crate) mod avx2;
pub(crate) mod avx512;
mod dispatch;
pub(crate) mod epilogue;
pub(crate) mod lora_grad;
#[cfg(test)]
mod probe_amx_sched;
#[cfg(test)]
mod probes;
pub(crate) mod scalar;
pub(crate) mod vec;

use crate::cpu::Isa;

use dispatch::{multiversion, KernelSet};

/// Whether this build contains AMX kernels.
pub fn amx_kernels_built() -> bool {
    cfg!(target_arch = "x86_64")
}

/// Operands of one GEMM call over a block of panels.
pub(crate) struct Gemm<'a> {
    /// Rows of A and C.
    pub m: usize,
    /// bf16 activations, `m` rows of stride `lda`, `k_pad` valid (zero-padded) columns.
    pub a: &'a [u16],
    pub lda: usize,
    /// `np` consecutive packed panels, each `k_pad * 16` u16.
    pub b: &'a [u16],
    pub np: usize,
    pub k_pad: usize,
    /// f32 output, `m` rows of stride `ldc`; columns `0 .. 16·np` are overwritten. Rows
    /// past `m` that fit in the slice are scratch: AMX may write them (up to the next
    /// multiple of 32) instead of going through a block of its own.
    pub c: &'a mut [f32],
    pub ldc: usize,
}

impl Gemm<'_> {
    fn check(&self) {
        assert!(
            self.k_pad.is_multiple_of(crate::pack::PAD),
            "k_pad must be a multiple of 32"
        );
        assert!(
            self.np >= 1 && self.b.len() >= self.np * self.k_pad * 16,
            "B too short"
        );
        if self.m > 0 {
            assert!(
                self.lda >= self.k_pad && self.a.len() >= (self.m - 1) * self.lda + self.k_pad,
                "A too short"
            );
            assert!(
                self.ldc >= self.np * 16 && self.c.len() >= (self.m - 1) * self.ldc + self.np * 16,
                "C too short"
            );
        }
    }
}

/// Runs one GEMM block on `isa`. Bounds are checked here, once, so the kernels can use
/// raw pointers.
pub(crate) fn gemm(isa: Isa, g: Gemm<'_>) {
    g.check();
    if g.m == 0 {
        return;
    }
    // SAFETY: bounds checked above (`amx_split` keeps tile reads inside A); `isa` was
    // checked available by the caller's layer (see module doc).
    unsafe { (KernelSet::of(isa).gemm)(g) }
}

/// `Isa::Amx`'s GEMM: tiles where rows allow, AVX-512 BF16 for the rest.
///
/// # Safety
/// AMX-BF16 and AVX-512 BF16 must be usable on this CPU; bounds as for [`gemm`].
unsafe fn amx_gemm(g: Gemm<'_>) {
    #[cfg(test)]
    if EMULATE_AMX.load(std::sync::atomic::Ordering::Relaxed) {
        return amx_split::<amx::Emulated>(g);
    }
    amx_split::<amx::Hardware>(g)
}

/// Tests only: `Isa::Amx` GEMMs go through the tile emulation, so whole layers run the
/// AMX code paths on machines without AMX (set only where AMX is unavailable).
#[cfg(test)]
pub(crate) static EMULATE_AMX: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

/// AMX for as many whole 16-row blocks (32 with `KTRS_AMX_TAIL16=0`) as A can supply (a
/// partial last block is fine when A has readable rows past `m`: the extra results are
/// dropped), AVX-512 for the rest.
///
/// # Safety
/// `K` must be usable on this CPU (and AVX-512 BF16 for the remainder).
unsafe fn amx_split<K: amx::TileKernel>(mut g: Gemm<'_>) {
    let rows_readable = if g.a.len() >= g.k_pad {
        (g.a.len() - g.k_pad) / g.lda + 1
    } else {
        0
    };
    let step = amx::row_step();
    let m_amx = (g.m.next_multiple_of(step).min(rows_readable) / step) * step;
    let m_amx = if g.np.is_multiple_of(2) { m_amx } else { 0 };
    if m_amx > 0 {
        amx::gemm_tiles::<K>(&mut g, m_amx);
    }
    if m_amx < g.m {
        let rest = Gemm {
            m: g.m - m_amx,
            a: &g.a[m_amx * g.lda..],
            lda: g.lda,
            b: g.b,
            np: g.np,
            k_pad: g.k_pad,
            c: &mut g.c[m_amx * g.ldc..],
            ldc: g.ldc,
        };
        avx512::gemm(rest);
    }
}

/// Operands of the backward's product by transposed weights, read from their forward
/// packing (no repack): `c[i, q] = Σ_n a[i, n] · W[n, c0 + q]` for `m` rows of `a`
/// (stride `lda`, `shape.n_pad` valid columns) and `q < 16·np`.
pub(crate) struct TransposedGemm<'a> {
    pub m: usize,
    pub a: &'a [u16],
    pub lda: usize,
    /// One expert's weights in their forward packing.
    pub w: &'a [u16],
    pub shape: crate::pack::PackShape,
    /// First output column (a multiple of 16) and panels of 16 columns.
    pub c0: usize,
    pub np: usize,
    pub c: &'a mut [f32],
    pub ldc: usize,
}

/// Runs a [`TransposedGemm`] on `isa` (meant for few rows); bounds are checked here.
pub(crate) fn gemm_transposed(isa: Isa, g: TransposedGemm<'_>) {
    if g.m == 0 {
        return;
    }
    let (n_pad, cols) = (g.shape.n_pad, g.np * PANEL_U);
    assert!(g.w.len() >= g.shape.len(), "weights too short");
    assert!(
        g.c0.is_multiple_of(PANEL_U) && g.c0 + cols <= g.shape.k_pad,
        "column block out of range"
    );
    assert!(
        g.lda >= n_pad && g.a.len() >= (g.m - 1) * g.lda + n_pad,
        "A too short"
    );
    assert!(
        g.ldc >= cols && g.c.len() >= (g.m - 1) * g.ldc + cols,
        "C too short"
    );
    // SAFETY: bounds asserted above; `isa` checked available by the caller's layer.
    unsafe { (KernelSet::of(isa).gemm_transposed)(g) }
}

const PANEL_U: usize = crate::pack::PANEL;

/// Packs the transposed block of one expert's weights (see
/// [`crate::pack::pack_transposed_block`]) with the fastest code `isa` allows.
pub(crate) fn transpose_block(
    isa: Isa,
    src: &[u16],
    shape: crate::pack::PackShape,
    c0: usize,
    np: usize,
    dst: &mut [u16],
) {
    assert!(src.len() >= shape.len(), "source pack too short");
    assert!(
        c0.is_multiple_of(16) && c0 + np * 16 <= shape.k_pad,
        "column block out of range"
    );
    assert!(dst.len() >= np * 16 * shape.n_pad, "destination too short");
    // SAFETY: bounds asserted above; `isa` checked available by the caller's layer.
    unsafe { (KernelSet::of(isa).transpose_block)(src, shape, c0, np, dst) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16;
    use crate::pack::{pack_into, PackShape};

    /// Random `[n, k]` bf16 weights and their packing.
    pub(super) fn rand_packed(
        n: usize,
        k: usize,
        seed: &mut u64,
    ) -> (PackShape, Vec<u16>, Vec<u16>) {
        let sh = PackShape::new(n, k);
        let w = rand_bf16(n * k, seed);
        let mut pw = vec![0u16; sh.len()];
        pack_into(&w, sh, &mut pw);
        (sh, w, pw)
    }

    pub(super) fn rand_bf16(n: usize, seed: &mut u64) -> Vec<u16> {
        (0..n)
            .map(|_| {
                *seed = seed
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                let u = ((*seed >> 40) as f64) / (1u64 << 24) as f64;
                bf16::from_f32((u * 2.0 - 1.0) as f32)
            })
            .collect()
    }

    #[test]
    fn transpose_block_same_on_every_isa() {
        let mut seed = 3u64;
        for (n, k) in [(32, 32), (64, 96), (100, 70)] {
            let (sh, _, pw) = rand_packed(n, k, &mut seed);
            let np = sh.k_pad / 16;
            let mut want = vec![0u16; np * 16 * sh.n_pad];
            crate::pack::pack_transposed_block(&pw, sh, 0, np, &mut want);
            for isa in Isa::available() {
                for (c0, cnt) in [(0, np), (16, np - 1), (sh.k_pad - 16, 1)] {
                    let mut got = vec![1u16; cnt * 16 * sh.n_pad];
                    transpose_block(isa, &pw, sh, c0, cnt, &mut got);
                    let off = c0 / 16 * 16 * sh.n_pad;
                    assert_eq!(got, want[off..off + got.len()], "{isa} n{n} k{k} c0 {c0}");
                }
            }
        }
    }

    #[test]
    fn gemm_transposed_matches_f64_reference() {
        let mut seed = 12u64;
        for (n, k, m) in [
            (32, 32, 1),
            (64, 96, 3),
            (100, 70, 4),
            (2816 / 8, 256, 2),
            (48, 64, 5),
            (40, 32, 8),
            (72, 48, 16),
        ] {
            let (sh, w, pw) = rand_packed(n, k, &mut seed);
            let lda = sh.n_pad + 8;
            let mut a = rand_bf16(m * lda, &mut seed);
            for i in 0..m {
                a[i * lda + n..i * lda + sh.n_pad].fill(0); // padding columns are zeros
            }
            for (c0, np) in [(0, sh.k_pad / 16), (16, 1), (sh.k_pad - 16, 1)] {
                for isa in Isa::available() {
                    let ldc = np * 16 + 3;
                    let mut c = vec![f32::NAN; m * ldc];
                    let g = TransposedGemm {
                        m,
                        a: &a,
                        lda,
                        w: &pw,
                        shape: sh,
                        c0,
                        np,
                        c: &mut c,
                        ldc,
                    };
                    gemm_transposed(isa, g);
                    for i in 0..m {
                        for q in 0..np * 16 {
                            let kk = c0 + q;
                            let want: f64 = if kk < k {
                                (0..n)
                                    .map(|o| {
                                        bf16::to_f32(a[i * lda + o]) as f64
                                            * bf16::to_f32(w[o * k + kk]) as f64
                                    })
                                    .sum()
                            } else {
                                0.0
                            };
                            let got = c[i * ldc + q] as f64;
                            assert!(
                                (got - want).abs() <= 1e-4 * (1.0 + want.abs()) * (n as f64).sqrt(),
                                "{isa} n{n} k{k} m{m} c0 {c0} ({i},{q}): {got} vs {want}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// On an AMX machine: every AMX loop variant gives the same bits as the default one.
    #[test]
    fn amx_loop_variants_same_bits() {
        if Isa::Amx.check_available().is_err() {
            return;
        }
        let mut seed = 9u64;
        // K blocks of 32: 64, 3, 1 and 2 (the pipelined loop's short cases, and odd and
        // even counts for the 1×2 tail's two register sets); rows with a 16-row tail
        // (70: two 32-row blocks and one of 16) and a tail alone (16).
        for k in [2048, 96, 32, 64] {
            for m in [70, 16] {
                amx_loop_variants_same_bits_at(m, k, &mut seed);
            }
        }
    }

    fn amx_loop_variants_same_bits_at(m: usize, k: usize, seed: &mut u64) {
        use crate::tuning::{set, Knob};
        let n = 96;
        let mut seed = *seed;
        let (sh, _, pw) = rand_packed(n, k, &mut seed);
        let lda = sh.k_pad + 32;
        let a = rand_bf16((m + 32) * lda, &mut seed);
        let run = || {
            let mut c = vec![f32::NAN; 96 * sh.n_pad];
            let g = Gemm {
                m,
                a: &a,
                lda,
                b: &pw,
                np: sh.panels(),
                k_pad: sh.k_pad,
                c: &mut c,
                ldc: sh.n_pad,
            };
            gemm(Isa::Amx, g);
            c.truncate(m * sh.n_pad);
            c
        };
        let _guard = crate::tuning::test_override_guard();
        let base = run();
        for (knob, v) in [
            (Knob::AmxPipeline, 0),
            (Knob::AmxPipeline, 1),
            (Knob::AmxPrefetchKib, 1),
            (Knob::AmxPrefetchKib, 4),
            (Knob::AmxKBlock, 8),
            (Knob::AmxKBlock, 3),
            (Knob::AmxRowsOuter, 1),
            // The tail's rows in a 32-row block: the same tile products.
            (Knob::AmxTail16, 0),
        ] {
            set(knob, Some(v));
            let got = run();
            set(knob, None);
            assert!(
                got.iter()
                    .zip(&base)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{knob:?}={v} at m={m} k={k}"
            );
        }
    }

    /// The AMX blocking and packing logic against the scalar kernel, with TDPBF16PS
    /// emulated in Rust (so it is exercised on machines without AMX) and on the real tiles
    /// where the CPU has them: rows ending in a 16-row tail (m % 32 in 1..=16) or in a
    /// whole 32-row block (17..=31), with and without readable rows past m, C stored
    /// straight and through a block of its own, under the knobs that change the blocking.
    #[test]
    fn amx_driver_matches_scalar() {
        amx_driver_matches_scalar_on::<amx::Emulated>("emulated");
        #[cfg(target_arch = "x86_64")]
        if Isa::Amx.check_available().is_ok() {
            amx_driver_matches_scalar_on::<amx::Hardware>("hardware");
        }
    }

    fn amx_driver_matches_scalar_on<K: amx::TileKernel>(tiles: &str) {
        use crate::tuning::{set, Knob};
        let settings: [&[(Knob, usize)]; 4] = [
            &[],
            &[(Knob::AmxKBlock, 2)],
            &[(Knob::AmxKBlock, 3), (Knob::AmxRowsOuter, 1)],
            &[(Knob::AmxTail16, 0)],
        ];
        let _guard = crate::tuning::test_override_guard();
        let mut seed = 8u64;
        for &(m, n, k, extra_rows) in &[
            (32, 32, 32, 0),
            (16, 32, 64, 0),
            (24, 64, 32, 0),
            (45, 64, 96, 0),
            (45, 64, 96, 32),
            (7, 32, 2050, 32),
            (57, 64, 96, 0),
            (57, 64, 96, 7),
            (70, 96, 64, 0),
            (70, 96, 160, 32),
            (90, 32, 224, 0),
        ] {
            let (sh, _, pw) = rand_packed(n, k, &mut seed);
            let lda = sh.k_pad;
            let a = rand_bf16((m + extra_rows) * lda, &mut seed);
            let ldc = sh.n_pad + 16;
            let mut want = vec![0f32; m * ldc];
            gemm(
                Isa::Scalar,
                Gemm {
                    m,
                    a: &a,
                    lda,
                    b: &pw,
                    np: sh.panels(),
                    k_pad: sh.k_pad,
                    c: &mut want,
                    ldc,
                },
            );
            for knobs in settings {
                for &(knob, v) in knobs {
                    set(knob, Some(v));
                }
                // Without and with scratch rows past m in C (the direct-store path).
                let mut c_rows = vec![m, m.next_multiple_of(16), m.next_multiple_of(amx::MR)];
                c_rows.dedup();
                for c_rows in c_rows {
                    let mut got = vec![f32::NAN; c_rows * ldc];
                    let mut want = want.clone();
                    let g = Gemm {
                        m,
                        a: &a,
                        lda,
                        b: &pw,
                        np: sh.panels(),
                        k_pad: sh.k_pad,
                        c: &mut got,
                        ldc,
                    };
                    if Isa::Avx512.check_available().is_ok() {
                        unsafe { amx_split::<K>(g) };
                    } else {
                        let mut g = g;
                        let m_amx = m / amx::row_step() * amx::row_step();
                        unsafe { amx::gemm_tiles::<K>(&mut g, m_amx) };
                        for i in m_amx..m {
                            want[i * ldc..(i + 1) * ldc].fill(f32::NAN);
                        }
                    }
                    for i in 0..m {
                        for o in 0..sh.n_pad {
                            let (x, y) = (got[i * ldc + o], want[i * ldc + o]);
                            assert!(
                                x.is_nan() && y.is_nan() || (x - y).abs() <= 1e-4 * (1.0 + y.abs()),
                                "{tiles} {knobs:?} m{m} n{n} k{k} +{extra_rows} c_rows {c_rows} \
                                 ({i},{o}) {x} vs {y}"
                            );
                        }
                    }
                }
                for &(knob, _) in knobs {
                    set(knob, None);
                }
            }
        }
    }

    /// Every available ISA against an f64 reference, on awkward shapes.
    #[test]
    fn gemm_all_isas_match_f64_reference() {
        let mut seed = 42u64;
        for &(m, n, k) in &[
            (1, 16, 32),
            (3, 17, 33),
            (7, 64, 2050),
            (13, 96, 1407),
            (6, 40, 64),
            (31, 2050 / 10, 96),
            // AMX rows: a 32-row block and a 16-row tail, the rest on AVX-512.
            (50, 64, 160),
            // Row counts that pick each AVX2 register block (1-4 rows, 5 + 4).
            (2, 48, 64),
            (4, 64, 96),
            (9, 32, 64),
        ] {
            let (sh, w, pw) = rand_packed(n, k, &mut seed);
            let lda = sh.k_pad + 8; // a stride wider than k_pad must work too
            let mut a = vec![0u16; m * lda];
            for i in 0..m {
                let row = rand_bf16(k, &mut seed);
                a[i * lda..i * lda + k].copy_from_slice(&row);
            }
            let ldc = sh.n_pad;
            // All panels, and an odd number of them (kernels step over panels in pairs).
            for (isa, np) in Isa::available()
                .into_iter()
                .flat_map(|isa| [(isa, sh.panels()), (isa, sh.panels() - 1)])
            {
                let mut c = vec![f32::NAN; m * ldc];
                gemm(
                    isa,
                    Gemm {
                        m,
                        a: &a,
                        lda,
                        b: &pw,
                        np,
                        k_pad: sh.k_pad,
                        c: &mut c,
                        ldc,
                    },
                );
                for i in 0..m {
                    for o in 0..n.min(np * 16) {
                        let r: f64 = (0..k)
                            .map(|x| {
                                bf16::to_f32(a[i * lda + x]) as f64
                                    * bf16::to_f32(w[o * k + x]) as f64
                            })
                            .sum();
                        let got = c[i * ldc + o] as f64;
                        assert!(
                            (got - r).abs() <= 1e-4 * (1.0 + r.abs()) * (k as f64).sqrt(),
                            "{isa} m{m} n{n} k{k} ({i},{o}): {got} vs {r}"
                        );
                    }
                    for o in n..np * 16 {
                        assert_eq!(c[i * ldc + o], 0.0, "padding column must be 0");
                    }
                }
            }
        }
    }
}
