//! What a forward saves for its backward, owned by one handle.
//!
//! Every forward that saves gets its own cache object: gradient accumulation, activation
//! checkpoint recompute and several models in one process each hold their own handle,
//! so one forward can never overwrite what another's backward reads. A cache remembers
//! the layer that made it and that layer's LoRA generation: another layer refuses it, and
//! so does its own layer once `set_lora` has replaced the LoRA it was made with (its LoRA
//! projections have the old rank: a larger new rank would read past them, a smaller one
//! would give gradients of nothing).

use super::routing::Routing;
use crate::buffer::Buffer;

pub struct ForwardCache {
    pub(crate) layer_id: u64,
    /// `MoeLayer::lora_generation` at the forward.
    pub(crate) lora_generation: u64,
    /// LoRA rank the forward applied: 0 when it ran without LoRA (none, or switched off
    /// for that call), then backward gives no LoRA gradients either.
    pub(crate) lora_rank: usize,
    pub(crate) routing: Routing,
    /// Gathered inputs, `[pairs, H_pad]` bf16.
    pub(crate) x: Buffer<u16>,
    /// Gate and up pre-activations and SiLU(gate)·up, `[pairs, I_pad]` bf16.
    pub(crate) g: Buffer<u16>,
    pub(crate) u: Buffer<u16>,
    pub(crate) act: Buffer<u16>,
    /// LoRA-A projections `x·Aᵀ` of gate, up and `act·Aᵀ` of down, `[pairs, r]` f32
    /// (empty without LoRA).
    pub(crate) zg: Vec<f32>,
    pub(crate) zu: Vec<f32>,
    pub(crate) zd: Vec<f32>,
}

impl ForwardCache {
    pub fn tokens(&self) -> usize {
        self.routing.tokens
    }

    pub fn top_k(&self) -> usize {
        self.routing.k
    }

    /// LoRA rank applied by the forward (0: none).
    pub fn lora_rank(&self) -> usize {
        self.lora_rank
    }

    pub fn lora_generation(&self) -> u64 {
        self.lora_generation
    }

    /// Bytes held by this cache.
    pub fn bytes(&self) -> usize {
        (self.x.len() + self.g.len() + self.u.len() + self.act.len()) * 2
            + (self.zg.len() + self.zu.len() + self.zd.len()) * 4
            + self.routing.pairs() * 12
    }
}

impl std::fmt::Debug for ForwardCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "ForwardCache(tokens={}, k={}, lora_rank={}, bytes={})",
            self.tokens(),
            self.top_k(),
            self.lora_rank,
            self.bytes()
        )
    }
}
