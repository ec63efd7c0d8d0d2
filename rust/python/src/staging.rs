//! The staging memory layout shared by `HostStage` (decode: forward only) and
//! `TrainStage` (training: forward, backward, checkpoint recompute): byte offsets of the
//! tensors inside one pinned (or plain) block.

/// Where a training call's backward tensors go.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Grads {
    /// Forward only (decode).
    None,
    /// `gout` = `out`, `gx` = `x` (the cache holds its own copy of the inputs): half the
    /// memory; the backward's copies come after the forward's on the stream.
    Shared,
    /// Own regions: the forward's inputs and output stay for a checkpoint recompute that
    /// may come after the backward.
    Separate,
}

/// Offsets of the backward's tensors: `gout -> gx, gw`.
#[derive(Clone, Copy)]
pub(crate) struct GradRegions {
    pub gout: usize,
    pub gx: usize,
    pub gw: usize,
}

/// Byte offsets of the staging tensors: forward `x [T, H] bf16, ids [T, k] i64,
/// w [T, k] f32 -> out [T, H] bf16`, and optionally the backward's (`grad`), each
/// 64-byte aligned; `bytes` in all.
#[derive(Clone, Copy)]
pub(crate) struct Layout {
    pub tokens: usize,
    pub top_k: usize,
    pub hidden: usize,
    pub x: usize,
    pub ids: usize,
    pub w: usize,
    pub out: usize,
    pub grad: Option<GradRegions>,
    pub bytes: usize,
}

impl Layout {
    /// None when a size overflows.
    pub fn new(tokens: usize, top_k: usize, hidden: usize, grads: Grads) -> Option<Layout> {
        let align = |v: usize| v.checked_add(63).map(|v| v & !63);
        let th2 = tokens.checked_mul(hidden)?.checked_mul(2)?;
        let tk = tokens.checked_mul(top_k)?;
        let x = 0;
        let ids = align(th2)?;
        let w = align(ids.checked_add(tk.checked_mul(8)?)?)?;
        let out = align(w.checked_add(tk.checked_mul(4)?)?)?;
        let end = out.checked_add(th2)?;
        let (grad, bytes) = match grads {
            Grads::None => (None, end),
            Grads::Shared => {
                let gw = align(end)?;
                (
                    Some(GradRegions {
                        gout: out,
                        gx: x,
                        gw,
                    }),
                    gw.checked_add(tk.checked_mul(4)?)?,
                )
            }
            Grads::Separate => {
                let gout = align(end)?;
                let gx = align(gout.checked_add(th2)?)?;
                let gw = align(gx.checked_add(th2)?)?;
                (
                    Some(GradRegions { gout, gx, gw }),
                    gw.checked_add(tk.checked_mul(4)?)?,
                )
            }
        };
        Some(Layout {
            tokens,
            top_k,
            hidden,
            x,
            ids,
            w,
            out,
            grad,
            bytes,
        })
    }

    /// The backward's regions (training layouts).
    pub fn grad(&self) -> GradRegions {
        self.grad.expect("a training layout has gradient regions")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_are_aligned_disjoint_and_inside() {
        for grads in [Grads::None, Grads::Shared, Grads::Separate] {
            let l = Layout::new(7, 3, 5, grads).unwrap();
            let th2 = 7 * 5 * 2;
            let mut parts = vec![
                (l.x, th2),
                (l.ids, 7 * 3 * 8),
                (l.w, 7 * 3 * 4),
                (l.out, th2),
            ];
            if let Some(g) = l.grad {
                parts.push((g.gw, 7 * 3 * 4));
                if grads == Grads::Separate {
                    parts.push((g.gout, th2));
                    parts.push((g.gx, th2));
                } else {
                    assert_eq!((g.gout, g.gx), (l.out, l.x));
                }
            }
            parts.sort();
            for p in parts.windows(2) {
                assert!(p[0].0 + p[0].1 <= p[1].0);
            }
            assert!(parts.iter().all(|&(o, n)| o % 64 == 0 && o + n <= l.bytes));
        }
        assert!(Layout::new(usize::MAX / 2, 2, 2, Grads::Shared).is_none());
    }
}
