//! Speed probes of this machine and of the kernels, for the decisions in
//! docs/architecture.md. Ignored tests, never timed assertions:
//! `cargo test -p ktrs --release --lib -- --ignored --nocapture probe_`.

use super::{gemm, Gemm};
use crate::cpu::Isa;
use crate::pack::{pack_into, PackShape};
use std::time::Instant;

fn rand_bf16(n: usize, seed: &mut u64) -> Vec<u16> {
    (0..n)
        .map(|_| {
            *seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            crate::bf16::from_f32(((*seed >> 40) as f32) / (1u32 << 24) as f32 - 0.5)
        })
        .collect()
}

/// Single-core f32 FMA peak with 256-bit vectors (12 independent chains hide the
/// latency): the yardstick for the AVX2 GEMM's share of peak.
#[target_feature(enable = "avx2,fma")]
unsafe fn fma_peak_avx2(iters: usize) -> f64 {
    use std::arch::x86_64::*;
    let mut acc = [_mm256_set1_ps(0.0); 12];
    let (x, y) = (
        _mm256_set1_ps(std::hint::black_box(0.999)),
        _mm256_set1_ps(1e-7),
    );
    let t = Instant::now();
    for _ in 0..iters {
        for a in acc.iter_mut() {
            *a = _mm256_fmadd_ps(*a, x, y);
        }
    }
    let s = t.elapsed().as_secs_f64();
    std::hint::black_box(acc);
    (iters * 12 * 8 * 2) as f64 / s / 1e9
}

/// One core's FMA peak, then each tier's GEMM on expert-shaped blocks (one thread) as a
/// share of it.
#[test]
#[ignore]
fn probe_fma_peak_and_gemm() {
    if Isa::Avx2.check_available().is_err() {
        println!("probe: no AVX2 here");
        return;
    }
    // SAFETY: AVX2+FMA checked above.
    let peak = (0..3)
        .map(|_| unsafe { fma_peak_avx2(50_000_000) })
        .fold(0.0, f64::max);
    println!("probe fma peak (ymm, 1 thread): {peak:.1} GFLOPS");
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
            let reps = 60;
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
            let gf = 2.0 * (m * np * 16 * k * reps) as f64 / t.elapsed().as_secs_f64() / 1e9;
            println!(
                "probe gemm {isa}: m={m} n={} k={k}: {gf:.1} GFLOPS = {:.0}% of the ymm FMA peak",
                np * 16,
                100.0 * gf / peak
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
