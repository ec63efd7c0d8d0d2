//! Expert LoRA, owned by Rust: for gate, up and down, `A [E, r, in]` and `B [E, out, r]`
//! master weights in f32 plus f32 gradient buffers of the same shapes.
//!
//! Every matrix is an `Arc<Buffer<f32>>`: Python gets zero-copy tensor views whose
//! storage is that buffer (the view holds an `Arc` clone, so it outlives the layer
//! safely). The kernels read only these buffers, so nothing Python does to a tensor
//! object (`.to()`, `.half()`, rebinding `.data`) can make a kernel read freed memory.

use crate::buffer::Buffer;
use crate::error::{checked_size, KtrsError, Result};
use std::sync::Arc;

/// Rank and scaling of the expert adapters.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoraConfig {
    pub rank: usize,
    pub alpha: f32,
    /// rsLoRA: scale by `alpha / sqrt(r)` instead of `alpha / r`.
    pub use_rslora: bool,
}

impl LoraConfig {
    pub fn scaling(&self) -> f32 {
        if self.use_rslora {
            self.alpha / (self.rank as f32).sqrt()
        } else {
            self.alpha / self.rank as f32
        }
    }
}

/// The six LoRA matrices of a layer, in a fixed order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LoraMatrix {
    GateA,
    GateB,
    UpA,
    UpB,
    DownA,
    DownB,
}

impl LoraMatrix {
    pub const ALL: [LoraMatrix; 6] = [
        LoraMatrix::GateA,
        LoraMatrix::GateB,
        LoraMatrix::UpA,
        LoraMatrix::UpB,
        LoraMatrix::DownA,
        LoraMatrix::DownB,
    ];

    pub fn name(self) -> &'static str {
        match self {
            LoraMatrix::GateA => "gate_A",
            LoraMatrix::GateB => "gate_B",
            LoraMatrix::UpA => "up_A",
            LoraMatrix::UpB => "up_B",
            LoraMatrix::DownA => "down_A",
            LoraMatrix::DownB => "down_B",
        }
    }

    pub fn index(self) -> usize {
        self as usize
    }

    pub fn is_a(self) -> bool {
        matches!(
            self,
            LoraMatrix::GateA | LoraMatrix::UpA | LoraMatrix::DownA
        )
    }

    pub fn from_name(name: &str) -> Result<LoraMatrix> {
        LoraMatrix::ALL
            .iter()
            .copied()
            .find(|m| m.name() == name)
            .ok_or_else(|| {
                KtrsError::invalid(
                    "name",
                    "one of gate_A, gate_B, up_A, up_B, down_A, down_B",
                    format!("{name:?}"),
                )
            })
    }
}

pub struct LoraWeights {
    pub config: LoraConfig,
    pub experts: usize,
    pub hidden: usize,
    pub intermediate: usize,
    weights: [Arc<Buffer<f32>>; 6],
    grads: [Arc<Buffer<f32>>; 6],
}

impl LoraWeights {
    /// PEFT's default init: A Kaiming-uniform (bound `1/sqrt(in)`), B zero.
    pub fn new(
        config: LoraConfig,
        experts: usize,
        hidden: usize,
        intermediate: usize,
        seed: u64,
    ) -> Result<LoraWeights> {
        if config.rank == 0 {
            return Err(KtrsError::invalid("lora_rank", "a rank of at least 1", 0));
        }
        if !config.alpha.is_finite() {
            return Err(KtrsError::invalid(
                "lora_alpha",
                "a finite number",
                config.alpha,
            ));
        }
        let mk = |m: LoraMatrix, kind: &str| -> Result<Arc<Buffer<f32>>> {
            let (rows, cols) = Self::dims(m, config.rank, hidden, intermediate);
            let what = format!("expert LoRA {kind} {} (rank {})", m.name(), config.rank);
            let len = checked_size(&what, &[experts, rows, cols, 4])? / 4;
            Ok(Arc::new(Buffer::try_zeroed(&what, len)?))
        };
        let weights = try_map(|m| mk(m, "weight"))?;
        let grads = try_map(|m| mk(m, "gradient"))?;
        let mut rng = SplitMix64(seed ^ 0x6b74_7273_6c6f_7261);
        for m in [LoraMatrix::GateA, LoraMatrix::UpA, LoraMatrix::DownA] {
            let (_, fan_in) = Self::dims(m, config.rank, hidden, intermediate);
            let bound = 1.0 / (fan_in as f64).sqrt();
            // SAFETY: the buffer was just created; nobody else sees it yet.
            let w = unsafe { weights[m.index()].as_mut_slice_unchecked() };
            for v in w.iter_mut() {
                *v = ((rng.next_f64() * 2.0 - 1.0) * bound) as f32;
            }
        }
        Ok(LoraWeights {
            config,
            experts,
            hidden,
            intermediate,
            weights,
            grads,
        })
    }

    /// (rows, cols) of one expert's matrix.
    pub fn dims(m: LoraMatrix, r: usize, hidden: usize, intermediate: usize) -> (usize, usize) {
        match m {
            LoraMatrix::GateA | LoraMatrix::UpA => (r, hidden),
            LoraMatrix::GateB | LoraMatrix::UpB => (intermediate, r),
            LoraMatrix::DownA => (r, intermediate),
            LoraMatrix::DownB => (hidden, r),
        }
    }

    /// Full shape `[E, rows, cols]`.
    pub fn shape(&self, m: LoraMatrix) -> [usize; 3] {
        let (r, c) = Self::dims(m, self.config.rank, self.hidden, self.intermediate);
        [self.experts, r, c]
    }

    pub fn weight(&self, m: LoraMatrix) -> &Arc<Buffer<f32>> {
        &self.weights[m.index()]
    }

    pub fn grad(&self, m: LoraMatrix) -> &Arc<Buffer<f32>> {
        &self.grads[m.index()]
    }

    /// Expert `e`'s slice of matrix `m`.
    pub(crate) fn expert_weight(&self, m: LoraMatrix, e: usize) -> &[f32] {
        let [_, r, c] = self.shape(m);
        &self.weights[m.index()].as_slice()[e * r * c..(e + 1) * r * c]
    }

    /// Copies `src` (f32, `[E, rows, cols]` row-major) into matrix `m`.
    pub fn set(&self, m: LoraMatrix, src: &[f32]) -> Result<()> {
        let want = self.weights[m.index()].len();
        if src.len() != want {
            let s = self.shape(m);
            return Err(KtrsError::invalid(
                m.name(),
                format!("{} values (shape {:?})", want, s),
                src.len(),
            ));
        }
        if src.iter().any(|v| !v.is_finite()) {
            return Err(KtrsError::NonFinite {
                what: format!("LoRA matrix {}", m.name()),
            });
        }
        // SAFETY: callers serialise writes with kernel calls (GIL held by the binding).
        unsafe { self.weights[m.index()].as_mut_slice_unchecked() }.copy_from_slice(src);
        Ok(())
    }

    /// Sets every gradient buffer to zero.
    pub fn zero_grads(&self) {
        for g in &self.grads {
            // SAFETY: as in `set`.
            unsafe { g.as_mut_slice_unchecked() }.fill(0.0);
        }
    }

    /// Bytes of weights plus gradients.
    pub fn bytes(&self) -> usize {
        self.weights
            .iter()
            .chain(self.grads.iter())
            .map(|b| b.len() * 4)
            .sum()
    }
}

/// `LoraMatrix::ALL.map(f)`, stopping at the first error.
fn try_map<T>(mut f: impl FnMut(LoraMatrix) -> Result<T>) -> Result<[T; 6]> {
    let mut v = Vec::with_capacity(6);
    for m in LoraMatrix::ALL {
        v.push(f(m)?);
    }
    Ok(v.try_into()
        .unwrap_or_else(|_| unreachable!("six matrices")))
}

/// Small deterministic generator for reproducible initialisation.
pub(crate) struct SplitMix64(pub u64);

impl SplitMix64 {
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn next_f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_matches_peft_convention() {
        let cfg = LoraConfig {
            rank: 4,
            alpha: 8.0,
            use_rslora: false,
        };
        let l = LoraWeights::new(cfg, 3, 64, 40, 7).unwrap();
        assert_eq!(l.shape(LoraMatrix::GateA), [3, 4, 64]);
        assert_eq!(l.shape(LoraMatrix::DownB), [3, 64, 4]);
        let a = l.weight(LoraMatrix::GateA).as_slice();
        assert!(a.iter().all(|v| v.abs() <= 1.0 / 8.0) && a.iter().any(|&v| v != 0.0));
        assert!(l
            .weight(LoraMatrix::UpB)
            .as_slice()
            .iter()
            .all(|&v| v == 0.0));
        assert_eq!(cfg.scaling(), 2.0);
        assert_eq!(
            LoraConfig {
                use_rslora: true,
                ..cfg
            }
            .scaling(),
            4.0
        );
        assert!(l.set(LoraMatrix::GateB, &[0.0; 3]).is_err());
        assert!(LoraWeights::new(LoraConfig { rank: 0, ..cfg }, 1, 8, 8, 0).is_err());
    }

    #[test]
    fn absurd_ranks_are_memory_errors() {
        let cfg = LoraConfig {
            rank: 1 << 62,
            alpha: 1.0,
            use_rslora: false,
        };
        for rank in [1 << 62, 1_000_000_000] {
            let e = LoraWeights::new(LoraConfig { rank, ..cfg }, 64, 2048, 1408, 0)
                .err()
                .expect("refused");
            assert!(
                matches!(e, KtrsError::OutOfMemory { .. }) && e.to_string().contains("gate_A"),
                "{e}"
            );
        }
    }
}
