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

impl Cols {
    #[inline(always)]
    pub(crate) fn at(self, c: usize) -> usize {
        match self {
            Cols::Plain => c,
            Cols::Fused(up) => fused_row(c, up),
        }
    }
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

impl Layout {
    /// Where element (j, c) of an `r × k` gradient lies.
    #[inline(always)]
    fn index(self, j: usize, c: usize, r: usize, k: usize) -> usize {
        match self {
            Layout::RankMajor => j * k + c,
            Layout::ColMajor => c * r + j,
        }
    }
}

/// One gradient sum, `Σ_{p ∈ rows} coef_p · v[p, j] · x[p, cols.at(c)]` for `j < r`,
/// `c < k`, laid out in memory as `layout` says.
pub(crate) struct GradSum<'a> {
    /// bf16 rows of stride `ld`.
    pub x: &'a [u16],
    pub ld: usize,
    pub cols: Cols,
    pub rows: Range<usize>,
    /// `r` values per row.
    pub v: &'a [f32],
    pub coef: Coef<'a>,
    pub r: usize,
    pub k: usize,
    pub layout: Layout,
}

const JB: usize = 8;

/// `out += sum`.
pub(crate) fn accumulate(isa: Isa, sum: GradSum<'_>, out: &mut [f32]) {
    assert!(out.len() >= sum.r * sum.k && sum.v.len() >= sum.rows.end * sum.r);
    if sum.rows.is_empty() {
        return;
    }
    // SAFETY: `isa` was checked available by the caller's layer (`kernels::dispatch`);
    // `v` is as long as the AVX-512 kernel's unchecked reads (asserted above), and it
    // asserts `x`'s bounds itself.
    unsafe { (KernelSet::of(isa).lora_grad)(sum, out) }
}

/// One block of the sum: ranks `j0..j0 + jn` (`jn` ≤ 8) × 16 columns from `c0`, of which
/// `width` are in range, starting at `base` in a row of `x`.
#[derive(Clone, Copy)]
struct Block {
    c0: usize,
    width: usize,
    base: usize,
    j0: usize,
    jn: usize,
}

impl GradSum<'_> {
    /// The blocks each kernel sums in registers, each over all the rows (column blocks
    /// outer, rank blocks inner).
    #[inline(always)]
    fn blocks(&self) -> impl Iterator<Item = Block> + '_ {
        let nj = self.r.div_ceil(JB);
        (0..self.k.div_ceil(PANEL) * nj).map(move |b| self.block(b / nj, b % nj))
    }

    /// Column block `cb` × rank block `jb`.
    #[inline(always)]
    fn block(&self, cb: usize, jb: usize) -> Block {
        let (c0, j0) = (cb * PANEL, jb * JB);
        Block {
            c0,
            width: PANEL.min(self.k - c0),
            // A 16-column block is contiguous in both layouts (a fused panel holds 16
            // columns).
            base: self.cols.at(c0),
            j0,
            jn: JB.min(self.r - j0),
        }
    }

    /// Adds the sums of block `b` (rows `..b.jn` of `acc`) into `out`.
    #[inline(always)]
    fn add(&self, out: &mut [f32], b: Block, acc: &[[f32; PANEL]; JB]) {
        for (jj, row) in acc.iter().enumerate().take(b.jn) {
            for (l, val) in row.iter().enumerate().take(b.width) {
                out[self.layout.index(b.j0 + jj, b.c0 + l, self.r, self.k)] += val;
            }
        }
    }
}

thread_local! {
    /// `coef_p · v[p, ..]` for the rows of this thread's current sum.
    static SCALED_V: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Same sums as `portable`, with 8-rank × 16-column accumulator blocks pinned in zmm
/// registers, two column blocks at a time (each row's broadcast ranks serve 32 columns),
/// and `coef_p · v[p, j]` formed once per row rather than once per block (the same
/// products, so the same bits).
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
pub(super) unsafe fn body_avx512(sum: GradSum<'_>, out: &mut [f32]) {
    let r = sum.r;
    SCALED_V.with(|cell| {
        let mut fv = cell.borrow_mut();
        fv.clear();
        for p in sum.rows.clone() {
            let f = sum.coef.get(p);
            fv.extend(sum.v[p * r..(p + 1) * r].iter().map(|v| f * v));
        }
        let (ncb, nj) = (sum.k.div_ceil(PANEL), r.div_ceil(JB));
        let mut cb = 0;
        while cb < ncb {
            // The rows' lines of the next column pair, fetched during the last pass over
            // this pair: rows are a page apart, which hardware prefetchers do not follow,
            // and the loads waited on L2/L3 (60% of this kernel's samples).
            let next = [cb + 2, cb + 3].map(|c| (c < ncb).then(|| sum.block(c, 0).base));
            for jb in 0..nj {
                let pf = if jb + 1 == nj { next } else { [None; 2] };
                if cb + 1 < ncb {
                    let bs = [sum.block(cb, jb), sum.block(cb + 1, jb)];
                    sum_blocks::<2>(&sum, &fv, bs, pf, out);
                } else {
                    sum_blocks::<1>(&sum, &fv, [sum.block(cb, jb)], pf, out);
                }
            }
            cb += 2;
        }
    })
}

/// N column blocks of `body_avx512` (same ranks), over all the rows; `fv` holds the
/// scaled `v` rows from `sum.rows.start`; `pf`: row offsets to prefetch in each row.
#[inline]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx512bf16")]
unsafe fn sum_blocks<const N: usize>(
    sum: &GradSum<'_>,
    fv: &[f32],
    bs: [Block; N],
    pf: [Option<usize>; 2],
    out: &mut [f32],
) {
    use std::arch::x86_64::*;
    let (x, ld, r) = (sum.x, sum.ld, sum.r);
    let (start, end) = (sum.rows.start, sum.rows.end);
    for b in &bs {
        assert!(end == 0 || (end - 1) * ld + b.base + PANEL <= x.len());
    }
    assert!(fv.len() >= (end - start) * r);
    let (j0, jn) = (bs[0].j0, bs[0].jn);
    let mut acc = [[_mm512_setzero_ps(); JB]; N];
    for p in sum.rows.clone() {
        // A prefetch never faults, so offsets past `x` would be harmless; these are inside.
        for o in pf.iter().flatten() {
            _mm_prefetch::<_MM_HINT_T0>(x.as_ptr().add(p * ld + o) as *const i8);
        }
        let mut xv = [_mm512_setzero_ps(); N];
        for (v, b) in xv.iter_mut().zip(&bs) {
            let raw = _mm256_loadu_si256(x.as_ptr().add(p * ld + b.base) as *const __m256i);
            *v = _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(raw)));
        }
        let fp = fv.as_ptr().add((p - start) * r + j0);
        if jn == JB {
            for jj in 0..JB {
                let f = _mm512_set1_ps(*fp.add(jj));
                for (a, v) in acc.iter_mut().zip(&xv) {
                    a[jj] = _mm512_fmadd_ps(f, *v, a[jj]);
                }
            }
        } else {
            for jj in 0..jn {
                let f = _mm512_set1_ps(*fp.add(jj));
                for (a, v) in acc.iter_mut().zip(&xv) {
                    a[jj] = _mm512_fmadd_ps(f, *v, a[jj]);
                }
            }
        }
    }
    for (a, b) in acc.iter().zip(&bs) {
        let mut sums = [[0f32; PANEL]; JB];
        for (row, v) in sums.iter_mut().zip(a).take(jn) {
            _mm512_storeu_ps(row.as_mut_ptr(), *v);
        }
        sum.add(out, *b, &sums);
    }
}

super::multiversion! {
mod portable(sum: GradSum<'_>, out: &mut [f32]) {
    let (x, ld, v, r) = (sum.x, sum.ld, sum.v, sum.r);
    for b in sum.blocks() {
        let (base, j0, jn) = (b.base, b.j0, b.jn);
        let mut acc = [[0f32; PANEL]; JB];
        for p in sum.rows.clone() {
            let xr = &x[p * ld + base..p * ld + base + PANEL];
            let mut xv = [0f32; PANEL];
            for l in 0..PANEL {
                xv[l] = to_f32(xr[l]);
            }
            let f = sum.coef.get(p);
            let vp = &v[p * r + j0..p * r + j0 + jn];
            for jj in 0..JB {
                let a = if jj < jn { f * vp[jj] } else { 0.0 };
                for l in 0..PANEL {
                    acc[jj][l] += a * xv[l];
                }
            }
        }
        sum.add(out, b, &acc);
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
                    let sum = GradSum {
                        x: &x,
                        ld,
                        cols,
                        rows: rows.clone(),
                        v: &v,
                        coef: Coef::Scaled(2.0, &w),
                        r,
                        k,
                        layout,
                    };
                    accumulate(isa, sum, &mut got);
                    for (a, b) in got.iter().zip(&want) {
                        assert!((a - b).abs() < 1e-4 * (1.0 + b.abs()), "{isa}");
                    }
                }
            }
        }
    }
}
