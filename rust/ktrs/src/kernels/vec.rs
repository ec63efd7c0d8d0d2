//! Small f32 vector helpers for LoRA (rank r ≪ hidden) and the SwiGLU epilogues.
//!
//! Each helper is written once as plain Rust and compiled once per tier by
//! `multiversion!` (`kernels/dispatch.rs`): as is (the portable path) and with each vector
//! tier's features enabled, where LLVM vectorises the inner loops.
//! LoRA math stays in f32: the matrices are tiny next to the base GEMMs, and f32 keeps the
//! adapter gradients as accurate as PEFT's.

use crate::bf16::to_f32;
use crate::cpu::Isa;

use super::{multiversion, KernelSet};

/// `out[j] = Σ_c x[c] · m[j, c]` for `j < rows`, `c < k` (x bf16, m f32 row-major [rows, k]).
#[inline(always)]
fn project(x: &[u16], m: &[f32], rows: usize, k: usize, out: &mut [f32]) {
    let x = &x[..k];
    for j in 0..rows {
        let mrow = &m[j * k..(j + 1) * k];
        let mut acc = [0f32; 16];
        let mut xc = x.chunks_exact(16);
        let mut mc = mrow.chunks_exact(16);
        for (xa, ma) in (&mut xc).zip(&mut mc) {
            for l in 0..16 {
                acc[l] += to_f32(xa[l]) * ma[l];
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (a, b) in xc.remainder().iter().zip(mc.remainder()) {
            s += to_f32(*a) * b;
        }
        out[j] = s;
    }
}

/// `out[i·r + j] = Σ_c x_i[c] · m[j, c]` for the `n` bf16 rows `x_i` (stride `ldx`) and
/// the `r` f32 rows of `m` (stride `k`): LoRA-A style projections of many rows by one
/// small matrix. The AVX-512 version takes blocks of 4 rows × 4 ranks, so `m` streams
/// once per 4 rows and 16 independent accumulators hide the FMA latency (one row at a
/// time was latency-bound and re-read `m` from L2 per row: 4 ms of a 60 ms forward at
/// T=2048). Each output's summation order does not depend on how rows are grouped.
#[allow(clippy::too_many_arguments)]
pub(crate) fn project_rows(
    isa: Isa,
    x: &[u16],
    ldx: usize,
    n: usize,
    m: &[f32],
    r: usize,
    k: usize,
    out: &mut [f32],
) {
    if n == 0 || r == 0 {
        return;
    }
    assert!(ldx >= k && x.len() >= (n - 1) * ldx + k, "x too short");
    assert!(m.len() >= r * k, "m too short");
    assert!(out.len() >= n * r, "out too short");
    // SAFETY: bounds asserted above (the AVX-512 kernel reads through raw pointers); `isa`
    // was checked available by the caller's layer (`kernels::dispatch`).
    unsafe { (KernelSet::of(isa).project_rows)(x, ldx, n, m, r, k, out) }
}

multiversion! {
    /// `project_rows` a row at a time, for tiers without the blocked kernel.
    mod project_rows_portable(x: &[u16], ldx: usize, n: usize, m: &[f32], r: usize, k: usize, out: &mut [f32]) {
        for i in 0..n {
            project(&x[i * ldx..], m, r, k, &mut out[i * r..(i + 1) * r]);
        }
    }
}

/// `project_rows` in 4 × 4 blocks (AVX-512 F/BW/VL).
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn project_rows_avx512(
    x: &[u16],
    ldx: usize,
    n: usize,
    m: &[f32],
    r: usize,
    k: usize,
    out: &mut [f32],
) {
    let (x, m, out) = (x.as_ptr(), m.as_ptr(), out.as_mut_ptr());
    let mut i = 0;
    while i < n {
        let rn = (n - i).min(4);
        let mut j = 0;
        while j < r {
            let jn = (r - j).min(4);
            let (xi, mj, o) = (x.add(i * ldx), m.add(j * k), out.add(i * r + j));
            macro_rules! go {
                ($($a:literal $b:literal),*) => {
                    match (rn, jn) {
                        $(($a, $b) => project_block::<$a, $b>(xi, ldx, mj, k, o, r),)*
                        _ => unreachable!(),
                    }
                };
            }
            go!(1 1, 1 2, 1 3, 1 4, 2 1, 2 2, 2 3, 2 4, 3 1, 3 2, 3 3, 3 4, 4 1, 4 2, 4 3, 4 4);
            j += jn;
        }
        i += rn;
    }
}

/// R rows × J ranks of `project_rows`.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn project_block<const R: usize, const J: usize>(
    x: *const u16,
    ldx: usize,
    m: *const f32,
    k: usize,
    out: *mut f32,
    r: usize,
) {
    use std::arch::x86_64::*;
    #[inline(always)]
    unsafe fn widen(v: __m256i) -> __m512 {
        _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(v)))
    }
    let mut acc = [[_mm512_setzero_ps(); J]; R];
    let mut c = 0;
    while c < k {
        let left = k - c;
        let mask: u16 = if left >= 16 {
            0xFFFF
        } else {
            (1u16 << left) - 1
        };
        let mut xv = [_mm512_setzero_ps(); R];
        for (a, v) in xv.iter_mut().enumerate() {
            *v = widen(_mm256_maskz_loadu_epi16(
                mask,
                x.add(a * ldx + c) as *const i16,
            ));
        }
        for b in 0..J {
            let mv = _mm512_maskz_loadu_ps(mask, m.add(b * k + c));
            for (row, x) in acc.iter_mut().zip(&xv) {
                row[b] = _mm512_fmadd_ps(*x, mv, row[b]);
            }
        }
        c += 16;
    }
    for (a, row) in acc.iter().enumerate() {
        for (b, v) in row.iter().enumerate() {
            *out.add(a * r + b) = _mm512_reduce_add_ps(*v);
        }
    }
}

/// A rank-r term added to a block of GEMM output rows (the LoRA-B side of an adapter):
/// `c[i, col(q)] += Σ_j z[i·r + j] · (alpha · b[j·ldb + q])` for `q < cols`, where
/// column q of `b` lands in column `c0 + (q / 16)·16·step + q % 16` of the block (`step`
/// 2: every other 16-column panel, the fused gate/up layout). Row i of `z` belongs to
/// the block's row i.
#[derive(Clone, Copy)]
pub(crate) struct LowRank<'a> {
    pub alpha: f32,
    pub z: &'a [f32],
    pub r: usize,
    pub b: &'a [f32],
    pub ldb: usize,
    pub cols: usize,
    pub c0: usize,
    pub step: usize,
}

/// Adds `t` to `rows` rows of `c` (stride `ldc`). Applied to a whole block after its GEMM
/// rather than row by row inside the epilogue: per row and 16 columns that is one load,
/// r FMAs and one store with `b` held in registers, where the per-row helper it replaced
/// re-read and re-wrote the row once per rank (profiled at ~30% of the AMX products'
/// time in the gate/up phase).
pub(crate) fn add_low_rank(isa: Isa, t: &LowRank<'_>, rows: usize, c: &mut [f32], ldc: usize) {
    if rows == 0 || t.r == 0 || t.cols == 0 {
        return;
    }
    let last_col = t.c0 + (t.cols - 1) / 16 * 16 * t.step + (t.cols - 1) % 16;
    assert!(t.step >= 1 && last_col < ldc, "columns past the row");
    assert!(c.len() > (rows - 1) * ldc + last_col, "c too short");
    assert!(t.z.len() >= rows * t.r, "z too short");
    assert!(
        t.ldb >= t.cols && t.b.len() >= (t.r - 1) * t.ldb + t.cols,
        "b too short"
    );
    // SAFETY: bounds asserted above (the AVX-512 kernel reads through raw pointers); `isa`
    // was checked available by the caller's layer (`kernels::dispatch`).
    unsafe { (KernelSet::of(isa).add_low_rank)(t, rows, c, ldc) }
}

multiversion! {
    /// `add_low_rank` for tiers without the AVX-512 kernel, in its summation order.
    mod add_low_rank_portable(t: &LowRank<'_>, rows: usize, c: &mut [f32], ldc: usize) {
        let mut bs = [0f32; 16];
        for s0 in (0..t.cols).step_by(16) {
            let w = (t.cols - s0).min(16);
            let co = t.c0 + s0 * t.step;
            // Ranks outside: each `alpha · b` slice is formed once for all the rows, and
            // every output still sums its ranks in order.
            for j in 0..t.r {
                for (b, v) in bs[..w].iter_mut().zip(&t.b[j * t.ldb + s0..]) {
                    *b = t.alpha * v;
                }
                for i in 0..rows {
                    let f = t.z[i * t.r + j];
                    let out = &mut c[i * ldc + co..i * ldc + co + w];
                    for (o, b) in out.iter_mut().zip(&bs[..w]) {
                        *o += f * b;
                    }
                }
            }
        }
    }
}

/// `add_low_rank` with AVX-512 F: each 16-column slice of `alpha · b` stays in registers
/// (ranks in groups of 8, 4, then 1) while the block's rows pass.
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
pub(super) unsafe fn add_low_rank_avx512(t: &LowRank<'_>, rows: usize, c: &mut [f32], ldc: usize) {
    let cp = c.as_mut_ptr();
    for s0 in (0..t.cols).step_by(16) {
        let w = (t.cols - s0).min(16);
        let mask: u16 = if w == 16 { 0xFFFF } else { (1u16 << w) - 1 };
        let cs = cp.add(t.c0 + s0 * t.step);
        let mut j = 0;
        while j < t.r {
            let left = t.r - j;
            j += if left >= 8 {
                low_rank_slice::<8>(t, j, s0, mask, rows, cs, ldc)
            } else if left >= 4 {
                low_rank_slice::<4>(t, j, s0, mask, rows, cs, ldc)
            } else {
                low_rank_slice::<1>(t, j, s0, mask, rows, cs, ldc)
            };
        }
    }
}

/// Ranks `j .. j + J` of the 16-column slice from `s0` (`mask`: its columns in range) of
/// `add_low_rank_avx512`, into `rows` rows from `c`; returns J.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl")]
unsafe fn low_rank_slice<const J: usize>(
    t: &LowRank<'_>,
    j: usize,
    s0: usize,
    mask: u16,
    rows: usize,
    c: *mut f32,
    ldc: usize,
) -> usize {
    use std::arch::x86_64::*;
    let (z, b, alpha) = (
        t.z.as_ptr().add(j),
        t.b.as_ptr().add(j * t.ldb + s0),
        _mm512_set1_ps(t.alpha),
    );
    let mut bv = [_mm512_setzero_ps(); J];
    for (q, v) in bv.iter_mut().enumerate() {
        *v = _mm512_mul_ps(alpha, _mm512_maskz_loadu_ps(mask, b.add(q * t.ldb)));
    }
    for i in 0..rows {
        let ci = c.add(i * ldc);
        let mut acc = _mm512_maskz_loadu_ps(mask, ci);
        for (q, v) in bv.iter().enumerate() {
            acc = _mm512_fmadd_ps(_mm512_set1_ps(*z.add(i * t.r + q)), *v, acc);
        }
        _mm512_mask_storeu_ps(ci, mask, acc);
    }
    J
}

multiversion! {
    /// `Σ_c a[c] · bf16(x[c])`.
    pub(crate) fn dot_f32_bf16(a: &[f32], x: &[u16], k: usize) -> f32 {
        let mut acc = [0f32; 16];
        let (a, x) = (&a[..k], &x[..k]);
        let mut ac = a.chunks_exact(16);
        let mut xc = x.chunks_exact(16);
        for (aa, xa) in (&mut ac).zip(&mut xc) {
            for l in 0..16 {
                acc[l] += aa[l] * to_f32(xa[l]);
            }
        }
        let mut s: f32 = acc.iter().sum();
        for (p, q) in ac.remainder().iter().zip(xc.remainder()) {
            s += p * to_f32(*q);
        }
        s
    }
}

multiversion! {
    /// `out[c] += w · y[c]` over f32 rows (the top-k weighted sum).
    pub(crate) fn axpy(w: f32, y: &[f32], out: &mut [f32]) {
        for (o, v) in out.iter_mut().zip(y) {
            *o += w * v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::from_f32;

    #[test]
    fn helpers_agree_across_isas() {
        let (r, k) = (5, 37);
        let x: Vec<u16> = (0..k).map(|i| from_f32((i as f32 * 0.37).sin())).collect();
        let m: Vec<f32> = (0..r * k).map(|i| (i as f32 * 0.11).cos()).collect();
        for isa in Isa::available() {
            let mut out = vec![0f32; r];
            project_rows(isa, &x, k, 1, &m, r, k, &mut out);
            for j in 0..r {
                let e: f32 = (0..k).map(|c| to_f32(x[c]) * m[j * k + c]).sum();
                assert!((out[j] - e).abs() < 1e-4, "{isa}");
            }
            let d = dot_f32_bf16(isa, &m[..k], &x, k);
            let e: f32 = (0..k).map(|c| m[c] * to_f32(x[c])).sum();
            assert!((d - e).abs() < 1e-4);
        }
    }

    #[test]
    fn add_low_rank_matches_f64_on_every_isa() {
        // Ranks around the register groups (8, 4, 1), columns around the 16-lane slice,
        // both column maps (step 1, and step 2 with an offset: the fused gate/up layout).
        for (rows, r, cols, c0, step) in [
            (1usize, 1usize, 5usize, 0usize, 1usize),
            (3, 8, 16, 0, 1),
            (5, 13, 37, 16, 2),
            (7, 4, 128, 0, 1),
            (2, 20, 33, 3, 1),
            (96, 8, 16, 16, 2),
        ] {
            let ldb = cols + 3;
            let ldc = c0 + (cols.div_ceil(16) * 16) * step + 5;
            let b: Vec<f32> = (0..r * ldb).map(|i| (i as f32 * 0.11).cos()).collect();
            let z: Vec<f32> = (0..rows * r).map(|i| (i as f32 * 0.29).sin()).collect();
            let c: Vec<f32> = (0..rows * ldc).map(|i| (i as f32 * 0.07).sin()).collect();
            let col = |q: usize| c0 + q / 16 * 16 * step + q % 16;
            let t = LowRank {
                alpha: 0.75,
                z: &z,
                r,
                b: &b,
                ldb,
                cols,
                c0,
                step,
            };
            for isa in Isa::available() {
                let mut got = c.clone();
                add_low_rank(isa, &t, rows, &mut got, ldc);
                let mut want: Vec<f64> = c.iter().map(|&v| v as f64).collect();
                for i in 0..rows {
                    for q in 0..cols {
                        want[i * ldc + col(q)] += (0..r)
                            .map(|j| 0.75 * z[i * r + j] as f64 * b[j * ldb + q] as f64)
                            .sum::<f64>();
                    }
                }
                for (n, (g, w)) in got.iter().zip(&want).enumerate() {
                    // Columns the term does not own stay exactly as they were.
                    assert!(
                        (*g as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()) * r as f64,
                        "{isa} rows{rows} r{r} cols{cols} step{step} at {n}: {g} vs {w}"
                    );
                }
            }
        }
    }

    #[test]
    fn project_rows_matches_f64_on_every_isa() {
        // Row counts and ranks around the 4×4 block, k around the 16-lane vector.
        for (n, r, k) in [(1, 1, 5), (3, 8, 37), (4, 4, 16), (9, 6, 2048), (6, 13, 33)] {
            let ldx = k + 7;
            let x: Vec<u16> = (0..n * ldx)
                .map(|i| from_f32((i as f32 * 0.37).sin()))
                .collect();
            let m: Vec<f32> = (0..r * k).map(|i| (i as f32 * 0.11).cos()).collect();
            for isa in Isa::available() {
                let mut out = vec![f32::NAN; n * r];
                project_rows(isa, &x, ldx, n, &m, r, k, &mut out);
                for i in 0..n {
                    for j in 0..r {
                        let e: f64 = (0..k)
                            .map(|c| to_f32(x[i * ldx + c]) as f64 * m[j * k + c] as f64)
                            .sum();
                        let got = out[i * r + j] as f64;
                        assert!(
                            (got - e).abs() <= 1e-5 * (1.0 + e.abs()) * (k as f64).sqrt(),
                            "{isa} n{n} r{r} k{k}: {got} vs {e}"
                        );
                    }
                }
                // Grouping rows differently gives the same bits.
                let mut one = vec![0f32; r];
                project_rows(isa, &x[(n - 1) * ldx..], ldx, 1, &m, r, k, &mut one);
                assert_eq!(one[..], out[(n - 1) * r..]);
            }
        }
    }
}
