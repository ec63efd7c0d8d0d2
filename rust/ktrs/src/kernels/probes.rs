//! Speed probes of this machine and of the kernels, for the decisions in
//! docs/architecture.md. Ignored tests, never timed assertions:
//! `cargo test -p ktrs --release --lib -- --ignored --nocapture --test-threads=1 probe_`
//! (one at a time: run together they time each other).

use super::tests::{rand_bf16, rand_packed};
use super::*;
use crate::pack::{pack_into, PackShape};
use std::time::Instant;

/// Single-core f32 FMA peak (12 independent chains hide the latency): the yardstick
/// for the widening GEMMs' share of peak. One function per register width.
macro_rules! fma_peak {
    ($name:ident, $features:literal, $set1:ident, $fmadd:ident, $lanes:literal) => {
        #[target_feature(enable = $features)]
        unsafe fn $name(iters: usize) -> f64 {
            use std::arch::x86_64::*;
            let mut acc = [$set1(0.0); 12];
            let (x, y) = ($set1(std::hint::black_box(0.999)), $set1(1e-7));
            let t = Instant::now();
            for _ in 0..iters {
                for a in acc.iter_mut() {
                    *a = $fmadd(*a, x, y);
                }
            }
            let s = t.elapsed().as_secs_f64();
            std::hint::black_box(acc);
            (iters * 12 * $lanes * 2) as f64 / s / 1e9
        }
    };
}
fma_peak!(
    fma_peak_avx2,
    "avx2,fma",
    _mm256_set1_ps,
    _mm256_fmadd_ps,
    8
);
fma_peak!(
    fma_peak_avx512,
    "avx512f",
    _mm512_set1_ps,
    _mm512_fmadd_ps,
    16
);

/// One core's FMA peak, then each tier's GEMM on expert-shaped blocks (one thread) as a
/// share of it; best of 7 runs each (the development machine is shared).
#[test]
#[ignore]
fn probe_fma_peak_and_gemm() {
    if Isa::Avx2.check_available().is_err() {
        println!("probe: no AVX2 here");
        return;
    }
    // SAFETY: AVX2+FMA checked above.
    let peak = (0..7)
        .map(|_| unsafe { fma_peak_avx2(10_000_000) })
        .fold(0.0, f64::max);
    println!("probe fma peak (ymm, 1 thread): {peak:.1} GFLOPS");
    let peak512 = if Isa::Avx512f.check_available().is_ok() {
        // SAFETY: AVX-512F checked above.
        let p = (0..7)
            .map(|_| unsafe { fma_peak_avx512(10_000_000) })
            .fold(0.0, f64::max);
        println!("probe fma peak (zmm, 1 thread): {p:.1} GFLOPS");
        p
    } else {
        peak
    };
    let mut seed = 1u64;
    for (m, k, np) in [(96usize, 2048usize, 4usize), (30, 2048, 16), (48, 1408, 16)] {
        let blocks = 11;
        let sh = PackShape::new(np * 16 * blocks, k);
        let mut pw = vec![0u16; sh.len()];
        pack_into(&rand_bf16(sh.n * k, &mut seed), sh, &mut pw);
        let lda = sh.k_pad + 32;
        let a = rand_bf16((m + 32) * lda, &mut seed);
        let mut c = vec![0f32; (m + 32) * np * 16];
        for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
            // Best of 7 short runs: the machine is shared, the best is the kernel's own.
            let reps = 22;
            let mut gf = 0f64;
            for _ in 0..7 {
                let t = Instant::now();
                for rep in 0..reps {
                    let blk = rep % blocks;
                    let g = Gemm {
                        m,
                        a: &a,
                        lda,
                        b: &pw[blk * np * sh.panel_len()..],
                        np,
                        k_pad: sh.k_pad,
                        c: &mut c,
                        ldc: np * 16,
                    };
                    gemm(isa, g);
                }
                let s = t.elapsed().as_secs_f64();
                gf = gf.max(2.0 * (m * np * 16 * k * reps) as f64 / s / 1e9);
            }
            let (base, width) = if isa == Isa::Avx2 {
                (peak, "ymm")
            } else {
                (peak512, "zmm")
            };
            println!(
                "probe gemm {isa}: m={m} n={} k={k}: {gf:.1} GFLOPS = {:.0}% of the {width} FMA peak",
                np * 16,
                100.0 * gf / base
            );
        }
    }
}

/// DRAM read bandwidth: 1 GiB summed by 1 and by all physical cores (each thread its
/// own slice), best of 3.
#[test]
#[ignore]
fn probe_dram_read_bandwidth() {
    let words = (1usize << 30) / 8;
    let data: Vec<u64> = (0..words as u64).collect();
    let cores = crate::cpu::physical_cores();
    for threads in [1, cores] {
        let best = (0..3)
            .map(|_| {
                let t = Instant::now();
                let per = words / threads;
                let sum: u64 = std::thread::scope(|s| {
                    let hs: Vec<_> = data
                        .chunks(per)
                        .map(|ch| s.spawn(move || ch.iter().fold(0u64, |a, &x| a ^ x)))
                        .collect();
                    hs.into_iter()
                        .map(|h| h.join().unwrap())
                        .fold(0, |a, x| a ^ x)
                });
                std::hint::black_box(sum);
                (words * 8) as f64 / t.elapsed().as_secs_f64() / 1e9
            })
            .fold(0.0, f64::max);
        println!("probe dram read: {threads} threads {best:.1} GB/s");
    }
}

/// `cargo test -- --ignored --nocapture gemm_throughput`: single-thread GEMM speed at
/// an expert-shaped block (one task's worth, repeated), for tuning on the AMX machine.
#[test]
#[ignore]
fn gemm_throughput() {
    let mut seed = 1u64;
    let (m, k, np) = (96usize, 2048usize, 4usize);
    let (sh, _, pw) = rand_packed(np * 16 * 11, k, &mut seed);
    let lda = sh.k_pad + 32;
    let a = rand_bf16((m + 32) * lda, &mut seed);
    let mut c = vec![0f32; m * 64];
    for isa in Isa::available().into_iter().filter(|&i| i != Isa::Scalar) {
        let reps = 40;
        let t = std::time::Instant::now();
        for rep in 0..reps {
            let blk = rep % 11;
            gemm(
                isa,
                Gemm {
                    m,
                    a: &a,
                    lda,
                    b: &pw[blk * np * sh.panel_len()..],
                    np,
                    k_pad: sh.k_pad,
                    c: &mut c,
                    ldc: 64,
                },
            );
        }
        let s = t.elapsed().as_secs_f64();
        let flops = 2.0 * (m * np * 16 * k * reps) as f64;
        println!(
            "gemm {isa}: m={m} n={} k={k}: {:.1} GFLOPS (1 thread)",
            np * 16,
            flops / s / 1e9
        );
    }
    if Isa::Amx.check_available().is_ok() {
        // The same work with A in tile-contiguous blocks (each A tile 1 KiB contiguous),
        // and a small L1-resident problem: the micro-kernel's ceiling.
        let kbc = sh.k_pad / 32;
        let at = rand_bf16((m / 16 + 2) * kbc * 512, &mut seed);
        let mut tile = vec![0f32; 32 * 32];
        let reps = 40;
        for (label, kb_n, blocks) in [("tile-layout A", kbc, 11usize), ("L1-resident k=256", 8, 1)]
        {
            let t = std::time::Instant::now();
            unsafe {
                use amx::TileKernel;
                amx::Hardware::begin();
                for rep in 0..reps {
                    let blk = rep % blocks;
                    for pp in 0..np / 2 {
                        let b0 = pw.as_ptr().add((blk * np + 2 * pp) * sh.panel_len());
                        let b1 = b0.add(sh.panel_len());
                        for ch in 0..m / 32 {
                            let a0 = at.as_ptr().add(2 * ch * kbc * 512);
                            let a = amx::ATile {
                                a: a0,
                                a1: a0.add(kbc * 512),
                                lda: 32,
                                step: 512,
                            };
                            amx::Hardware::run(amx::TileCall {
                                a,
                                b0,
                                b1,
                                kblocks: kb_n,
                                c: tile.as_mut_ptr(),
                                ldc: 32,
                                load_c: false,
                            });
                        }
                    }
                }
                amx::Hardware::end();
            }
            let s = t.elapsed().as_secs_f64();
            let flops = 2.0 * (m * np * 16 * kb_n * 32 * reps) as f64;
            println!("gemm amx {label}: {:.1} GFLOPS (1 thread)", flops / s / 1e9);
        }
    }
}

/// What one AMX run gives on a set of pinned CPUs at once, in FLOPs (products) or
/// bytes (loads), summed over the threads, per second.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
enum AmxWork {
    /// The 2×2 block's four products, no memory access.
    ProductsOnly,
    /// Four tile loads per round from 4 KiB of L1, no products.
    LoadsOnly,
    /// The 2×2 micro-kernel (`AmxPipeline` as set) on contiguous operands, `kb` K
    /// blocks per call: 8 = 32 KiB (L1), 64 = 256 KiB (L2).
    Kernel { kb: usize },
}

#[cfg(target_arch = "x86_64")]
fn amx_rate(work: AmxWork, cpus: &[usize], seed: &mut u64) -> f64 {
    use amx::TileKernel;
    let th = cpus.len();
    // A tiles (2 × 64 KiB at most) then the two B panels, contiguous, per thread.
    let data: Vec<Vec<u16>> = (0..th)
        .map(|_| rand_bf16(4 * 64 * 512 + 64, seed))
        .collect();
    let start = std::sync::Barrier::new(th);
    let t0 = std::sync::Mutex::new(None::<Instant>);
    let amount: f64 = std::thread::scope(|sc| {
        let hs: Vec<_> = data
            .iter()
            .zip(cpus)
            .map(|(d, &cpu)| {
                let (start, t0) = (&start, &t0);
                sc.spawn(move || unsafe {
                    crate::pool::pin_current_thread(cpu);
                    start.wait();
                    t0.lock().unwrap().get_or_insert_with(Instant::now);
                    let base = d.as_ptr().add(d.as_ptr().align_offset(64));
                    match work {
                        AmxWork::ProductsOnly => {
                            let iters = 200_000;
                            super::probe_amx_sched::products(d.as_ptr(), iters, 4);
                            4.0 * 16.0 * 16.0 * 32.0 * 2.0 * iters as f64
                        }
                        AmxWork::LoadsOnly => {
                            let iters = 200_000;
                            amx::loads_only(base, iters);
                            4.0 * 1024.0 * iters as f64
                        }
                        AmxWork::Kernel { kb } => {
                            let reps = 320_000 / kb;
                            let a = amx::ATile {
                                a: base,
                                a1: base.add(kb * 512),
                                lda: 32,
                                step: 512,
                            };
                            let (b0, b1) = (base.add(2 * kb * 512), base.add(3 * kb * 512));
                            let mut c = vec![0f32; 32 * 32];
                            amx::Hardware::begin();
                            for _ in 0..reps {
                                amx::Hardware::run(amx::TileCall {
                                    a,
                                    b0,
                                    b1,
                                    kblocks: kb,
                                    c: c.as_mut_ptr(),
                                    ldc: 32,
                                    load_c: false,
                                });
                            }
                            amx::Hardware::end();
                            2.0 * (32 * 32 * 32 * kb * reps) as f64
                        }
                    }
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).sum()
    });
    let secs = t0.lock().unwrap().unwrap().elapsed().as_secs_f64();
    amount / secs
}

/// `cargo test -- --ignored --nocapture amx_ceilings`: what the tile unit gives on
/// this machine on 1 … N pinned threads at once: products only (no memory), tile loads
/// only, and the 2×2 micro-kernel (both loop variants) on contiguous operands in L1 or
/// L2. First, which CPUs share a tile unit: products only on CPU 0 and CPU j together
/// (about 1× one CPU's rate where they share, 2× where they do not).
#[test]
#[ignore]
#[cfg(target_arch = "x86_64")]
fn amx_ceilings() {
    if Isa::Amx.check_available().is_err() {
        println!("amx ceilings: no AMX here");
        return;
    }
    let mut seed = 5u64;
    use crate::tuning::{set, Knob};
    let ncpu = crate::cpu::physical_cores().max(1);
    let one = amx_rate(AmxWork::ProductsOnly, &[0], &mut seed);
    let pairs: Vec<String> = (1..ncpu)
        .map(|j| {
            let r = amx_rate(AmxWork::ProductsOnly, &[0, j], &mut seed);
            format!("0+{j}:{:.2}", r / one)
        })
        .collect();
    println!(
        "amx ceiling pairs (products only on two CPUs / one CPU alone, {:.2} TFLOPS): {}",
        one / 1e12,
        pairs.join(" ")
    );
    let mut sets: Vec<(String, Vec<usize>)> = Vec::new();
    for th in [1usize, 2, 8, 16].into_iter().filter(|&t| t <= ncpu) {
        sets.push((format!("{th:2} threads"), (0..th).collect()));
    }
    if ncpu >= 16 {
        sets.push((" 8 even CPUs".into(), (0..8).map(|i| 2 * i).collect()));
    }
    let _guard = crate::tuning::test_override_guard();
    for (what, cpus) in &sets {
        let th = cpus.len() as f64;
        let p = amx_rate(AmxWork::ProductsOnly, cpus, &mut seed);
        let l = amx_rate(AmxWork::LoadsOnly, cpus, &mut seed);
        let mut line = format!(
            "amx ceiling {what}: products only {:6.2} TFLOPS, loads only {:6.0} GB/s ({:.0}/thread)",
            p / 1e12,
            l / 1e9,
            l / 1e9 / th
        );
        for (label, kb) in [("L1", 8usize), ("L2", 64)] {
            for (pipe, name) in [(0usize, ""), (1, " pipelined")] {
                set(Knob::AmxPipeline, Some(pipe));
                let r = amx_rate(AmxWork::Kernel { kb }, cpus, &mut seed);
                line += &format!(", 2x2{name} {label} {:5.2}", r / 1e12);
            }
        }
        set(Knob::AmxPipeline, None);
        println!("{line} TFLOPS");
    }
}

/// `cargo test --release -- --ignored --nocapture weight_stream`: one thread streaming
/// 64 experts' gate+up weights (738 MB, DeepSeek-V2-Lite shape) with 3 rows, three
/// ways: the forward GEMM, the direct transposed product, repack + GEMM. GB/s of
/// weights read, for few-row backward tuning. `WS_EXPERTS=1` reuses one expert
/// (cache-resident: the kernels' compute rate). Zen 4, 2026-11-27: forward 34.5 GB/s
/// from DRAM (104 cached), direct 22 (47), repack + GEMM 15.7 (30).
#[test]
#[ignore]
fn weight_stream() {
    let mut seed = 3u64;
    let (n, k, m, experts) = (2816usize, 2048usize, 3usize, 64usize);
    let experts_used: usize = std::env::var("WS_EXPERTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(experts);
    let sh = PackShape::new(n, k);
    let one = rand_bf16(sh.len(), &mut seed);
    let mut all = vec![0u16; sh.len() * experts];
    for e in 0..experts {
        all[e * sh.len()..(e + 1) * sh.len()].copy_from_slice(&one);
    }
    // `WS_ISA=avx2` probes another tier.
    let isa = std::env::var("WS_ISA")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(Isa::best);
    isa.check_available().unwrap();
    let np = 16;
    let lda_f = sh.k_pad + 32;
    let a_f = rand_bf16(8 * lda_f, &mut seed);
    let lda_t = sh.n_pad + 32;
    let a_t = rand_bf16(8 * lda_t, &mut seed);
    let mut c = vec![0f32; 8 * np * 16];
    let mut tbuf = vec![0u16; np * 16 * sh.n_pad];
    let bytes = (sh.len() * 2 * experts) as f64;
    for label in ["forward gemm", "direct transposed", "repack + gemm"] {
        let t = std::time::Instant::now();
        for e in 0..experts {
            let w = &all[(e % experts_used) * sh.len()..(e % experts_used + 1) * sh.len()];
            match label {
                "forward gemm" => {
                    for blk in 0..sh.panels() / np {
                        let g = Gemm {
                            m,
                            a: &a_f,
                            lda: lda_f,
                            b: &w[blk * np * sh.panel_len()..],
                            np,
                            k_pad: sh.k_pad,
                            c: &mut c,
                            ldc: np * 16,
                        };
                        gemm(isa, g);
                    }
                }
                "direct transposed" => {
                    for blk in 0..sh.k_pad / 16 / np {
                        let g = TransposedGemm {
                            m,
                            a: &a_t,
                            lda: lda_t,
                            w,
                            shape: sh,
                            c0: blk * np * 16,
                            np,
                            c: &mut c,
                            ldc: np * 16,
                        };
                        gemm_transposed(isa, g);
                    }
                }
                _ => {
                    for blk in 0..sh.k_pad / 16 / np {
                        transpose_block(isa, w, sh, blk * np * 16, np, &mut tbuf);
                        let g = Gemm {
                            m,
                            a: &a_t,
                            lda: lda_t,
                            b: &tbuf,
                            np,
                            k_pad: sh.n_pad,
                            c: &mut c,
                            ldc: np * 16,
                        };
                        gemm(isa, g);
                    }
                }
            }
        }
        let s = t.elapsed().as_secs_f64();
        println!(
            "weight stream {label}: {:.1} GB/s (1 thread, {isa})",
            bytes / s / 1e9
        );
    }
}
