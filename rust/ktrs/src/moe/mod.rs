//! One MoE layer's routed experts: weights, LoRA, forward, backward.
//!
//! Data flow of a call (details in docs/architecture.md):
//! forward:  route (counting sort) → gather x → LoRA-A of gate/up → gate+up GEMM with the
//!           LoRA-B and SiLU·up epilogue → LoRA-A of down → down GEMM (+LoRA-B) per pair
//!           → weighted sum per token.
//! backward: gather dy → dy·Wd (+LoRA), routing-weight gradient, SiLU backward → LoRA
//!           gradients → dgu·W_gu (+LoRA) per pair → sum per token.

mod backward;
mod cache;
mod driver;
mod forward;
mod lora_b;
mod packing;
pub mod routing;
mod schedule;
mod transposed;
mod transposed_cache;

pub use cache::ForwardCache;
pub(crate) use packing::PackTarget;
pub use packing::Proj;
pub use transposed_cache::CacheBudget;

/// Default of `KTRS_TRANSPOSED_CACHE_MB`: a quarter of physical memory (0 if unknown).
pub(crate) fn transposed_cache_default_mb() -> usize {
    transposed_cache::default_budget_mb()
}

use driver::{add_terms, gather_pairs, gemm_rows, sum_pairs_into};
use packing::{pack_expert, pack_panel, panel_source};
use schedule::{expert_blocks, expert_runs};
use transposed_cache::MatrixCache;

use crate::buffer::{catch_alloc, BufferPool, SendPtr};
use crate::cpu::Isa;
use crate::error::{check_len, checked_size, KtrsError, Result};
use crate::lora::{LoraConfig, LoraWeights};
use crate::pack::{self, fused_row, round_up, ExpertPack, PackShape, PAD};
use crate::pool::ThreadPool;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Sizes of one MoE layer's routed experts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MoeConfig {
    pub experts: usize,
    pub hidden: usize,
    pub intermediate: usize,
}

impl MoeConfig {
    pub(crate) fn h_pad(&self) -> usize {
        round_up(self.hidden, PAD)
    }
    pub(crate) fn i_pad(&self) -> usize {
        round_up(self.intermediate, PAD)
    }
    /// Row strides of the bf16 GEMM inputs: padded by 64 bytes so consecutive rows do not
    /// fall in the same L1 set (a 4 KiB stride made every A-tile load miss L1).
    pub(crate) fn x_ld(&self) -> usize {
        self.h_pad() + STRIDE_PAD
    }
    pub(crate) fn act_ld(&self) -> usize {
        self.i_pad() + STRIDE_PAD
    }
    pub(crate) fn dgu_ld(&self) -> usize {
        2 * self.i_pad() + STRIDE_PAD
    }

    /// Refuses sizes whose packed weights (and so every row stride and scratch size
    /// derived from them) would overflow `usize`: the kernels index with unchecked
    /// arithmetic, so a wrapped size would mean reads past a buffer.
    pub fn check_sizes(&self) -> Result<()> {
        for (name, v) in [
            ("experts", self.experts),
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
        ] {
            if v == 0 {
                return Err(KtrsError::invalid(name, "a positive size", v));
            }
        }
        let pad = |what: &str, v: usize| {
            v.checked_next_multiple_of(PAD)
                .and_then(|p| p.checked_add(STRIDE_PAD))
                .ok_or_else(|| KtrsError::invalid(what, "a size below 2^63", v))
        };
        let (h, i) = (
            pad("hidden", self.hidden)?,
            pad("intermediate", self.intermediate)?,
        );
        // 2·I rows of gate/up plus H rows of down per expert, bf16; padded strides bound
        // the packs' padded sizes from above.
        let gate_up = checked_size("the packed gate/up weights", &[self.experts, 2, i, h, 2])?;
        let down = checked_size("the packed down weights", &[self.experts, h, i, 2])?;
        gate_up
            .checked_add(down)
            .filter(|&b| b <= isize::MAX as usize)
            .map(|_| ())
            .ok_or(KtrsError::OutOfMemory {
                what: "the packed expert weights".into(),
                bytes: gate_up as u128 + down as u128,
            })
    }

    /// Checks that the scratch of a call with `pairs` (token, slot) pairs has a size that
    /// fits `usize` (the widest row is the fused gate/up gradient or an f32 hidden row).
    pub(crate) fn check_pairs(&self, pairs: usize) -> Result<()> {
        let rows = pairs.saturating_add(ROW_PAD);
        let widest = self.dgu_ld().max(2 * self.x_ld());
        checked_size("the scratch of this call", &[rows, widest, 4]).map(|_| ())
    }
}

/// Extra bf16 elements per row of a GEMM input buffer (see `MoeConfig::x_ld`).
pub(crate) const STRIDE_PAD: usize = 32;

/// Borrowed bf16 expert weights in HF layout: gate and up `[E, I, H]`, down `[E, H, I]`.
pub struct ExpertWeights<'a> {
    pub gate: &'a [u16],
    pub up: &'a [u16],
    pub down: &'a [u16],
}

/// Where a backward writes the LoRA gradients.
pub enum GradTarget<'a> {
    /// Skip LoRA gradients.
    Skip,
    /// Accumulate into the layer's own gradient buffers.
    Owned,
    /// Write (or, with `accumulate`, add) into caller slices, in [`LoraMatrix::ALL`] order.
    External {
        bufs: [&'a mut [f32]; 6],
        accumulate: bool,
    },
}

/// Most panels per GEMM task (see [`MoeLayer::task_panels`]).
const NB_MAX: usize = 16;
/// Most rows per GEMM call inside a task; the call's rows are the `KTRS_MC` knob
/// (default 96: a multiple of the AVX-512 block height, 6, and of the AMX one, 32).
const MC_MAX: usize = 384;

fn gemm_call_rows() -> usize {
    crate::tuning::get(crate::tuning::Knob::GemmRows).clamp(16, MC_MAX)
}
/// Extra zero rows after every GEMM input buffer, so AMX may read a whole 32-row block
/// past an expert's last row (those results are dropped).
pub(crate) const ROW_PAD: usize = 32;

/// Experts with fewer rows than this use AVX-512 even when AMX is selected: tile loads
/// and stores cost more than they save on a handful of rows (measured default 8).
fn amx_min_rows() -> usize {
    crate::tuning::get(crate::tuning::Knob::AmxMinRows)
}
/// Rows per expert from which AMX GEMM tasks stop at 8 panels (see `task_panels`).
const WIDE_TASK_ROWS: usize = 16;

static NEXT_LAYER_ID: AtomicU64 = AtomicU64::new(1);
static NEXT_LORA_GENERATION: AtomicU64 = AtomicU64::new(1);

pub struct MoeLayer {
    pub config: MoeConfig,
    isa: Isa,
    pool: Arc<ThreadPool>,
    /// Fused gate+up, `[2·I_pad, H]` per expert with interleaved panels.
    gate_up: ExpertPack,
    /// Down, `[H, I]` per expert.
    down: ExpertPack,
    /// Transposed blocks of `gate_up` and `down` kept across backward calls (filled by
    /// the backward, within the budget; see `transposed_cache.rs`).
    t_gate_up: MatrixCache,
    t_down: MatrixCache,
    lora: Option<LoraWeights>,
    /// Scratch and cache blocks recycled between calls (see `BufferPool`).
    scratch: Arc<BufferPool>,
    id: u64,
    /// See [`MoeLayer::lora_generation`]; every forward cache records it.
    lora_generation: u64,
}

impl MoeLayer {
    /// A layer with all-zero expert weights; fill it with [`MoeLayer::set_expert`].
    pub fn new_empty(
        config: MoeConfig,
        lora: Option<LoraConfig>,
        isa: Isa,
        threads: usize,
        seed: u64,
    ) -> Result<MoeLayer> {
        isa.check_available()?;
        config.check_sizes()?;
        let pool = ThreadPool::shared(threads)?;
        let (h, i) = (config.hidden, config.intermediate);
        // `check_sizes` bounds these products; the packs unwind on a refused allocation.
        let gate_up = catch_alloc("the packed gate/up weights", || {
            ExpertPack::zeroed(config.experts, PackShape::new(2 * config.i_pad(), h))
        })?;
        let down = catch_alloc("the packed down weights", || {
            ExpertPack::zeroed(config.experts, PackShape::new(h, i))
        })?;
        let lora = lora
            .map(|c| LoraWeights::new(c, config.experts, h, i, seed))
            .transpose()?;
        let budget = CacheBudget::global();
        Ok(MoeLayer {
            config,
            isa,
            pool,
            t_gate_up: MatrixCache::new(&gate_up, budget.clone()),
            t_down: MatrixCache::new(&down, budget),
            gate_up,
            down,
            lora,
            scratch: BufferPool::global(),
            id: NEXT_LAYER_ID.fetch_add(1, Ordering::Relaxed),
            lora_generation: NEXT_LORA_GENERATION.fetch_add(1, Ordering::Relaxed),
        })
    }

    /// A layer packed from all experts' weights at once (in parallel).
    pub fn new(
        config: MoeConfig,
        w: ExpertWeights<'_>,
        lora: Option<LoraConfig>,
        isa: Isa,
        threads: usize,
        seed: u64,
    ) -> Result<MoeLayer> {
        let mut layer = MoeLayer::new_empty(config, lora, isa, threads, seed)?;
        let (e, h, i) = (config.experts, config.hidden, config.intermediate);
        // check_sizes (in new_empty) bounds e·i·h, so these products do not wrap.
        check_len("gate", w.gate.len(), e * i * h)?;
        check_len("up", w.up.len(), e * i * h)?;
        check_len("down", w.down.len(), e * h * i)?;
        let (gu_shape, d_shape) = (layer.gate_up.shape, layer.down.shape);
        let gu = SendPtr(layer.gate_up.expert_mut(0).as_mut_ptr());
        let dn = SendPtr(layer.down.expert_mut(0).as_mut_ptr());
        layer.pool.run(e, |x, _| {
            // SAFETY: task x writes only expert x's region of each pack.
            let (g, d) = unsafe {
                (
                    gu.slice_mut(x * gu_shape.len(), gu_shape.len()),
                    dn.slice_mut(x * d_shape.len(), d_shape.len()),
                )
            };
            let src = ExpertWeights {
                gate: &w.gate[x * i * h..(x + 1) * i * h],
                up: &w.up[x * i * h..(x + 1) * i * h],
                down: &w.down[x * h * i..(x + 1) * h * i],
            };
            pack_expert(gu_shape, d_shape, h, i, &src, g, d);
        });
        Ok(layer)
    }

    /// Packs one expert's weights (gate, up `[I, H]`, down `[H, I]`, bf16 bits).
    pub fn set_expert(&mut self, e: usize, gate: &[u16], up: &[u16], down: &[u16]) -> Result<()> {
        self.gate_up.check_expert(e)?;
        let (h, i) = (self.config.hidden, self.config.intermediate);
        check_len("gate", gate.len(), i * h)?;
        check_len("up", up.len(), i * h)?;
        check_len("down", down.len(), h * i)?;
        // Its transposed blocks are stale from here on.
        self.t_gate_up.clear_expert(e);
        self.t_down.clear_expert(e);
        let (gs, ds) = (self.gate_up.shape, self.down.shape);
        let gp = SendPtr(self.gate_up.expert_mut(e).as_mut_ptr());
        let dp = SendPtr(self.down.expert_mut(e).as_mut_ptr());
        let src = ExpertWeights { gate, up, down };
        // One task per 16-row panel: packing must not be single-threaded.
        self.pool.run(gs.panels() + ds.panels(), |t, _| {
            let (base, p) = if t < gs.panels() {
                (gp, t)
            } else {
                (dp, t - gs.panels())
            };
            let len = if t < gs.panels() {
                gs.panel_len()
            } else {
                ds.panel_len()
            };
            // SAFETY: task t owns panel t of expert e's pack alone (&mut self holds it).
            let panel = unsafe { base.slice_mut(p * len, len) };
            pack_panel(gs, ds, h, i, src.of(panel_source(gs, t).0), 0, t, panel);
        });
        Ok(())
    }

    /// Expert e's weights unpacked to HF layout (gate, up `[I, H]`, down `[H, I]`).
    pub fn get_expert(&self, e: usize) -> Result<(Vec<u16>, Vec<u16>, Vec<u16>)> {
        self.gate_up.check_expert(e)?;
        let (h, i) = (self.config.hidden, self.config.intermediate);
        let gs = self.gate_up.shape;
        let gu = self.gate_up.expert(e);
        let mut gate = vec![0u16; i * h];
        let mut up = vec![0u16; i * h];
        for r in 0..i {
            for c in 0..h {
                gate[r * h + c] = gu[gs.index(fused_row(r, false), c)];
                up[r * h + c] = gu[gs.index(fused_row(r, true), c)];
            }
        }
        let down = pack::unpack(self.down.expert(e), self.down.shape);
        Ok((gate, up, down))
    }

    pub fn isa(&self) -> Isa {
        self.isa
    }

    /// Switches the kernels used from now on; packed weights are shared by every ISA, and
    /// so are the cached transposed blocks (`kernels::transpose_block` writes the same
    /// bytes on every ISA), so the cache stays.
    pub fn set_isa(&mut self, isa: Isa) -> Result<()> {
        isa.check_available()?;
        self.isa = isa;
        Ok(())
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Switches to a pool of `threads` threads (1 to [`crate::pool::MAX_THREADS`]); on
    /// error the layer keeps its pool.
    pub fn set_threads(&mut self, threads: usize) -> Result<()> {
        self.pool = ThreadPool::shared(threads)?;
        Ok(())
    }

    pub fn lora(&self) -> Option<&LoraWeights> {
        self.lora.as_ref()
    }

    /// Gives the layer fresh LoRA (PEFT init) or none; tensors viewing the old buffers
    /// keep them alive but no longer reach the kernels.
    /// Forward caches made before this call are refused by `backward` from then on (their
    /// LoRA projections have the old rank and values).
    pub fn set_lora(&mut self, lora: Option<LoraConfig>, seed: u64) -> Result<()> {
        let c = self.config;
        self.lora = lora
            .map(|l| LoraWeights::new(l, c.experts, c.hidden, c.intermediate, seed))
            .transpose()?;
        self.lora_generation = NEXT_LORA_GENERATION.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Identifies the LoRA setup (which buffers, which rank): changes with every
    /// `set_lora`, never repeats within a process.
    pub fn lora_generation(&self) -> u64 {
        self.lora_generation
    }

    /// The packed weights of one projection (`gate_up`: the fused, panel-interleaved
    /// gate and up matrices; `down`), for readers outside the kernels: the GPU prefill
    /// copies them to the device as they are (`python/ktrs/gpu_prefill.py`).
    pub fn packed_weights(&self, down: bool) -> &ExpertPack {
        if down {
            &self.down
        } else {
            &self.gate_up
        }
    }

    /// Bytes of packed expert weights held.
    pub fn weight_bytes(&self) -> usize {
        self.gate_up.bytes() + self.down.bytes()
    }

    /// Bytes of transposed expert weights this layer keeps for its backward (see
    /// `KTRS_TRANSPOSED_CACHE_MB`); at most `weight_bytes`.
    pub fn transposed_cache_bytes(&self) -> usize {
        self.t_gate_up.bytes() + self.t_down.bytes()
    }

    /// Frees the transposed weights kept for the backward (the next backward refills
    /// them as the budget allows).
    pub fn clear_transposed_cache(&mut self) {
        self.t_gate_up.clear();
        self.t_down.clear();
    }

    /// Counts this layer's transposed cache against `budget` instead of the process-wide
    /// one (tests); the cache is emptied first.
    #[cfg(test)]
    pub(crate) fn set_cache_budget(&mut self, budget: Arc<CacheBudget>) {
        self.clear_transposed_cache();
        self.t_gate_up = MatrixCache::new(&self.gate_up, budget.clone());
        self.t_down = MatrixCache::new(&self.down, budget);
    }

    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    /// Expert e's packed gate/up and down, padding included (tests compare packers).
    #[cfg(test)]
    pub(crate) fn packed(&self, e: usize) -> (&[u16], &[u16]) {
        (self.gate_up.expert(e), self.down.expert(e))
    }
}

#[cfg(test)]
mod tests;
