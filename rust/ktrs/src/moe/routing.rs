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
    /// Pair index of token t's slot s, at `t * k + s`.
    pub pos: Vec<u32>,
}

impl Routing {
    /// Validates `ids` ([T, k], each in `0..experts`) and `weights` ([T, k], finite).
    pub fn new(
        ids: &[i64],
        weights: &[f32],
        tokens: usize,
        k: usize,
        experts: usize,
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
            if e < 0 || e as usize >= experts {
                return Err(KtrsError::invalid(
                    "topk_ids",
                    format!("expert ids in [0, {experts})"),
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
        let n = tokens * k;
        let mut pair_token = vec![0u32; n];
        let mut pair_weight = vec![0f32; n];
        let mut pos = vec![0u32; n];
        for (i, &e) in ids.iter().enumerate() {
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

    pub fn pairs(&self) -> usize {
        self.tokens * self.k
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
        let r = Routing::new(&ids, &w, 3, 2, 4).unwrap();
        assert_eq!(r.offsets, vec![0, 3, 4, 6, 6]);
        for (i, &e) in ids.iter().enumerate() {
            let p = r.pos[i] as usize;
            assert_eq!(r.expert_of(p), e as usize);
            assert_eq!(r.pair_token[p] as usize, i / 2);
            assert_eq!(r.pair_weight[p], w[i]);
        }
        assert_eq!(r.active_experts(), vec![0, 1, 2]);
        assert!(Routing::new(&[4, 0], &[1.0, 1.0], 1, 2, 4).is_err());
        assert!(Routing::new(&[-1, 0], &[1.0, 1.0], 1, 2, 4).is_err());
        assert!(Routing::new(&[1, 0], &[f32::NAN, 1.0], 1, 2, 4).is_err());
        assert!(Routing::new(&[1, 0], &[1.0], 1, 2, 4).is_err());
    }
}
