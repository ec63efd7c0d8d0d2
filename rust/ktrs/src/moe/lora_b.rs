//! The LoRA-B matrices of the active experts, transposed per call so that `z·Bᵀ` (forward
//! epilogues) and `dy·B` (backward) are contiguous vector work.

use super::MoeLayer;
use crate::buffer::SendPtr;
use crate::kernels::lora_grad::Cols;
use crate::lora::LoraMatrix;
use crate::pack::fused_row;

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
        for j in 0..r {
            let row = &mut dst[j * ld..(j + 1) * ld];
            row.fill(0.0);
            for o in 0..out {
                let at = match cols {
                    Cols::Plain => o,
                    Cols::Fused(up) => fused_row(o, up),
                };
                row[at] = src[o * r + j];
            }
        }
    }

    /// Matrix `q`'s transposed blocks (after the phase that ran `fill`).
    pub(super) fn get(&self, q: usize) -> &[f32] {
        self.bufs[q].as_slice()
    }
}
