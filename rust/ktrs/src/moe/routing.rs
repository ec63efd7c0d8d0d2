//! Grouping (token, slot) pairs by expert with a counting sort.
//!
//! Pair `p` (0 ≤ p < T·k) is the p-th entry of the expert-sorted order; everything the
//! kernels touch per expert is a contiguous run of pairs `offsets[e] .. offsets[e+1]`.

use crate::error::{KtrsError, Result};

pub struct Routing {
    pub tokens: usize,
    pub k: usize,
    pub experts: usize,
    /// `offsets[e] .. offsets[e + 1]` are expert e's pairs.
    pub offsets: Vec<usize>,
    /// Token of each pair.
    pub pair_token: Vec<u32>,
    /// Routing weight of each pair.
    pub pair_weight: Vec<f32>,
    /// Pair index of token t's slot s, at `t * k + s` ([`NO_PAIR`] for a skipped slot).
    pub pos: Vec<u32>,
}

/// `pos` of a slot whose id was -1 (no expert: the slot adds nothing).
pub const NO_PAIR: u32 = u32::MAX;

impl Routing {
    /// Validates `ids` ([T, k], each in `0..experts`, or -1 for "no expert" where
    /// `skips_ok`) and `weights` ([T, k], finite). Skipped slots get no pair: a caller
    /// that runs part of a call's experts elsewhere (the GPU prefill) passes -1 for them;
    /// they add nothing to the output and get zero gradients.
    pub fn new(
        ids: &[i64],
        weights: &[f32],
        tokens: usize,
        k: usize,
        experts: usize,
        skips_ok: bool,
    ) -> Result<Routing> {
        if ids.len() != tokens * k {
            return Err(KtrsError::invalid(
                "topk_ids",
                format!("{tokens}x{k} values"),
                ids.len(),
            ));
        }
        if weights.len() != tokens * k {
            return Err(KtrsError::invalid(
                "topk_weights",
                format!("{tokens}x{k} values (same shape as topk_ids)"),
                weights.len(),
            ));
        }
        if tokens * k > u32::MAX as usize {
            return Err(KtrsError::invalid(
                "topk_ids",
                "fewer than 2^32 (token, slot) pairs",
                tokens * k,
            ));
        }
        let mut counts = vec![0usize; experts + 1];
        for (i, &e) in ids.iter().enumerate() {
            if e == -1 && skips_ok {
                continue;
            }
            if e < 0 || e as usize >= experts {
                let allowed = if skips_ok {
                    format!("expert ids in [0, {experts}) or -1 (no expert)")
                } else {
                    format!("expert ids in [0, {experts})")
                };
                return Err(KtrsError::invalid(
                    "topk_ids",
                    allowed,
                    format!("{e} at token {}, slot {}", i / k, i % k),
                ));
            }
            counts[e as usize + 1] += 1;
        }
        if let Some(i) = weights.iter().position(|w| !w.is_finite()) {
            return Err(KtrsError::NonFinite {
                what: format!("topk_weights at token {}, slot {}", i / k, i % k),
            });
        }
        for e in 0..experts {
            counts[e + 1] += counts[e];
        }
        let offsets = counts.clone();
        let mut fill = counts;
        let n = offsets[experts];
        let mut pair_token = vec![0u32; n];
        let mut pair_weight = vec![0f32; n];
        let mut pos = vec![NO_PAIR; tokens * k];
        for (i, &e) in ids.iter().enumerate() {
            if e < 0 {
                continue;
            }
            let p = fill[e as usize];
            fill[e as usize] += 1;
            pair_token[p] = (i / k) as u32;
            pair_weight[p] = weights[i];
            pos[i] = p as u32;
        }
        Ok(Routing {
            tokens,
            k,
            experts,
            offsets,
            pair_token,
            pair_weight,
            pos,
        })
    }

    /// (token, slot) pairs with an expert: `tokens · k` less the skipped slots.
    pub fn pairs(&self) -> usize {
        self.offsets[self.experts]
    }

    pub fn count(&self, e: usize) -> usize {
        self.offsets[e + 1] - self.offsets[e]
    }

    /// Expert of pair p (binary search in offsets).
    pub fn expert_of(&self, p: usize) -> usize {
        self.offsets.partition_point(|&o| o <= p) - 1
    }

    /// Experts that received at least one token.
    pub fn active_experts(&self) -> Vec<usize> {
        (0..self.experts).filter(|&e| self.count(e) > 0).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sorts_and_validates() {
        let ids = [2i64, 0, 2, 1, 0, 0];
        let w = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6];
        let r = Routing::new(&ids, &w, 3, 2, 4, false).unwrap();
        assert_eq!(r.offsets, vec![0, 3, 4, 6, 6]);
        for (i, &e) in ids.iter().enumerate() {
            let p = r.pos[i] as usize;
            assert_eq!(r.expert_of(p), e as usize);
            assert_eq!(r.pair_token[p] as usize, i / 2);
            assert_eq!(r.pair_weight[p], w[i]);
        }
        assert_eq!(r.active_experts(), vec![0, 1, 2]);
        assert!(Routing::new(&[4, 0], &[1.0, 1.0], 1, 2, 4, false).is_err());
        assert!(Routing::new(&[-1, 0], &[1.0, 1.0], 1, 2, 4, false).is_err());
        assert!(Routing::new(&[-2, 0], &[1.0, 1.0], 1, 2, 4, true).is_err());
        assert!(Routing::new(&[1, 0], &[f32::NAN, 1.0], 1, 2, 4, false).is_err());
        assert!(Routing::new(&[1, 0], &[1.0], 1, 2, 4, false).is_err());
    }

    #[test]
    fn skipped_slots_get_no_pair() {
        let ids = [2i64, -1, -1, 1, 0, 2];
        let w = [0.1f32, 0.2, 0.3, 0.4, 0.5, 0.6];
        let r = Routing::new(&ids, &w, 3, 2, 4, true).unwrap();
        assert_eq!(r.offsets, vec![0, 1, 2, 4, 4]);
        assert_eq!(r.pairs(), 4);
        assert_eq!((r.pos[1], r.pos[2]), (NO_PAIR, NO_PAIR));
        for i in [0usize, 3, 4, 5] {
            let p = r.pos[i] as usize;
            assert_eq!(r.expert_of(p), ids[i] as usize);
            assert_eq!(r.pair_weight[p], w[i]);
        }
    }
}
