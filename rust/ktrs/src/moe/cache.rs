//! What a forward saves for its backward, owned by one handle.
//!
//! Every forward that saves gets its own cache object: gradient accumulation, activation
//! checkpoint recompute and several models in one process each hold their own handle,
//! so one forward can never overwrite what another's backward reads. A cache remembers
//! the layer that made it and is refused by any other.

use super::routing::Routing;
use crate::buffer::Buffer;

pub struct ForwardCache {
    pub(crate) layer_id: u64,
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
            "ForwardCache(tokens={}, k={}, bytes={})",
            self.tokens(),
            self.top_k(),
            self.bytes()
        )
    }
}
