//! Probe of AMX loop schedules other than the kernel's: which tile blocking keeps one
//! thread's tile unit busiest, and whether the product's accumulator chain costs
//! anything. `cargo test -p ktrs --release --lib -- --ignored --nocapture
//! probe_amx_schedules`. Results and the decision: docs/architecture.md ("What limits
//! the AMX GEMMs").
#![cfg(all(test, target_arch = "x86_64"))]

use super::amx::{self, TileKernel};
use super::tests::rand_bf16;
use super::*;
use std::time::Instant;

/// Products only, no memory access, `chains` accumulators (1–4), 4 products per
/// iteration: the tile unit's own ceiling, and whether the accumulator chain costs.
///
/// # Safety
/// AMX must be usable on this thread; `src` readable for 1 KiB.
pub(super) unsafe fn products(src: *const u16, iters: usize, chains: usize) {
    amx::Hardware::begin();
    macro_rules! run {
        ($c0:literal, $c1:literal, $c2:literal, $c3:literal) => {
            std::arch::asm!(
                "tileloadd tmm4, [{s} + {st}*1]",
                "tileloadd tmm5, [{s} + {st}*1]",
                "tileloadd tmm6, [{s} + {st}*1]",
                "tileloadd tmm7, [{s} + {st}*1]",
                "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
                "2:",
                concat!("tdpbf16ps tmm", $c0, ", tmm4, tmm6"),
                concat!("tdpbf16ps tmm", $c1, ", tmm4, tmm7"),
                concat!("tdpbf16ps tmm", $c2, ", tmm5, tmm6"),
                concat!("tdpbf16ps tmm", $c3, ", tmm5, tmm7"),
                "dec {n}",
                "jnz 2b",
                s = in(reg) src, st = in(reg) 64usize, n = inout(reg) iters => _,
                out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
                out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
                options(nostack, readonly),
            )
        };
    }
    match chains {
        1 => run!("0", "0", "0", "0"),
        2 => run!("0", "1", "0", "1"),
        3 => run!("0", "1", "2", "0"),
        _ => run!("0", "1", "2", "3"),
    }
    amx::Hardware::end();
}

/// 1×3: one A tile (double-buffered tmm3/tmm4) against three B tiles (tmm5–7), C in
/// tmm0–2; two K blocks per iteration. Streams: A at `a`, B_j at `b + j*bstride`,
/// every stream advancing 1 KiB per K block. Reads one K block past `2*iters`.
unsafe fn k13(a: *const u16, b: *const u16, bstride: usize, iters: usize) {
    std::arch::asm!(
        "tilezero tmm0", "tilezero tmm1", "tilezero tmm2",
        "tileloadd tmm3, [{a} + {st}*1]",
        "tileloadd tmm5, [{b0} + {st}*1]",
        "tileloadd tmm6, [{b1} + {st}*1]",
        "tileloadd tmm7, [{b2} + {st}*1]",
        "2:",
        "tileloadd tmm4, [{a} + {st}*1 + 1024]",
        "tdpbf16ps tmm0, tmm3, tmm5",
        "tileloadd tmm5, [{b0} + {st}*1 + 1024]",
        "tdpbf16ps tmm1, tmm3, tmm6",
        "tileloadd tmm6, [{b1} + {st}*1 + 1024]",
        "tdpbf16ps tmm2, tmm3, tmm7",
        "tileloadd tmm7, [{b2} + {st}*1 + 1024]",
        "tileloadd tmm3, [{a} + {st}*1 + 2048]",
        "tdpbf16ps tmm0, tmm4, tmm5",
        "tileloadd tmm5, [{b0} + {st}*1 + 2048]",
        "tdpbf16ps tmm1, tmm4, tmm6",
        "tileloadd tmm6, [{b1} + {st}*1 + 2048]",
        "tdpbf16ps tmm2, tmm4, tmm7",
        "tileloadd tmm7, [{b2} + {st}*1 + 2048]",
        "add {a}, 2048", "add {b0}, 2048", "add {b1}, 2048", "add {b2}, 2048",
        "dec {n}",
        "jnz 2b",
        a = inout(reg) a => _,
        b0 = inout(reg) b => _,
        b1 = inout(reg) b.add(bstride) => _,
        b2 = inout(reg) b.add(2 * bstride) => _,
        st = in(reg) 64usize,
        n = inout(reg) iters => _,
        out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
        out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
        options(nostack, readonly),
    );
}

/// 3×1: three A tiles (tmm3–5) against one B tile double-buffered (tmm6/tmm7).
unsafe fn k31(a: *const u16, astride: usize, b: *const u16, iters: usize) {
    std::arch::asm!(
        "tilezero tmm0", "tilezero tmm1", "tilezero tmm2",
        "tileloadd tmm3, [{a0} + {st}*1]",
        "tileloadd tmm4, [{a1} + {st}*1]",
        "tileloadd tmm5, [{a2} + {st}*1]",
        "tileloadd tmm6, [{b} + {st}*1]",
        "2:",
        "tileloadd tmm7, [{b} + {st}*1 + 1024]",
        "tdpbf16ps tmm0, tmm3, tmm6",
        "tileloadd tmm3, [{a0} + {st}*1 + 1024]",
        "tdpbf16ps tmm1, tmm4, tmm6",
        "tileloadd tmm4, [{a1} + {st}*1 + 1024]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tileloadd tmm5, [{a2} + {st}*1 + 1024]",
        "tileloadd tmm6, [{b} + {st}*1 + 2048]",
        "tdpbf16ps tmm0, tmm3, tmm7",
        "tileloadd tmm3, [{a0} + {st}*1 + 2048]",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm4, [{a1} + {st}*1 + 2048]",
        "tdpbf16ps tmm2, tmm5, tmm7",
        "tileloadd tmm5, [{a2} + {st}*1 + 2048]",
        "add {a0}, 2048", "add {a1}, 2048", "add {a2}, 2048", "add {b}, 2048",
        "dec {n}",
        "jnz 2b",
        a0 = inout(reg) a => _,
        a1 = inout(reg) a.add(astride) => _,
        a2 = inout(reg) a.add(2 * astride) => _,
        b = inout(reg) b => _,
        st = in(reg) 64usize,
        n = inout(reg) iters => _,
        out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
        out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
        options(nostack, readonly),
    );
}

/// 2×2 with the product order alternating between K blocks so each reloaded tile has
/// the longest possible gap before its next use (two K blocks per iteration).
unsafe fn k22_zigzag(a: *const u16, astride: usize, b: *const u16, bstride: usize, iters: usize) {
    std::arch::asm!(
        "tilezero tmm0", "tilezero tmm1", "tilezero tmm2", "tilezero tmm3",
        "tileloadd tmm4, [{a0} + {st}*1]",
        "tileloadd tmm6, [{b0} + {st}*1]",
        "tileloadd tmm7, [{b1} + {st}*1]",
        "tileloadd tmm5, [{a1} + {st}*1]",
        "2:",
        // block k: A0B0 A0B1 A1B1 A1B0 -> frees A0 after 2, B1 after 3, A1/B0 after 4
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tileloadd tmm4, [{a0} + {st}*1 + 1024]",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "tileloadd tmm7, [{b1} + {st}*1 + 1024]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tileloadd tmm6, [{b0} + {st}*1 + 1024]",
        "tileloadd tmm5, [{a1} + {st}*1 + 1024]",
        // block k+1: A0B1 A0B0 A1B0 A1B1
        "tdpbf16ps tmm1, tmm4, tmm7",
        "tdpbf16ps tmm0, tmm4, tmm6",
        "tileloadd tmm4, [{a0} + {st}*1 + 2048]",
        "tdpbf16ps tmm2, tmm5, tmm6",
        "tileloadd tmm6, [{b0} + {st}*1 + 2048]",
        "tdpbf16ps tmm3, tmm5, tmm7",
        "tileloadd tmm7, [{b1} + {st}*1 + 2048]",
        "tileloadd tmm5, [{a1} + {st}*1 + 2048]",
        "add {a0}, 2048", "add {a1}, 2048", "add {b0}, 2048", "add {b1}, 2048",
        "dec {n}",
        "jnz 2b",
        a0 = inout(reg) a => _,
        a1 = inout(reg) a.add(astride) => _,
        b0 = inout(reg) b => _,
        b1 = inout(reg) b.add(bstride) => _,
        st = in(reg) 64usize,
        n = inout(reg) iters => _,
        out("tmm0") _, out("tmm1") _, out("tmm2") _, out("tmm3") _,
        out("tmm4") _, out("tmm5") _, out("tmm6") _, out("tmm7") _,
        options(nostack, readonly),
    );
}

fn best_of<F: FnMut() -> f64>(n: usize, mut f: F) -> f64 {
    (0..n).map(|_| f()).fold(0.0, f64::max)
}

#[test]
#[ignore]
fn probe_amx_schedules() {
    if Isa::Amx.check_available().is_err() {
        println!("no AMX here");
        return;
    }
    crate::pool::pin_current_thread(0);
    let mut seed = 3u64;
    let data = rand_bf16(8 * 130 * 512 + 64, &mut seed);
    let base = unsafe { data.as_ptr().add(data.as_ptr().align_offset(64)) };
    let flop = 16.0 * 16.0 * 32.0 * 2.0;
    for round in 0..3 {
        println!("round {round}");
        for chains in [1usize, 2, 3, 4] {
            let r = best_of(5, || unsafe {
                let t = Instant::now();
                products(base, 1_000_000, chains);
                4.0 * flop * 1e6 / t.elapsed().as_secs_f64()
            });
            println!("products only, {chains} chains: {:.3} TFLOPS", r / 1e12);
        }
        // kb K blocks per stream; stream stride kb+2 KiB (room for the read-ahead).
        for kb in [8usize, 64] {
            let s = (kb + 2) * 512;
            let reps = 2_000_000 / kb;
            let timed = |f: &dyn Fn()| {
                best_of(5, || {
                    let t = Instant::now();
                    f();
                    t.elapsed().as_secs_f64()
                })
            };
            let _ = timed;
            let run = |name: &str, prods_per_kb: usize, f: &dyn Fn()| {
                let r = best_of(5, || {
                    let t = Instant::now();
                    f();
                    (prods_per_kb * kb * reps) as f64 * flop / t.elapsed().as_secs_f64()
                });
                println!("kb {kb:3}: {name:12} {:.3} TFLOPS", r / 1e12);
            };
            let mut c = vec![0f32; 32 * 32];
            let cp = c.as_mut_ptr() as usize;
            for pipe in [0usize, 1] {
                let _g = crate::tuning::test_override_guard();
                crate::tuning::set(crate::tuning::Knob::AmxPipeline, Some(pipe));
                run(["2x2 first", "2x2 pipe"][pipe], 4, &|| unsafe {
                    let a = amx::ATile {
                        a: base,
                        a1: base.add(s),
                        lda: 32,
                        step: 512,
                    };
                    amx::Hardware::begin();
                    for _ in 0..reps {
                        amx::Hardware::run(amx::TileCall {
                            a,
                            b0: base.add(2 * s),
                            b1: base.add(3 * s),
                            kblocks: kb,
                            c: cp as *mut f32,
                            ldc: 32,
                            load_c: false,
                        });
                    }
                    amx::Hardware::end();
                });
                crate::tuning::set(crate::tuning::Knob::AmxPipeline, None);
            }
            run("2x2 zigzag", 4, &|| unsafe {
                amx::Hardware::begin();
                for _ in 0..reps {
                    k22_zigzag(base, s, base.add(2 * s), s, kb / 2);
                }
                amx::Hardware::end();
            });
            run("1x3", 3, &|| unsafe {
                amx::Hardware::begin();
                for _ in 0..reps {
                    k13(base, base.add(s), s, kb / 2);
                }
                amx::Hardware::end();
            });
            run("3x1", 3, &|| unsafe {
                amx::Hardware::begin();
                for _ in 0..reps {
                    k31(base, s, base.add(3 * s), kb / 2);
                }
                amx::Hardware::end();
            });
            c[0] += 0.0;
        }
    }
}
