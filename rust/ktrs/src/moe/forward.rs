//! The forward pass of the routed experts.

use super::routing::Routing;
use super::{
    expert_blocks, expert_runs, gather_pairs, gemm_rows, sum_pairs_into, ForwardCache, MoeLayer,
    ROW_PAD,
};
use crate::bf16;
use crate::buffer::SendPtr;
use crate::error::{check_len, KtrsError, Result};
use crate::kernels::vec::LowRank;
use crate::kernels::{epilogue, vec};
use crate::lora::LoraMatrix as M;
use crate::pack::PANEL;

/// Most rows per expert for which a forward without cache projects the LoRA-A of down
/// inside the down GEMM tasks: each of an expert's column blocks repeats the projection
/// (`rows × r × I` multiply-adds, nothing next to the block's GEMM at decode sizes).
const FOLD_DOWN_A_ROWS: usize = 4;

impl MoeLayer {
    /// `out[t] = Σ_s w[t,s] · expert_{ids[t,s]}(hidden[t])` for bf16 `hidden [T, H]`,
    /// `ids [T, k]`, f32 `weights [T, k]`; `out [T, H]` bf16. With `save`, returns the
    /// cache its backward needs.
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &self,
        hidden: &[u16],
        tokens: usize,
        ids: &[i64],
        weights: &[f32],
        k: usize,
        out: &mut [u16],
        save: bool,
    ) -> Result<Option<ForwardCache>> {
        self.forward_with(hidden, tokens, ids, weights, k, out, save, true)
    }

    /// [`MoeLayer::forward`], with the layer's LoRA applied only if `use_lora` (PEFT's
    /// `disable_adapter` switches it off for some calls while the LoRA stays in place).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_with(
        &self,
        hidden: &[u16],
        tokens: usize,
        ids: &[i64],
        weights: &[f32],
        k: usize,
        out: &mut [u16],
        save: bool,
        use_lora: bool,
    ) -> Result<Option<ForwardCache>> {
        let cfg = self.config;
        let (h, i, h_pad, i_pad) = (cfg.hidden, cfg.intermediate, cfg.h_pad(), cfg.i_pad());
        let (xs, as_) = (cfg.x_ld(), cfg.act_ld());
        check_len("hidden", hidden.len(), tokens * h)?;
        check_len("out", out.len(), tokens * h)?;
        if k == 0 {
            return Err(KtrsError::invalid(
                "topk_ids",
                "at least one expert per token (k >= 1)",
                0,
            ));
        }
        let routing = Routing::new(ids, weights, tokens, k, cfg.experts, true)?;
        if let Some(t) = (0..tokens).find(|&t| bf16::any_non_finite(&hidden[t * h..(t + 1) * h])) {
            return Err(KtrsError::NonFinite {
                what: format!("hidden_states at token {t}"),
            });
        }
        let n = routing.pairs();
        cfg.check_pairs(n)?;
        let isa = self.isa;
        let lora = self.lora.as_ref().filter(|_| use_lora);
        let r = lora.map_or(0, |l| l.config.rank);
        let s = lora.map_or(0.0, |l| l.config.scaling());
        let off = &routing.offsets;

        // Recycled blocks: every element read later is written below (padding included).
        let x = self.scratch.take::<u16>((n + ROW_PAD) * xs);
        // Gate and up pre-activations are kept for backward only.
        let kept = if save { n * i_pad } else { 0 };
        let g = self.scratch.take::<u16>(kept);
        let u = self.scratch.take::<u16>(kept);
        let act = self.scratch.take::<u16>((n + ROW_PAD) * as_);
        let mut zg = vec![0f32; n * r];
        let mut zu = vec![0f32; n * r];
        let mut zd = vec![0f32; n * r];
        let (xp, gp, up, ap) = (
            SendPtr(x.as_ptr()),
            SendPtr(g.as_ptr()),
            SendPtr(u.as_ptr()),
            SendPtr(act.as_ptr()),
        );
        let (zgp, zup, zdp) = (
            SendPtr(zg.as_mut_ptr()),
            SendPtr(zu.as_mut_ptr()),
            SendPtr(zd.as_mut_ptr()),
        );

        // 1. Gather token rows into expert order; LoRA-A of gate and up.
        let active = routing.active_experts();
        let rows_split = self.row_chunks(n);
        self.run_phase("fwd gather+lora A", rows_split.tasks(), |task, _| {
            let rows = rows_split.range(task);
            // SAFETY: x has n + ROW_PAD rows; this chunk's rows are this task's alone.
            let mine = unsafe { gather_pairs(&routing, rows.clone(), hidden, (h, h_pad, xs), xp) };
            if r > 0 {
                expert_runs(&routing, rows.clone(), |e, run| {
                    let (xr, len) = (&mine[(run.start - rows.start) * xs..], run.len());
                    // SAFETY: rows `run` of zg and zu belong to this task.
                    let (zgr, zur) = unsafe {
                        (
                            zgp.slice_mut(run.start * r, len * r),
                            zup.slice_mut(run.start * r, len * r),
                        )
                    };
                    vec::project_rows(isa, xr, xs, len, self.lora_expert(M::GateA, e), r, h, zgr);
                    vec::project_rows(isa, xr, xs, len, self.lora_expert(M::UpA, e), r, h, zur);
                });
            }
        });

        // 2. gate+up GEMM; epilogue adds LoRA-B and forms SiLU(gate)·up.
        let (gate_up_b, down_b) = if r > 0 {
            (&[M::GateB, M::UpB][..], &[M::DownB][..])
        } else {
            (&[][..], &[][..])
        };
        let gu = &self.gate_up;
        let nb = self.task_panels(n, active.len());
        let gu_blocks = gu.shape.panels().div_ceil(nb);
        let tasks = expert_blocks(off, gu_blocks);
        self.run_phase("fwd gate/up gemm", tasks.len(), |task, _| {
            let (e, blk) = tasks[task];
            // Fused panels come in (gate, up) pairs and there is an even number of them.
            let np = nb.min(gu.shape.panels() - blk * nb);
            let panel_len = gu.shape.panel_len();
            let b = &gu.expert(e)[blk * nb * panel_len..];
            // This task's columns of I: np / 2 gate panels and as many up panels.
            let (c0, cols) = (blk * nb / 2 * PANEL, np / 2 * PANEL);
            self.with_task_bt(gate_up_b, e, c0, cols, |bt| {
                // LoRA-B of gate and up: their panels alternate in the fused block.
                let terms = if r > 0 {
                    let (btg, btu) = bt.split_at(r * cols);
                    let rows = off[e] * r..off[e + 1] * r;
                    let term = |z, b, c0| LowRank {
                        alpha: s,
                        z,
                        r,
                        b,
                        ldb: cols,
                        cols,
                        c0,
                        step: 2,
                    };
                    vec![term(&zg[rows.clone()], btg, 0), term(&zu[rows], btu, PANEL)]
                } else {
                    Vec::new()
                };
                gemm_rows(
                    isa,
                    x.as_slice(),
                    xs,
                    h_pad,
                    off[e]..off[e + 1],
                    b,
                    np,
                    &terms,
                    |p, c| {
                        for half in 0..np / 2 {
                            let i0 = c0 + half * PANEL;
                            let (gate, rest) = c[half * 2 * PANEL..].split_at_mut(PANEL);
                            let upv = &mut rest[..PANEL];
                            // SAFETY: (pair p, columns i0..i0+16) belong to this task alone.
                            let ar = unsafe { ap.slice_mut(p * as_ + i0, PANEL) };
                            if save {
                                // SAFETY: as above.
                                let (gr, ur) = unsafe {
                                    (
                                        gp.slice_mut(p * i_pad + i0, PANEL),
                                        up.slice_mut(p * i_pad + i0, PANEL),
                                    )
                                };
                                epilogue::swiglu_fwd(isa, gate, upv, gr, ur, ar);
                            } else {
                                let (mut gr, mut ur) = ([0u16; PANEL], [0u16; PANEL]);
                                epilogue::swiglu_fwd(isa, gate, upv, &mut gr, &mut ur, ar);
                            }
                        }
                    },
                );
            });
        });

        // 3. LoRA-A of down: a phase of its own, or, for calls that keep no cache and whose
        //    experts all have few rows (decode), inside each down GEMM task (below), which
        //    projects its expert's rows again: the same bits, one barrier less.
        let most_rows = active
            .iter()
            .map(|&e| off[e + 1] - off[e])
            .max()
            .unwrap_or(0);
        let fold_down_a = r > 0 && !save && most_rows <= FOLD_DOWN_A_ROWS;
        if r > 0 && !fold_down_a {
            self.run_phase("fwd down lora A", rows_split.tasks(), |task, _| {
                expert_runs(&routing, rows_split.range(task), |e, run| {
                    // SAFETY: rows `run` of zd belong to this task.
                    let zdr = unsafe { zdp.slice_mut(run.start * r, run.len() * r) };
                    let a = &act.as_slice()[run.start * as_..];
                    let ad = self.lora_expert(M::DownA, e);
                    vec::project_rows(isa, a, as_, run.len(), ad, r, i, zdr);
                });
            });
        }

        // 4. down GEMM per pair (+ LoRA-B) into y.
        let y = self.scratch.take::<f32>(n * h_pad);
        let yp = SendPtr(y.as_ptr());
        let dn = &self.down;
        let d_blocks = dn.shape.panels().div_ceil(nb);
        let tasks = expert_blocks(off, d_blocks);
        self.run_phase("fwd down gemm", tasks.len(), |task, _| {
            let (e, blk) = tasks[task];
            let np = nb.min(dn.shape.panels() - blk * nb);
            let b = &dn.expert(e)[blk * nb * dn.shape.panel_len()..];
            let h0 = blk * nb * PANEL;
            let cols = np * PANEL;
            let rows = off[e]..off[e + 1];
            let mut own = Vec::new();
            let z = if fold_down_a {
                own.resize(rows.len() * r, 0.0);
                let a = &act.as_slice()[rows.start * as_..];
                let ad = self.lora_expert(M::DownA, e);
                vec::project_rows(isa, a, as_, rows.len(), ad, r, i, &mut own);
                &own[..]
            } else {
                &zd[rows.start * r..rows.end * r]
            };
            self.with_task_bt(down_b, e, h0, cols, |bt| {
                let term = (r > 0).then_some(LowRank {
                    alpha: s,
                    z,
                    r,
                    b: bt,
                    ldb: cols,
                    cols,
                    c0: 0,
                    step: 1,
                });
                gemm_rows(
                    isa,
                    act.as_slice(),
                    as_,
                    i_pad,
                    rows.clone(),
                    b,
                    np,
                    term.as_slice(),
                    |p, c| {
                        // SAFETY: (pair p, columns h0..h0+16·np) belong to this task alone.
                        unsafe { yp.slice_mut(p * h_pad + h0, cols) }.copy_from_slice(c);
                    },
                );
            });
        });

        // 5. Weighted sum over each token's k experts.
        let outp = SendPtr(out.as_mut_ptr());
        let token_split = self.row_chunks(tokens);
        self.run_phase("fwd combine", token_split.tasks(), |task, _| {
            let w = |p: usize| routing.pair_weight[p];
            sum_pairs_into(
                isa,
                &routing,
                token_split.range(task),
                y.as_slice(),
                h_pad,
                h,
                w,
                |_, _, _| {},
                outp,
            );
        });

        Ok(save.then(|| ForwardCache {
            layer_id: self.id(),
            lora_generation: self.lora_generation,
            lora_rank: r,
            routing,
            x,
            g,
            u,
            act,
            zg,
            zu,
            zd,
        }))
    }
}
