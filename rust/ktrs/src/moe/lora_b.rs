//! The LoRA-B matrices, transposed so that `z·Bᵀ` (forward epilogues, per GEMM task:
//! `with_task_bt`) and `dy·B` (backward, per call for the active experts: `LoraBPlan`) are
//! contiguous vector work.

use super::MoeLayer;
use crate::buffer::SendPtr;
use crate::kernels::lora_grad::Cols;
use crate::lora::LoraMatrix;
use std::cell::RefCell;
use std::ops::Range;

thread_local! {
    /// This thread's `Bᵀ` blocks for one forward GEMM task (only `with_task_bt` touches it).
    static TASK_BT: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

impl MoeLayer {
    pub(super) fn lora_expert(&self, m: LoraMatrix, e: usize) -> &[f32] {
        self.lora
            .as_ref()
            .expect("lora present")
            .expert_weight(m, e)
    }

    /// Buffers for `Bᵀ` of the LoRA-B matrices in `specs` (matrix, row stride, column
    /// map) for the active `experts`; they are filled by `fill` tasks, which callers run
    /// in the parallel region of a phase that does not read them (one barrier less).
    pub(super) fn lora_b_plan<'a>(
        &self,
        specs: &[(LoraMatrix, usize, Cols)],
        experts: &'a [usize],
    ) -> LoraBPlan<'a> {
        let bufs = specs
            .iter()
            .map(|&(m, ld, _)| {
                let [e_all, _, r] = self.lora.as_ref().expect("lora present").shape(m);
                self.scratch.take::<f32>(e_all * r * ld)
            })
            .collect();
        LoraBPlan {
            specs: specs.to_vec(),
            experts,
            bufs,
        }
    }

    /// Runs `f` on `Bᵀ` of expert e's LoRA-B matrices `ms` for the outputs
    /// `o0 .. o0 + cols`: per matrix `[r, cols]` (zeros past the matrix's outputs), one
    /// after another, in this thread's buffer. A forward GEMM task transposes just the
    /// columns it computes, so they are in L1 for its epilogues: a per-call transposed
    /// copy of all active experts' B (`LoraBPlan`) cost a write and a re-read of cold
    /// scratch and 24 extra tasks per decode call.
    pub(super) fn with_task_bt<R>(
        &self,
        ms: &[LoraMatrix],
        e: usize,
        o0: usize,
        cols: usize,
        f: impl FnOnce(&[f32]) -> R,
    ) -> R {
        let Some(l) = self.lora.as_ref().filter(|_| !ms.is_empty()) else {
            return f(&[]);
        };
        let r = l.config.rank;
        TASK_BT.with(|cell| {
            let mut buf = cell.borrow_mut();
            let len = ms.len() * r * cols;
            if buf.len() < len {
                buf.resize(len, 0.0);
            }
            for (dst, &m) in buf.chunks_exact_mut(r * cols).zip(ms) {
                let [_, out, _] = l.shape(m);
                let rows = o0.min(out)..(o0 + cols).min(out);
                transpose_b(l.expert_weight(m, e), r, rows, |o| o - o0, dst, cols);
            }
            f(&buf[..len])
        })
    }
}

/// Writes `Bᵀ` of rows `rows` of `src = B [out, r]` into `dst` (r rows of stride `ld`):
/// row o at column `at(o)`, every other column of those rows zero.
fn transpose_b(
    src: &[f32],
    r: usize,
    rows: Range<usize>,
    at: impl Fn(usize) -> usize,
    dst: &mut [f32],
    ld: usize,
) {
    let dst = &mut dst[..r * ld];
    dst.fill(0.0);
    for o in rows {
        let (c, b) = (at(o), &src[o * r..(o + 1) * r]);
        for (j, &v) in b.iter().enumerate() {
            dst[j * ld + c] = v;
        }
    }
}

/// `Bᵀ` of some LoRA-B matrices, as `[E, r, ld]` per matrix: output o of `B [E, out, r]`
/// at column `cols(o)` and zeros elsewhere, so `z·Bᵀ` and `dy·B` become contiguous
/// vector work. Only the active experts' blocks are written.
pub(super) struct LoraBPlan<'a> {
    specs: Vec<(LoraMatrix, usize, Cols)>,
    experts: &'a [usize],
    bufs: Vec<crate::buffer::Buffer<f32>>,
}

impl LoraBPlan<'_> {
    pub(super) fn tasks(&self) -> usize {
        self.specs.len() * self.experts.len()
    }

    /// Writes block `t` (`t < tasks()`): one matrix of one expert.
    pub(super) fn fill(&self, layer: &MoeLayer, t: usize) {
        let (q, e) = (t / self.experts.len(), self.experts[t % self.experts.len()]);
        let (m, ld, cols) = self.specs[q];
        let l = layer.lora.as_ref().expect("lora present");
        let [_, out, r] = l.shape(m);
        let src = l.expert_weight(m, e);
        // SAFETY: block (q, e) is written by task t alone; experts are distinct.
        let dst = unsafe { SendPtr(self.bufs[q].as_ptr()).slice_mut(e * r * ld, r * ld) };
        transpose_b(src, r, 0..out, |o| cols.at(o), dst, ld);
    }

    /// Matrix `q`'s transposed blocks (after the phase that ran `fill`).
    pub(super) fn get(&self, q: usize) -> &[f32] {
        self.bufs[q].as_slice()
    }
}
