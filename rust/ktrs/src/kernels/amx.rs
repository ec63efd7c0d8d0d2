//! AMX-BF16 GEMM: `tdpbf16ps` with a 2×2 tile block (32 rows × 32 columns of f32 in
//! tmm0–3, A in tmm4–5, B in tmm6–7), emitted with inline `asm!` because AMX intrinsics
//! are unstable in Rust. B tiles are read straight from the packed panels (16 pair rows
//! of 64 bytes = one panel's K-block of 32), so no repacking happens at run time. A last
//! row block of at most 16 rows runs a 1×2 block (one A tile) instead of paying for 32.
//!
//! The blocking logic is written once, generic over [`TileKernel`]; [`Emulated`] runs the
//! same tile operations in plain Rust, so the driver and the packing are tested on
//! machines without AMX too.

use super::Gemm;
use crate::pack::PANEL;

/// Rows of one micro-kernel call (two A tiles).
pub(crate) const MR: usize = 32;
const TILE_K: usize = 32; // bf16 per A-tile row
const B_TILE_U16: usize = 16 * 2 * PANEL; // one B tile: 16 pair rows × 16 lanes × 2

/// The micro-kernels: the 2×2 tile block `c[32×32] (+)= A[32 rows, 32·kblocks] ·
/// [panel b0 | panel b1]`, and its 1×2 form for a 16-row tail.
pub(crate) trait TileKernel {
    /// Prepares the tile unit for a run of micro-kernels on this thread.
    unsafe fn begin();
    /// The 2×2 block: C in tmm0–3.
    ///
    /// # Safety
    /// `t.a` readable for 32 rows (`a.a`: rows 0–15, `a.a1`: rows 16–31, stride `a.lda`)
    /// and `kblocks` K blocks; `b0`, `b1` readable for `kblocks` B tiles; `c` writable
    /// for 32 rows of 32 f32, row stride `ldc`.
    unsafe fn run(t: TileCall);
    /// The 1×2 block: C in tmm0–1, A rows 0–15 only.
    ///
    /// # Safety
    /// As [`TileKernel::run`], for 16 rows of A and C.
    unsafe fn run_half(t: TileCall);
    /// Releases the tile state (so an idle thread carries none).
    unsafe fn end();
}

/// Where the two A tiles of a micro-kernel call start and how they advance.
#[derive(Clone, Copy)]
pub(crate) struct ATile {
    pub a: *const u16,
    pub a1: *const u16,
    pub lda: usize,
    pub step: usize,
}

/// One micro-kernel call's operands.
#[derive(Clone, Copy)]
pub(crate) struct TileCall {
    pub a: ATile,
    pub b0: *const u16,
    pub b1: *const u16,
    pub kblocks: usize,
    pub c: *mut f32,
    pub ldc: usize,
    /// Adds to the values already in `c` (a later K block) rather than overwriting them.
    pub load_c: bool,
}

impl TileCall {
    /// A call on row-major A from `a` (row stride `lda` u16), one K block of 32 per step.
    /// (Rows 16–31 may lie past A for a 1×2 call, which never reads them.)
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn rows(
        a: *const u16,
        lda: usize,
        b0: *const u16,
        b1: *const u16,
        kblocks: usize,
        c: *mut f32,
        ldc: usize,
        load_c: bool,
    ) -> TileCall {
        TileCall {
            a: ATile {
                a,
                a1: a.wrapping_add(16 * lda),
                lda,
                step: TILE_K,
            },
            b0,
            b1,
            kblocks,
            c,
            ldc,
            load_c,
        }
    }
}

/// The real AMX unit.
pub(crate) struct Hardware;

#[repr(C, align(64))]
struct TileConfig([u8; 64]);

/// Palette 1; every tile 16 rows × 64 bytes (A: 16×32 bf16, B: 16 pair rows × 16 lanes,
/// C: 16×16 f32).
static CONFIG: TileConfig = {
    let mut c = [0u8; 64];
    c[0] = 1;
    let mut t = 0;
    while t < 8 {
        c[16 + 2 * t] = 64;
        c[48 + t] = 16;
        t += 1;
    }
    TileConfig(c)
};

/// Software prefetch of the B stream: `(bytes ahead, into L1)`; 0 bytes = none.
fn b_prefetch() -> (usize, bool) {
    use crate::tuning::{get, Knob};
    (
        get(Knob::AmxPrefetchKib) * 1024,
        get(Knob::AmxPrefetchL2) == 0,
    )
}

/// The 16 cache lines of the B tile `pf` bytes past `b` (`$ins` = prefetch instruction).
#[rustfmt::skip]
macro_rules! pf_tile {
    ($ins:literal, $b:literal) => {
        concat!(
            $ins, " [{", $b, "} + {pf} + 0]\n", $ins, " [{", $b, "} + {pf} + 64]\n",
            $ins, " [{", $b, "} + {pf} + 128]\n", $ins, " [{", $b, "} + {pf} + 192]\n",
            $ins, " [{", $b, "} + {pf} + 256]\n", $ins, " [{", $b, "} + {pf} + 320]\n",
            $ins, " [{", $b, "} + {pf} + 384]\n", $ins, " [{", $b, "} + {pf} + 448]\n",
            $ins, " [{", $b, "} + {pf} + 512]\n", $ins, " [{", $b, "} + {pf} + 576]\n",
            $ins, " [{", $b, "} + {pf} + 640]\n", $ins, " [{", $b, "} + {pf} + 704]\n",
            $ins, " [{", $b, "} + {pf} + 768]\n", $ins, " [{", $b, "} + {pf} + 832]\n",
            $ins, " [{", $b, "} + {pf} + 896]\n", $ins, " [{", $b, "} + {pf} + 960]\n",
        )
    };
}

/// One `asm!` block of a micro-kernel: its C tiles `[register name = address, ...]`
/// loaded (`$load_c`) or zeroed, the K-loop template lines `[...]`, the C tiles stored;
/// with the operands every kernel shares (`$($op)*`: extra ones). One block from C to C:
/// the compiler cannot place anything between the K loop and the C tiles it keeps.
macro_rules! micro_asm {
    ([$($r:literal $cn:ident = $cp:expr),+ $(,)?], [$($t:expr),* $(,)?],
     $a0:expr, $lda:expr, $astep:expr, $b0:expr, $b1:expr, $kb:expr, $ldc:expr, $load_c:expr;
     $($op:tt)*) => {
        std::arch::asm!(
            "test {load_c}, {load_c}",
            "jz 7f",
            $(concat!("tileloadd ", $r, ", [{", stringify!($cn), "} + {ldc}*1]"),)+
            "jmp 8f",
            "7:",
            $(concat!("tilezero ", $r),)+
            "8:",
            $($t,)*
            $(concat!("tilestored [{", stringify!($cn), "} + {ldc}*1], ", $r),)+
            a0 = inout(reg) $a0 => _,
            lda = in(reg) $lda * 2,
            astep = in(reg) $astep * 2,
            b0 = inout(reg) $b0 => _,
            b1 = inout(reg) $b1 => _,
            kb = inout(reg) $kb => _,
            ldb = in(reg) 64usize,
            ldc = in(reg) $ldc * 4,
            load_c = in(reg) usize::from($load_c),
            $($cn = in(reg) $cp,)+
            $($op)*
            out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
            out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
            options(nostack),
        )
    };
}

/// `micro_asm!` of the 2×2 block: C in tmm0–3, A rows 16–31 at `{a1}`.
macro_rules! tile_asm {
    ([$($t:expr),* $(,)?], $a:expr, $b0:expr, $b1:expr, $kb:expr, $c:expr, $ldc:expr, $load_c:expr;
     $($op:tt)*) => {
        micro_asm!(
            [
                "tmm0" c0 = $c,
                "tmm1" c1 = $c.add(16),
                "tmm2" c2 = $c.add(16 * $ldc),
                "tmm3" c3 = $c.add(16 * $ldc + 16),
            ],
            [$($t),*], $a.a, $a.lda, $a.step, $b0, $b1, $kb, $ldc, $load_c;
            a1 = inout(reg) $a.a1 => _, $($op)*
        )
    };
}

/// The K loop of the 2×2 block (C stays in tmm0–3 across the K blocks), in two variants:
/// - `first`: all four tile loads, then the four products;
/// - `pipelined`: each operand tile is reloaded for the next K block as soon as its last
///   product of this block is issued, so loads overlap the remaining products (tile
///   registers are not renamed: a load waits for the products reading its register).
///   The last block runs without loads (nothing is read past the operands).
///
/// `$pf` are extra template lines at the top of every iteration (prefetch), `$($op)*`
/// their operands.
macro_rules! k_loop {
    (first, $a:expr, $b0:expr, $b1:expr, $kb:expr, $c:expr, $ldc:expr, $lc:expr; $($pf:expr),*; $($op:tt)*) => {
        tile_asm!([
            "2:",
            $($pf,)*
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "add {a0}, {astep}",
            "add {a1}, {astep}",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "dec {kb}",
            "jnz 2b",
        ], $a, $b0, $b1, $kb, $c, $ldc, $lc; $($op)*)
    };
    (pipelined, $a:expr, $b0:expr, $b1:expr, $kb:expr, $c:expr, $ldc:expr, $lc:expr; $($pf:expr),*; $($op:tt)*) => {
        tile_asm!([
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "dec {kb}",
            "jz 3f",
            "2:",
            $($pf,)*
            "add {a0}, {astep}",
            "add {a1}, {astep}",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tdpbf16ps tmm3, tmm5, tmm7",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tileloadd tmm5, [{a1} + {lda}*1]",
            "dec {kb}",
            "jnz 2b",
            "3:",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "tdpbf16ps tmm2, tmm5, tmm6",
            "tdpbf16ps tmm3, tmm5, tmm7",
        ], $a, $b0, $b1, $kb, $c, $ldc, $lc; $($op)*)
    };
}

/// `k_loop!` of variant `$v` with the B prefetch this process is tuned for.
macro_rules! k_loop_prefetched {
    ($v:ident, $a:expr, $b0:expr, $b1:expr, $kb:expr, $c:expr, $ldc:expr, $lc:expr) => {
        match b_prefetch() {
            (0, _) => k_loop!($v, $a, $b0, $b1, $kb, $c, $ldc, $lc; ; ),
            (pf, true) => k_loop!($v, $a, $b0, $b1, $kb, $c, $ldc, $lc;
                pf_tile!("prefetcht0", "b0"), pf_tile!("prefetcht0", "b1"); pf = in(reg) pf,),
            (pf, false) => k_loop!($v, $a, $b0, $b1, $kb, $c, $ldc, $lc;
                pf_tile!("prefetcht1", "b0"), pf_tile!("prefetcht1", "b1"); pf = in(reg) pf,),
        }
    };
}

#[cfg(target_arch = "x86_64")]
impl TileKernel for Hardware {
    unsafe fn begin() {
        // Reloaded for every GEMM call: torch/oneDNN may have reconfigured or released
        // the tiles on this thread (the caller's thread runs torch code too).
        std::arch::asm!("ldtilecfg [{cfg}]", cfg = in(reg) CONFIG.0.as_ptr(), options(nostack, readonly));
    }

    unsafe fn run(t: TileCall) {
        debug_assert!(t.kblocks > 0);
        if pipelined() {
            k_loop_prefetched!(pipelined, t.a, t.b0, t.b1, t.kblocks, t.c, t.ldc, t.load_c)
        } else {
            k_loop_prefetched!(first, t.a, t.b0, t.b1, t.kblocks, t.c, t.ldc, t.load_c)
        }
    }

    unsafe fn run_half(t: TileCall) {
        debug_assert!(t.kblocks > 0);
        // Every operand tile is read by the products of its own K block only, and a load
        // waits for the products reading its register: the K blocks alternate between
        // two register sets (A tmm4, B tmm6–7 / A tmm5, B tmm2–3), so the next block's
        // loads are issued before this block's products without waiting on them.
        micro_asm!(["tmm0" c0 = t.c, "tmm1" c1 = t.c.add(16)], [
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "dec {kb}",
            "jz 4f",
            "2:",
            "add {a0}, {astep}",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "tileloadd tmm5, [{a0} + {lda}*1]",
            "tileloadd tmm2, [{b0} + {ldb}*1]",
            "tileloadd tmm3, [{b1} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "dec {kb}",
            "jz 5f",
            "add {a0}, {astep}",
            "add {b0}, 1024",
            "add {b1}, 1024",
            "tileloadd tmm4, [{a0} + {lda}*1]",
            "tileloadd tmm6, [{b0} + {ldb}*1]",
            "tileloadd tmm7, [{b1} + {ldb}*1]",
            "tdpbf16ps tmm0, tmm5, tmm2",
            "tdpbf16ps tmm1, tmm5, tmm3",
            "dec {kb}",
            "jnz 2b",
            // The last block in the first set (an odd count) or in the second.
            "4:",
            "tdpbf16ps tmm0, tmm4, tmm6",
            "tdpbf16ps tmm1, tmm4, tmm7",
            "jmp 6f",
            "5:",
            "tdpbf16ps tmm0, tmm5, tmm2",
            "tdpbf16ps tmm1, tmm5, tmm3",
            "6:",
        ], t.a.a, t.a.lda, t.a.step, t.b0, t.b1, t.kblocks, t.ldc, t.load_c; )
    }

    unsafe fn end() {
        std::arch::asm!("tilerelease", options(nostack, nomem));
    }
}

/// TDPBF16PS in plain Rust, tile by tile, in the instruction's order of accumulation.
#[cfg_attr(not(test), allow(dead_code))]
pub(crate) struct Emulated;

impl TileKernel for Emulated {
    unsafe fn begin() {}
    unsafe fn end() {}

    unsafe fn run(t: TileCall) {
        Self::tiles(MR, t)
    }

    unsafe fn run_half(t: TileCall) {
        Self::tiles(16, t)
    }
}

#[cfg_attr(not(test), allow(dead_code))]
impl Emulated {
    /// `rows` (16 or 32) rows of C, from the A tiles that cover them.
    unsafe fn tiles(rows: usize, t: TileCall) {
        let TileCall {
            a,
            b0,
            b1,
            kblocks,
            c,
            ldc,
            load_c,
        } = t;
        use crate::bf16::to_f32;
        let mut acc = [[0f32; 32]; MR];
        let acc = &mut acc[..rows];
        if load_c {
            for (r, row) in acc.iter_mut().enumerate() {
                std::ptr::copy_nonoverlapping(c.add(r * ldc), row.as_mut_ptr(), 32);
            }
        }
        for kb in 0..kblocks {
            for (q, b) in [b0, b1].into_iter().enumerate() {
                let bt = b.add(kb * B_TILE_U16);
                for (r, row) in acc.iter_mut().enumerate() {
                    let base = if r < 16 {
                        a.a.add(r * a.lda)
                    } else {
                        a.a1.add((r - 16) * a.lda)
                    };
                    let ar = base.add(kb * a.step);
                    for p in 0..16 {
                        let (x0, x1) = (to_f32(*ar.add(2 * p)), to_f32(*ar.add(2 * p + 1)));
                        for n in 0..16 {
                            let pair = bt.add((p * 16 + n) * 2);
                            row[q * 16 + n] += x0 * to_f32(*pair) + x1 * to_f32(*pair.add(1));
                        }
                    }
                }
            }
        }
        for (r, row) in acc.iter().enumerate() {
            std::ptr::copy_nonoverlapping(row.as_ptr(), c.add(r * ldc), 32);
        }
    }
}

/// The rows `0 .. m16` (a multiple of 16) of `g` with tile kernel `K`: 32-row chunks
/// with the 2×2 block, a last 16-row one (when `m16` is an odd multiple of 16) with the
/// 1×2. The caller makes sure A has rows readable up to `m16` and `np` is even. When
/// `g.c` has room for `m16` rows, the tiles are stored straight into it (rows past `m`
/// included); otherwise through a block of its own.
///
/// # Safety
/// `K`'s hardware must be usable on this thread; bounds as stated.
pub(crate) unsafe fn gemm_tiles<K: TileKernel>(g: &mut Gemm<'_>, m16: usize) {
    debug_assert!(
        m16.is_multiple_of(16) && g.np.is_multiple_of(2) && m16 <= g.m.next_multiple_of(MR)
    );
    let panel_len = g.k_pad * PANEL;
    let kblocks = g.k_pad / TILE_K;
    let kstep = match k_block() {
        0 => kblocks,
        s => s.min(kblocks),
    };
    let (chunks, pairs) = (m16.div_ceil(MR), g.np / 2);
    let half = !m16.is_multiple_of(MR); // the last chunk has 16 rows
    let direct = g.c.len() >= m16 * g.ldc;
    // Otherwise the accumulators of the `m16` rows, 32 columns per panel pair.
    let mut tiles = if direct {
        Vec::new()
    } else {
        vec![0f32; m16 * pairs * 32]
    };
    let (cbase, ldc) = if direct {
        (g.c.as_mut_ptr(), g.ldc)
    } else {
        (tiles.as_mut_ptr(), pairs * 32)
    };
    K::begin();
    for kb0 in (0..kblocks).step_by(kstep) {
        let kn = kstep.min(kblocks - kb0);
        let run = |ch: usize, pp: usize| {
            let a = g.a.as_ptr().add(ch * MR * g.lda + kb0 * TILE_K);
            let b0 = g.b.as_ptr().add(2 * pp * panel_len + kb0 * B_TILE_U16);
            let b1 = b0.add(panel_len);
            let c = cbase.add(ch * MR * ldc + pp * 32);
            let t = TileCall::rows(a, g.lda, b0, b1, kn, c, ldc, kb0 > 0);
            if half && ch == chunks - 1 {
                K::run_half(t)
            } else {
                K::run(t)
            }
        };
        if rows_outer() {
            // A row chunk stays in L2 (L1 for short K) while every panel pair passes.
            for ch in 0..chunks {
                for pp in 0..pairs {
                    run(ch, pp);
                }
            }
        } else {
            // The B block of a panel pair stays in L2 while every row chunk passes.
            for pp in 0..pairs {
                for ch in 0..chunks {
                    run(ch, pp);
                }
            }
        }
    }
    K::end();
    if !direct {
        for r in 0..m16.min(g.m) {
            g.c[r * g.ldc..r * g.ldc + ldc].copy_from_slice(&tiles[r * ldc..(r + 1) * ldc]);
        }
    }
}

/// Rows the AMX part of a GEMM call is rounded to: 16 with the 1×2 tail block, 32
/// without (`KTRS_AMX_TAIL16=0`, for A/B runs).
pub(crate) fn row_step() -> usize {
    if crate::tuning::get(crate::tuning::Knob::AmxTail16) == 1 {
        16
    } else {
        MR
    }
}

/// K block (in units of 32) of the AMX loop; 0 = all of K in one pass.
fn k_block() -> usize {
    crate::tuning::get(crate::tuning::Knob::AmxKBlock)
}

/// Whether the K loop is software-pipelined (`k_loop_pipelined!`).
fn pipelined() -> bool {
    crate::tuning::get(crate::tuning::Knob::AmxPipeline) == 1
}

/// Loop order of a GEMM call: row chunks outside, or panel pairs outside.
fn rows_outer() -> bool {
    crate::tuning::get(crate::tuning::Knob::AmxRowsOuter) == 1
}

/// `iters` rounds of four tile loads from the same 4 KiB (L1), no products: the load
/// side's ceiling for `kernels::tests::amx_ceilings`.
///
/// # Safety
/// AMX must be usable on this thread; `src` readable for 4 KiB.
#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) unsafe fn loads_only(src: *const u16, iters: usize) {
    Hardware::begin();
    std::arch::asm!(
        "2:",
        "tileloadd tmm4, [{s} + {st}*1]",
        "tileloadd tmm5, [{s} + {st}*1 + 1024]",
        "tileloadd tmm6, [{s} + {st}*1 + 2048]",
        "tileloadd tmm7, [{s} + {st}*1 + 3072]",
        "dec {n}",
        "jnz 2b",
        s = in(reg) src,
        st = in(reg) 64usize,
        n = inout(reg) iters => _,
        out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
        options(nostack, readonly),
    );
    Hardware::end();
}
