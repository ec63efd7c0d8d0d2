//! LoRA weight gradients of one expert: sums over its pairs of outer products,
//! `Σ_p coef_p · v_p ⊗ x_p`, with the accumulators for a 16-column × 8-rank block held in
//! registers across all pairs (accumulating into memory per pair was load/store bound).
//! Written once in portable Rust, compiled per tier (LLVM vectorises the 16 lanes), plus
//! an AVX-512 version with the block pinned in zmm registers.

use super::KernelSet;
use crate::bf16::to_f32;
use crate::cpu::Isa;
use crate::pack::{fused_row, PANEL};
use std::ops::Range;

/// Where a row's logical column c lives.
#[derive(Clone, Copy)]
pub(crate) enum Cols {
    Plain,
    /// Gate (`false`) or up (`true`) half of a fused gate+up row.
    Fused(bool),
}

/// Per-pair factor.
#[derive(Clone, Copy)]
pub(crate) enum Coef<'a> {
    Const(f32),
    /// `s · w[p]`.
    Scaled(f32, &'a [f32]),
}

impl Coef<'_> {
    #[inline(always)]
    fn get(&self, p: usize) -> f32 {
        match *self {
            Coef::Const(s) => s,
            Coef::Scaled(s, w) => s * w[p],
        }
    }
}

/// Output layout: `A`-gradients are `[r, k]`, `B`-gradients `[k, r]`.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Layout {
    RankMajor,
    ColMajor,
}

const JB: usize = 8;

/// `out += Σ_{p ∈ rows} coef_p · v[p, j] · x[p, col(c)]` for `j < r`, `c < k`, stored as
/// `out[j·k + c]` (RankMajor) or `out[c·r + j]` (ColMajor). `x` rows have stride `ld`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn accumulate(
    isa: Isa,
    x: &[u16],
    ld: usize,
    cols: Cols,
    rows: Range<usize>,
    v: &[f32],
    coef: Coef<'_>,
    r: usize,
    k: usize,
    layout: Layout,
    out: &mut [f32],
) {
    assert!(out.len() >= r * k && v.len() >= rows.end * r);
    if rows.is_empty() {
        return;
    }
    // SAFETY: `isa` was checked available by the caller's layer (`kernels::dispatch`);
    // `v` is as long as the AVX-512 kernel's unchecked reads (asserted above), and it
    // asserts `x`'s bounds itself.
    unsafe { (KernelSet::of(isa).lora_grad)(x, ld, cols, rows, v, coef, r, k, layout, out) }
}

/// Same as `portable`, with the 8 × 16 accumulator block pinned in zmm registers.
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
#[allow(clippy::too_many_arguments)]
pub(super) unsafe fn body_avx512(
    x: &[u16],
    ld: usize,
    cols: Cols,
    rows: Range<usize>,
    v: &[f32],
    coef: Coef<'_>,
    r: usize,
    k: usize,
    layout: Layout,
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let col_of = |c: usize| match cols {
        Cols::Plain => c,
        Cols::Fused(up) => fused_row(c, up),
    };
    for c0 in (0..k).step_by(PANEL) {
        let width = PANEL.min(k - c0);
        let base = col_of(c0);
        assert!(rows.end == 0 || (rows.end - 1) * ld + base + PANEL <= x.len());
        for j0 in (0..r).step_by(JB) {
            let jn = JB.min(r - j0);
            let mut acc = [_mm512_setzero_ps(); JB];
            for p in rows.clone() {
                let raw = _mm256_loadu_si256(x.as_ptr().add(p * ld + base) as *const __m256i);
                let xv = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)));
                let f = coef.get(p);
                let vp = v.as_ptr().add(p * r + j0);
                if jn == JB {
                    for (jj, a) in acc.iter_mut().enumerate() {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(f * *vp.add(jj)), xv, *a);
                    }
                } else {
                    for (jj, a) in acc.iter_mut().enumerate().take(jn) {
                        *a = _mm512_fmadd_ps(_mm512_set1_ps(f * *vp.add(jj)), xv, *a);
                    }
                }
            }
            let mut lanes = [0f32; PANEL];
            for (jj, a) in acc.iter().enumerate().take(jn) {
                let j = j0 + jj;
                _mm512_storeu_ps(lanes.as_mut_ptr(), *a);
                for (l, val) in lanes.iter().enumerate().take(width) {
                    match layout {
                        Layout::RankMajor => out[j * k + c0 + l] += val,
                        Layout::ColMajor => out[(c0 + l) * r + j] += val,
                    }
                }
            }
        }
    }
}

super::multiversion! {
mod portable(
    x: &[u16],
    ld: usize,
    cols: Cols,
    rows: Range<usize>,
    v: &[f32],
    coef: Coef<'_>,
    r: usize,
    k: usize,
    layout: Layout,
    out: &mut [f32],
) {
    let col_of = |c: usize| match cols {
        Cols::Plain => c,
        Cols::Fused(up) => fused_row(c, up),
    };
    for c0 in (0..k).step_by(PANEL) {
        let width = PANEL.min(k - c0);
        // A 16-column block is contiguous in both layouts (a fused panel holds 16 columns).
        let base = col_of(c0);
        for j0 in (0..r).step_by(JB) {
            let jn = JB.min(r - j0);
            let mut acc = [[0f32; PANEL]; JB];
            for p in rows.clone() {
                let xr = &x[p * ld + base..p * ld + base + PANEL];
                let mut xv = [0f32; PANEL];
                for l in 0..PANEL {
                    xv[l] = to_f32(xr[l]);
                }
                let f = coef.get(p);
                let vp = &v[p * r + j0..p * r + j0 + jn];
                for jj in 0..JB {
                    let a = if jj < jn { f * vp[jj] } else { 0.0 };
                    for l in 0..PANEL {
                        acc[jj][l] += a * xv[l];
                    }
                }
            }
            for (jj, accj) in acc.iter().enumerate().take(jn) {
                let j = j0 + jj;
                for l in 0..width {
                    match layout {
                        Layout::RankMajor => out[j * k + c0 + l] += accj[l],
                        Layout::ColMajor => out[(c0 + l) * r + j] += accj[l],
                    }
                }
            }
        }
    }
}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bf16::from_f32;

    #[test]
    fn matches_naive_sum_on_every_isa() {
        let (n, ld, k, r) = (7usize, 96usize, 45usize, 11usize);
        let x: Vec<u16> = (0..n * ld)
            .map(|i| from_f32(((i * 7919) % 101) as f32 / 50.0 - 1.0))
            .collect();
        let v: Vec<f32> = (0..n * r)
            .map(|i| ((i * 31) % 17) as f32 / 8.0 - 1.0)
            .collect();
        let w: Vec<f32> = (0..n).map(|p| 0.1 + p as f32 * 0.05).collect();
        for cols in [Cols::Plain, Cols::Fused(true)] {
            for layout in [Layout::RankMajor, Layout::ColMajor] {
                let rows = 2..n;
                let mut want = vec![0.5f32; r * k];
                for p in rows.clone() {
                    for j in 0..r {
                        for c in 0..k {
                            let col = match cols {
                                Cols::Plain => c,
                                Cols::Fused(up) => fused_row(c, up),
                            };
                            let idx = if layout == Layout::RankMajor {
                                j * k + c
                            } else {
                                c * r + j
                            };
                            want[idx] += 2.0 * w[p] * v[p * r + j] * to_f32(x[p * ld + col]);
                        }
                    }
                }
                for isa in Isa::available() {
                    let mut got = vec![0.5f32; r * k];
                    accumulate(
                        isa,
                        &x,
                        ld,
                        cols,
                        rows.clone(),
                        &v,
                        Coef::Scaled(2.0, &w),
                        r,
                        k,
                        layout,
                        &mut got,
                    );
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{isa}");
                    }
                }
            }
        }
    }
}
