//! The backward pass: input gradient, routing-weight gradient and LoRA gradients.
//!
//! The input gradient multiplies by the transposed expert weights, kept across calls
//! where the budget allows, repacked per call otherwise (see `transposed.rs`).

use super::routing::NO_PAIR;
use super::transposed::gemm_t_rows;
use super::{
    expert_blocks, expert_runs, gather_pairs, sum_pairs_into, ForwardCache, GradTarget, MoeLayer,
    ROW_PAD,
};
use crate::bf16;
use crate::buffer::SendPtr;
use crate::error::{check_len, KtrsError, Result};
use crate::kernels::lora_grad::{self, Cols};
use crate::kernels::vec::LowRank;
use crate::kernels::{epilogue, vec};
use crate::lora::LoraMatrix as M;
use crate::pack::{fused_row, PANEL};
use std::ops::Range;

impl MoeLayer {
    /// The LoRA side of a backward product by `W` for its columns `o0 .. o0 + 16·np`:
    /// `s · v · A[:, o0..]` per `(A matrix, v)`, v's rows being the pairs `rows` (none
    /// when the forward ran without LoRA, rank 0).
    fn lora_a_terms<'a>(
        &'a self,
        (r, s): (usize, f32),
        ms: &[(M, &'a [f32])],
        e: usize,
        rows: Range<usize>,
        o0: usize,
        np: usize,
    ) -> Vec<LowRank<'a>> {
        let Some(l) = self.lora.as_ref().filter(|_| r > 0) else {
            return Vec::new();
        };
        ms.iter()
            .filter_map(|&(m, v)| {
                let k = l.shape(m)[2];
                let cols = (np * PANEL).min(k.saturating_sub(o0));
                (cols > 0).then(|| LowRank {
                    alpha: s,
                    z: &v[rows.start * r..rows.end * r],
                    r,
                    b: &self.lora_expert(m, e)[o0..],
                    ldb: k,
                    cols,
                    c0: 0,
                    step: 1,
                })
            })
            .collect()
    }

    /// Refuses a cache of another layer, or one made before `set_lora` replaced the
    /// LoRA it was made with (failure-modes row 12).
    pub fn check_cache(&self, cache: &ForwardCache) -> Result<()> {
        if cache.layer_id != self.id() {
            return Err(KtrsError::StaleCache(
                "this forward cache was made by another layer".into(),
            ));
        }
        if cache.lora_generation != self.lora_generation {
            return Err(KtrsError::StaleCache(
                "the layer's LoRA was replaced (set_lora / enable_lora) after this forward; \
                 run the forward again"
                    .into(),
            ));
        }
        Ok(())
    }

    /// From `grad_out [T, H]` (bf16) writes `grad_hidden [T, H]` (bf16) and
    /// `grad_weights [T, k]` (f32), and produces LoRA gradients as `grads` says.
    pub fn backward(
        &self,
        cache: &ForwardCache,
        grad_out: &[u16],
        grad_hidden: &mut [u16],
        grad_weights: &mut [f32],
        mut grads: GradTarget<'_>,
    ) -> Result<()> {
        self.check_cache(cache)?;
        let cfg = self.config;
        let (h, i, h_pad, i_pad) = (cfg.hidden, cfg.intermediate, cfg.h_pad(), cfg.i_pad());
        let (xs, as_, ds, gs) = (cfg.x_ld(), cfg.act_ld(), cfg.x_ld(), cfg.dgu_ld());
        let rt = &cache.routing;
        let (tokens, k, n) = (rt.tokens, rt.k, rt.pairs());
        check_len("grad_output", grad_out.len(), tokens * h)?;
        check_len("grad_hidden", grad_hidden.len(), tokens * h)?;
        check_len("grad_topk_weights", grad_weights.len(), tokens * k)?;
        if let Some(t) = (0..tokens).find(|&t| bf16::any_non_finite(&grad_out[t * h..(t + 1) * h]))
        {
            return Err(KtrsError::NonFinite {
                what: format!("grad_output at token {t}"),
            });
        }
        // The LoRA the forward applied: same generation, so same buffers and rank.
        let lora = self.lora.as_ref().filter(|_| cache.lora_rank > 0);
        let r = lora.map_or(0, |l| l.config.rank);
        let s = lora.map_or(0.0, |l| l.config.scaling());
        if r == 0 {
            // No LoRA in this forward: its LoRA gradients are zero.
            if let GradTarget::External {
                bufs,
                accumulate: false,
            } = &mut grads
            {
                bufs.iter_mut().for_each(|b| b.fill(0.0));
            }
        }
        let isa = self.isa;
        let off = &rt.offsets;
        let (x, g, u, act) = (
            cache.x.as_slice(),
            cache.g.as_slice(),
            cache.u.as_slice(),
            cache.act.as_slice(),
        );

        // 0. The LoRA-B matrices, transposed for the projections below (one region).
        let active = rt.active_experts();
        let ld = 2 * i_pad;
        let specs = [
            (M::DownB, h_pad, Cols::Plain),
            (M::GateB, ld, Cols::Fused(false)),
            (M::UpB, ld, Cols::Fused(true)),
        ];
        let bt = self.lora_b_plan(if r > 0 { &specs } else { &[] }, &active);
        self.run_phase("lora B transpose", bt.tasks(), |t, _| bt.fill(self, t));

        // 1. Gather dy rows (unweighted); vd = dy·Bd.
        let dy = self.scratch.take::<u16>((n + ROW_PAD) * ds);
        let mut vd = vec![0f32; n * r];
        let (dyp, vdp) = (SendPtr(dy.as_ptr()), SendPtr(vd.as_mut_ptr()));
        let rows_split = self.row_chunks(n);
        self.run_phase("bwd gather+lora", rows_split.tasks(), |task, _| {
            let rows = rows_split.range(task);
            // SAFETY: dy has n + ROW_PAD rows; this chunk's rows are this task's alone.
            let mine = unsafe { gather_pairs(rt, rows.clone(), grad_out, (h, h_pad, ds), dyp) };
            if r > 0 {
                expert_runs(rt, rows.clone(), |e, run| {
                    let d = &mine[(run.start - rows.start) * ds..];
                    // SAFETY: rows `run` of vd belong to this task.
                    let vdr = unsafe { vdp.slice_mut(run.start * r, run.len() * r) };
                    let bd = &bt.get(0)[e * r * h_pad..];
                    vec::project_rows(isa, d, ds, run.len(), bd, r, h_pad, vdr);
                });
            }
        });

        // 2. da0 = dy·Wd (+ s·vd·Ad); routing-weight gradient partials; SiLU backward into
        //    dgu, laid out like the fused gate+up rows.
        let dn = &self.down;
        let nb = self.task_panels(n, active.len());
        let i_blocks = (dn.shape.k_pad / PANEL).div_ceil(nb);
        let gw_part = self.scratch.take::<f32>(n * i_blocks);
        let dgu = self.scratch.take::<u16>((n + ROW_PAD) * gs);
        let (gwp, dgup) = (SendPtr(gw_part.as_ptr()), SendPtr(dgu.as_ptr()));
        let tasks = expert_blocks(off, i_blocks);
        self.run_phase("bwd down gemm+silu", tasks.len(), |task, _| {
            let (e, blk) = tasks[task];
            let np = nb.min(dn.shape.k_pad / PANEL - blk * nb);
            let i0 = blk * nb * PANEL;
            gemm_t_rows(
                isa,
                dy.as_slice(),
                ds,
                off[e]..off[e + 1],
                dn,
                &self.t_down,
                e,
                i0,
                np,
                &self.lora_a_terms((r, s), &[(M::DownA, &vd)], e, off[e]..off[e + 1], i0, np),
                |p, da| {
                    let cols = (np * PANEL).min(i.saturating_sub(i0));
                    let arow = &act[p * as_ + i0..];
                    // SAFETY: (pair p, block blk) and (pair p, columns i0..i0+16·np) are this task's.
                    unsafe {
                        gwp.write(p * i_blocks + blk, vec::dot_f32_bf16(isa, da, arow, cols))
                    };
                    let w = rt.pair_weight[p];
                    let drow = unsafe { dgup.slice_mut(p * gs, 2 * i_pad) };
                    // Whole panels: padding columns (c >= I) have da = g = u = 0, so
                    // they come out as the zeros the next GEMM must read there.
                    for q in 0..np {
                        let c = i0 + q * PANEL;
                        let (dg, du) = drow[fused_row(c, false)..fused_row(c, false) + 2 * PANEL]
                            .split_at_mut(PANEL);
                        let at = p * i_pad + c;
                        epilogue::swiglu_bwd(
                            isa,
                            w,
                            &da[q * PANEL..],
                            &g[at..at + PANEL],
                            &u[at..at + PANEL],
                            dg,
                            du,
                        );
                    }
                },
            );
        });

        // 3. vg/vu = dg·Bg, du·Bu per pair; then LoRA gradients, one task per (expert,
        //    matrix), each a register-blocked sum of outer products over the expert's pairs.
        let mut vg = vec![0f32; n * r];
        let mut vu = vec![0f32; n * r];
        let mut lora_grad_task: Option<Box<dyn Fn(usize) + Sync + '_>> = None;
        if r > 0 {
            let l = lora.expect("rank > 0 implies LoRA");
            let (bgt, but) = (bt.get(1), bt.get(2));
            let (vgp, vup) = (SendPtr(vg.as_mut_ptr()), SendPtr(vu.as_mut_ptr()));
            self.run_phase("bwd lora v", rows_split.tasks(), |task, _| {
                expert_runs(rt, rows_split.range(task), |e, run| {
                    let (len, rows) = (run.len(), &dgu.as_slice()[run.start * gs..]);
                    // SAFETY: rows `run` of vg and vu belong to this task.
                    let (vgr, vur) = unsafe {
                        (
                            vgp.slice_mut(run.start * r, len * r),
                            vup.slice_mut(run.start * r, len * r),
                        )
                    };
                    vec::project_rows(isa, rows, gs, len, &bgt[e * r * ld..], r, ld, vgr);
                    vec::project_rows(isa, rows, gs, len, &but[e * r * ld..], r, ld, vur);
                });
            });
            // Destination base pointers, in LoraMatrix::ALL order, and whether to add.
            let dst: Option<([SendPtr<f32>; 6], bool)> = match grads {
                GradTarget::Skip => None,
                GradTarget::Owned => Some((M::ALL.map(|m| SendPtr(l.grad(m).as_ptr())), true)),
                GradTarget::External { bufs, accumulate } => {
                    for (m, b) in M::ALL.iter().zip(bufs.iter()) {
                        check_len(&format!("grad_{}", m.name()), b.len(), l.grad(*m).len())?;
                    }
                    let [a, b, c, d, e, f] = bufs;
                    Some((
                        [a, b, c, d, e, f].map(|s| SendPtr(s.as_mut_ptr())),
                        accumulate,
                    ))
                }
            };
            if let Some((dst, accumulate)) = dst {
                let (dy_s, dgu_s) = (dy.as_slice(), dgu.as_slice());
                let pw = &rt.pair_weight[..];
                let (vg, vu, vd) = (&vg, &vu, &vd);
                // Runs in the same parallel region as the dx GEMM below (they are
                // independent): one barrier less, and the uneven gradient tasks
                // fill the gaps between GEMM tasks.
                lora_grad_task = Some(Box::new(move |task: usize| {
                    let (e, m) = (task / 6, M::ALL[task % 6]);
                    let [_, rr, cc] = l.shape(m);
                    // SAFETY: task (e, m) owns expert e's slice of gradient matrix m.
                    let out = unsafe { dst[m.index()].slice_mut(e * rr * cc, rr * cc) };
                    if !accumulate {
                        out.fill(0.0);
                    }
                    let rows = off[e]..off[e + 1];
                    use lora_grad::{Coef, GradSum, Layout::*};
                    // (rows x, their stride, column map, per-pair vectors, factor, k, layout)
                    let (x, ld, cols, v, coef, k, layout): (&[u16], _, _, &[f32], _, _, _) = match m
                    {
                        M::GateA => (x, xs, Cols::Plain, vg, Coef::Const(s), h, RankMajor),
                        M::UpA => (x, xs, Cols::Plain, vu, Coef::Const(s), h, RankMajor),
                        M::GateB => (
                            dgu_s,
                            gs,
                            Cols::Fused(false),
                            &cache.zg,
                            Coef::Const(s),
                            i,
                            ColMajor,
                        ),
                        M::UpB => (
                            dgu_s,
                            gs,
                            Cols::Fused(true),
                            &cache.zu,
                            Coef::Const(s),
                            i,
                            ColMajor,
                        ),
                        M::DownA => (act, as_, Cols::Plain, vd, Coef::Scaled(s, pw), i, RankMajor),
                        M::DownB => (
                            dy_s,
                            ds,
                            Cols::Plain,
                            &cache.zd,
                            Coef::Scaled(s, pw),
                            h,
                            ColMajor,
                        ),
                    };
                    let sum = GradSum {
                        x,
                        ld,
                        cols,
                        rows,
                        v,
                        coef,
                        r,
                        k,
                        layout,
                    };
                    lora_grad::accumulate(isa, sum, out);
                }));
            }
        }

        // 4. dx = dgu·W_gu (+ s·(vg·Ag + vu·Au)) per pair.
        let gu = &self.gate_up;
        let h_blocks = (gu.shape.k_pad / PANEL).div_ceil(nb);
        let dx = self.scratch.take::<f32>(n * h_pad);
        let dxp = SendPtr(dx.as_ptr());
        let tasks = expert_blocks(off, h_blocks);
        let n_lora = if lora_grad_task.is_some() {
            6 * cfg.experts
        } else {
            0
        };
        self.run_phase(
            "bwd gate/up gemm + lora grads",
            n_lora + tasks.len(),
            |task, _| {
                if task < n_lora {
                    if let Some(f) = &lora_grad_task {
                        f(task);
                    }
                    return;
                }
                let (e, blk) = tasks[task - n_lora];
                let np = nb.min(gu.shape.k_pad / PANEL - blk * nb);
                let h0 = blk * nb * PANEL;
                gemm_t_rows(
                    isa,
                    dgu.as_slice(),
                    gs,
                    off[e]..off[e + 1],
                    gu,
                    &self.t_gate_up,
                    e,
                    h0,
                    np,
                    &self.lora_a_terms(
                        (r, s),
                        &[(M::GateA, &vg), (M::UpA, &vu)],
                        e,
                        off[e]..off[e + 1],
                        h0,
                        np,
                    ),
                    |p, c| {
                        // SAFETY: (pair p, columns h0..h0+16·np) belong to this task alone.
                        unsafe { dxp.slice_mut(p * h_pad + h0, np * PANEL) }.copy_from_slice(c);
                    },
                );
            },
        );

        // 5. Sum over each token's k pairs; routing-weight gradient from the partials
        // (skipped slots, id -1, have no pair: their weight gets a zero gradient).
        for (gw, &p) in grad_weights.iter_mut().zip(&rt.pos) {
            if p == NO_PAIR {
                *gw = 0.0;
            }
        }
        let (ghp, gwo) = (
            SendPtr(grad_hidden.as_mut_ptr()),
            SendPtr(grad_weights.as_mut_ptr()),
        );
        let token_split = self.row_chunks(tokens);
        self.run_phase("bwd combine", token_split.tasks(), |task, _| {
            let gw = |t: usize, slot: usize, p: usize| {
                let part: f32 = gw_part.as_slice()[p * i_blocks..(p + 1) * i_blocks]
                    .iter()
                    .sum();
                // SAFETY: token t's entries are written by this task alone.
                unsafe { gwo.write(t * k + slot, part) };
            };
            sum_pairs_into(
                isa,
                rt,
                token_split.range(task),
                dx.as_slice(),
                h_pad,
                h,
                |_| 1.0,
                gw,
                ghp,
            );
        });
        Ok(())
    }
}
