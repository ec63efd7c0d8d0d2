//! Every ISA against an f64 reference of the same math, forward and backward, on
//! awkward shapes (sizes not multiples of 16/32, experts without tokens, k up to 8).

use super::*;
use crate::bf16;
use crate::lora::SplitMix64;

/// A layer and a batch: E experts, hidden size H, intermediate size I, k experts per
/// token, T tokens, LoRA rank r (0: none).
struct Case {
    e: usize,
    h: usize,
    i: usize,
    k: usize,
    t: usize,
    r: usize,
}

#[derive(Clone)]
struct Data {
    gate: Vec<u16>,
    up: Vec<u16>,
    down: Vec<u16>,
    hidden: Vec<u16>,
    ids: Vec<i64>,
    w: Vec<f32>,
    gout: Vec<u16>,
    lora: Vec<Vec<f32>>, // LoraMatrix::ALL order
}

fn rnd(rng: &mut SplitMix64, scale: f64) -> f32 {
    ((rng.next_f64() * 2.0 - 1.0) * scale) as f32
}

fn make(c: &Case, seed: u64) -> Data {
    let mut g = SplitMix64(seed);
    let bf = |n: usize, sc: f64, g: &mut SplitMix64| -> Vec<u16> {
        (0..n).map(|_| bf16::from_f32(rnd(g, sc))).collect()
    };
    let ws = 1.0 / (c.h as f64).sqrt();
    let gate = bf(c.e * c.i * c.h, ws, &mut g);
    let up = bf(c.e * c.i * c.h, ws, &mut g);
    let down = bf(c.e * c.h * c.i, 1.0 / (c.i as f64).sqrt(), &mut g);
    let hidden = bf(c.t * c.h, 1.0, &mut g);
    let gout = bf(c.t * c.h, 1.0, &mut g);
    // Distinct experts per token, leaving the last expert (when E > k) unused.
    let usable = if c.e > c.k { c.e - 1 } else { c.e };
    let mut ids = Vec::new();
    let mut w = Vec::new();
    for _ in 0..c.t {
        let mut chosen: Vec<i64> = Vec::new();
        while chosen.len() < c.k {
            let x = (g.next_u64() % usable as u64) as i64;
            if !chosen.contains(&x) || usable < c.k {
                chosen.push(x);
            }
        }
        ids.extend(&chosen);
        w.extend((0..c.k).map(|_| 0.1 + rnd(&mut g, 0.5).abs()));
    }
    let lora = crate::lora::LoraMatrix::ALL
        .iter()
        .map(|&m| {
            let (rr, cc) = crate::lora::LoraWeights::dims(m, c.r, c.h, c.i);
            (0..c.e * rr * cc)
                .map(|_| rnd(&mut g, 0.3 / (cc as f64).sqrt()))
                .collect()
        })
        .collect();
    Data {
        gate,
        up,
        down,
        hidden,
        ids,
        w,
        gout,
        lora,
    }
}

struct RefOut {
    out: Vec<f64>,
    gh: Vec<f64>,
    gw: Vec<f64>,
    lg: Vec<Vec<f64>>,
}

impl Case {
    /// In the order the test tags name them: E, H, I, k, T, r.
    fn new(e: usize, h: usize, i: usize, k: usize, t: usize, r: usize) -> Case {
        Case { e, h, i, k, t, r }
    }
    fn config(&self) -> MoeConfig {
        MoeConfig {
            experts: self.e,
            hidden: self.h,
            intermediate: self.i,
        }
    }
    /// LoRA of rank r with alpha 2r (scaling 2), or none for r = 0.
    fn lora_config(&self) -> Option<LoraConfig> {
        (self.r > 0).then_some(LoraConfig {
            rank: self.r,
            alpha: 2.0 * self.r as f32,
            use_rslora: false,
        })
    }
    /// A zeroed bf16 `[T, H]`: an output or `grad_hidden`.
    fn out_buf(&self) -> Vec<u16> {
        vec![0u16; self.t * self.h]
    }
    /// Zeroed `grad_hidden` and `grad_topk_weights` (f32 `[T, k]`).
    fn grad_bufs(&self) -> (Vec<u16>, Vec<f32>) {
        (self.out_buf(), vec![0f32; self.t * self.k])
    }
}

/// A forward of `d`'s batch into `out` that keeps its cache for the backward.
fn forward_saved(layer: &MoeLayer, c: &Case, d: &Data, out: &mut [u16]) -> ForwardCache {
    layer
        .forward(&d.hidden, c.t, &d.ids, &d.w, c.k, out, true)
        .unwrap()
        .unwrap()
}

/// A backward of `d`'s output gradient into the layer's own LoRA gradients.
fn backward_owned(
    layer: &MoeLayer,
    cache: &ForwardCache,
    d: &Data,
    gh: &mut [u16],
    gw: &mut [f32],
) -> Result<()> {
    layer.backward(cache, &d.gout, gh, gw, GradTarget::Owned)
}

/// A layer of case `c` packed from `d`, with `d`'s LoRA weights.
fn layer_for(c: &Case, d: &Data, isa: Isa, threads: usize) -> MoeLayer {
    let w = ExpertWeights {
        gate: &d.gate,
        up: &d.up,
        down: &d.down,
    };
    let layer = MoeLayer::new(c.config(), w, c.lora_config(), isa, threads, 0).unwrap();
    if let Some(l) = layer.lora() {
        for (m, v) in crate::lora::LoraMatrix::ALL.iter().zip(&d.lora) {
            l.set(*m, v).unwrap();
        }
    }
    layer
}

/// Straightforward f64 math, token by token: the independent reference.
fn reference(c: &Case, d: &Data, s: f64) -> RefOut {
    let f = |v: u16| bf16::to_f32(v) as f64;
    let (h, i, r) = (c.h, c.i, c.r);
    let mut out = vec![0f64; c.t * h];
    let mut gh = vec![0f64; c.t * h];
    let mut gw = vec![0f64; c.t * c.k];
    let mut lg: Vec<Vec<f64>> = d.lora.iter().map(|m| vec![0f64; m.len()]).collect();
    let la = |m: usize, e: usize, row: usize, col: usize, cols: usize, rows: usize| {
        d.lora[m][e * rows * cols + row * cols + col] as f64
    };
    for t in 0..c.t {
        let x: Vec<f64> = (0..h).map(|q| f(d.hidden[t * h + q])).collect();
        let go: Vec<f64> = (0..h).map(|q| f(d.gout[t * h + q])).collect();
        for sl in 0..c.k {
            let e = d.ids[t * c.k + sl] as usize;
            let wt = d.w[t * c.k + sl] as f64;
            let zg: Vec<f64> = (0..r)
                .map(|j| (0..h).map(|q| la(0, e, j, q, h, r) * x[q]).sum())
                .collect();
            let zu: Vec<f64> = (0..r)
                .map(|j| (0..h).map(|q| la(2, e, j, q, h, r) * x[q]).sum())
                .collect();
            let mut gv = vec![0f64; i];
            let mut uv = vec![0f64; i];
            for o in 0..i {
                gv[o] = (0..h)
                    .map(|q| f(d.gate[(e * i + o) * h + q]) * x[q])
                    .sum::<f64>()
                    + s * (0..r).map(|j| la(1, e, o, j, r, i) * zg[j]).sum::<f64>();
                uv[o] = (0..h)
                    .map(|q| f(d.up[(e * i + o) * h + q]) * x[q])
                    .sum::<f64>()
                    + s * (0..r).map(|j| la(3, e, o, j, r, i) * zu[j]).sum::<f64>();
            }
            let sig: Vec<f64> = gv.iter().map(|v| 1.0 / (1.0 + (-v).exp())).collect();
            let a: Vec<f64> = (0..i).map(|o| gv[o] * sig[o] * uv[o]).collect();
            let zd: Vec<f64> = (0..r)
                .map(|j| (0..i).map(|o| la(4, e, j, o, i, r) * a[o]).sum())
                .collect();
            let y: Vec<f64> = (0..h)
                .map(|q| {
                    (0..i)
                        .map(|o| f(d.down[(e * h + q) * i + o]) * a[o])
                        .sum::<f64>()
                        + s * (0..r).map(|j| la(5, e, q, j, r, h) * zd[j]).sum::<f64>()
                })
                .collect();
            for q in 0..h {
                out[t * h + q] += wt * y[q];
            }
            // backward
            gw[t * c.k + sl] = (0..h).map(|q| go[q] * y[q]).sum();
            let dy: Vec<f64> = go.iter().map(|v| v * wt).collect();
            let vd: Vec<f64> = (0..r)
                .map(|j| (0..h).map(|q| dy[q] * la(5, e, q, j, r, h)).sum())
                .collect();
            for q in 0..h {
                for j in 0..r {
                    lg[5][(e * h + q) * r + j] += s * dy[q] * zd[j];
                }
            }
            for j in 0..r {
                for o in 0..i {
                    lg[4][(e * r + j) * i + o] += s * vd[j] * a[o];
                }
            }
            let da: Vec<f64> = (0..i)
                .map(|o| {
                    (0..h)
                        .map(|q| dy[q] * f(d.down[(e * h + q) * i + o]))
                        .sum::<f64>()
                        + s * (0..r).map(|j| vd[j] * la(4, e, j, o, i, r)).sum::<f64>()
                })
                .collect();
            let dg: Vec<f64> = (0..i)
                .map(|o| da[o] * uv[o] * sig[o] * (1.0 + gv[o] * (1.0 - sig[o])))
                .collect();
            let du: Vec<f64> = (0..i).map(|o| da[o] * gv[o] * sig[o]).collect();
            for (ma, mb, dd, z, wmat) in
                [(0usize, 1usize, &dg, &zg, &d.gate), (2, 3, &du, &zu, &d.up)]
            {
                let v: Vec<f64> = (0..r)
                    .map(|j| (0..i).map(|o| dd[o] * la(mb, e, o, j, r, i)).sum())
                    .collect();
                for o in 0..i {
                    for j in 0..r {
                        lg[mb][(e * i + o) * r + j] += s * dd[o] * z[j];
                    }
                }
                for j in 0..r {
                    for q in 0..h {
                        lg[ma][(e * r + j) * h + q] += s * v[j] * x[q];
                    }
                }
                for q in 0..h {
                    gh[t * h + q] += (0..i)
                        .map(|o| dd[o] * f(wmat[(e * i + o) * h + q]))
                        .sum::<f64>()
                        + s * (0..r).map(|j| v[j] * la(ma, e, j, q, h, r)).sum::<f64>();
                }
            }
        }
    }
    RefOut { out, gh, gw, lg }
}

fn rel_l2(got: impl Iterator<Item = f64>, want: &[f64]) -> f64 {
    let mut num = 0.0;
    let mut den = 0.0;
    for (g, w) in got.zip(want) {
        num += (g - w) * (g - w);
        den += w * w;
    }
    (num / den.max(1e-30)).sqrt()
}

/// Every ISA this CPU has, plus AMX through the tile emulation where the CPU has AVX-512
/// but no AMX (the AMX layer code runs with `kernels::EMULATE_AMX`).
fn isas_with_emulated_amx() -> Vec<Isa> {
    let mut v = Isa::available();
    if !v.contains(&Isa::Amx) && v.contains(&Isa::Avx512) {
        crate::kernels::EMULATE_AMX.store(true, std::sync::atomic::Ordering::Relaxed);
        v.push(Isa::Amx);
    }
    v
}

fn check_case(c: &Case, seed: u64) {
    let d = make(c, seed);
    let mut layer = layer_for(c, &d, Isa::Scalar, 2);
    let s = c.lora_config().map_or(0.0, |l| l.scaling()) as f64;
    let want = reference(c, &d, s);
    for isa in isas_with_emulated_amx() {
        use_isa(&mut layer, isa);
        let tag = format!(
            "{isa} E{} H{} I{} k{} T{} r{}",
            c.e, c.h, c.i, c.k, c.t, c.r
        );
        let (out, gh, gw, lg) = train_call(&layer, c, &d);
        let err = rel_l2(out.iter().map(|&v| bf16::to_f32(v) as f64), &want.out);
        assert!(err < 1e-2, "{tag}: forward rel L2 {err}");
        // The inference forward (nothing kept) computes the same bits.
        let mut out_inf = c.out_buf();
        let none = layer
            .forward(&d.hidden, c.t, &d.ids, &d.w, c.k, &mut out_inf, false)
            .unwrap();
        assert!(
            none.is_none() && out_inf == out,
            "{tag}: inference forward differs"
        );
        let gw: Vec<f32> = gw.iter().map(|&b| f32::from_bits(b)).collect();
        let lg: Vec<Vec<f32>> = lg
            .iter()
            .map(|m| m.iter().map(|&b| f32::from_bits(b)).collect())
            .collect();
        let err = rel_l2(gh.iter().map(|&v| bf16::to_f32(v) as f64), &want.gh);
        assert!(err < 1e-2, "{tag}: grad_hidden rel L2 {err}");
        let err = rel_l2(gw.iter().map(|&v| v as f64), &want.gw);
        assert!(err < 1e-2, "{tag}: grad_weights rel L2 {err}");
        if c.r > 0 {
            for (m, (g, wnt)) in crate::lora::LoraMatrix::ALL
                .iter()
                .zip(lg.iter().zip(&want.lg))
            {
                assert!(
                    g.iter().all(|v| v.is_finite()),
                    "{tag}: {} has unwritten entries",
                    m.name()
                );
                let err = rel_l2(g.iter().map(|&v| v as f64), wnt);
                assert!(err < 1e-2, "{tag}: grad {} rel L2 {err}", m.name());
            }
        }
    }
}

#[test]
fn small_awkward_shapes() {
    check_case(&Case::new(5, 70, 45, 3, 17, 4), 1);
    check_case(&Case::new(1, 33, 17, 1, 1, 8), 2);
    check_case(&Case::new(2, 33, 17, 1, 4, 2), 7);
    check_case(&Case::new(3, 16, 32, 2, 5, 0), 3);
}

#[test]
fn many_experts_and_k8() {
    check_case(&Case::new(64, 96, 40, 8, 33, 8), 4);
}

#[test]
fn many_tokens() {
    check_case(&Case::new(16, 48, 40, 6, 600, 3), 5);
}

#[test]
fn wide_unaligned_hidden() {
    check_case(&Case::new(4, 2050, 1407, 2, 3, 8), 6);
}

#[test]
fn owned_grads_accumulate_and_caches_are_independent() {
    let c = Case::new(6, 40, 24, 2, 9, 4);
    let d = make(&c, 9);
    let layer = layer_for(&c, &d, Isa::best(), 2);
    let mut out = c.out_buf();
    let c1 = forward_saved(&layer, &c, &d, &mut out);
    // A second, different forward in between must not disturb c1.
    let other: Vec<u16> = d.hidden.iter().rev().copied().collect();
    let _c2 = layer
        .forward(&other, c.t, &d.ids, &d.w, c.k, &mut out, true)
        .unwrap()
        .unwrap();
    let (mut gh, mut gw) = c.grad_bufs();
    backward_owned(&layer, &c1, &d, &mut gh, &mut gw).unwrap();
    let once: Vec<f32> = layer
        .lora()
        .unwrap()
        .grad(crate::lora::LoraMatrix::GateA)
        .as_slice()
        .to_vec();
    backward_owned(&layer, &c1, &d, &mut gh, &mut gw).unwrap();
    let twice = layer
        .lora()
        .unwrap()
        .grad(crate::lora::LoraMatrix::GateA)
        .as_slice();
    for (a, b) in once.iter().zip(twice) {
        assert!((2.0 * a - b).abs() <= 1e-5 * (1.0 + a.abs()));
    }
    let want = reference(&c, &d, 2.0);
    let err = rel_l2(once.iter().map(|&v| v as f64), &want.lg[0]);
    assert!(
        err < 1e-2,
        "c1's gradient after an interleaved forward: {err}"
    );
    layer.lora().unwrap().zero_grads();
    assert!(layer
        .lora()
        .unwrap()
        .grad(crate::lora::LoraMatrix::GateA)
        .as_slice()
        .iter()
        .all(|&v| v == 0.0));
    // A cache from another layer is refused.
    let layer2 = layer_for(&c, &d, Isa::Scalar, 1);
    assert!(backward_owned(&layer2, &c1, &d, &mut gh, &mut gw).is_err());
}

#[test]
fn bad_inputs_are_errors() {
    let c = Case::new(4, 32, 32, 2, 2, 0);
    let d = make(&c, 11);
    let cfg = c.config();
    let layer = layer_for(&c, &d, Isa::Scalar, 1);
    let mut out = vec![0u16; 64];
    assert!(layer
        .forward(&d.hidden, 2, &[0, 4, 1, 2], &d.w, 2, &mut out, false)
        .is_err());
    assert!(layer
        .forward(&d.hidden, 2, &[0, -2, 1, 2], &d.w, 2, &mut out, false)
        .is_err());

    assert!(layer
        .forward(&d.hidden[..10], 2, &d.ids, &d.w, 2, &mut out, false)
        .is_err());
    let mut nan = d.hidden.clone();
    nan[40] = bf16::from_f32(f32::NAN);
    let e = layer
        .forward(&nan, 2, &d.ids, &d.w, 2, &mut out, false)
        .unwrap_err();
    assert!(e.to_string().contains("token 1"), "{e}");
    assert!(MoeLayer::new(
        cfg,
        ExpertWeights {
            gate: &d.gate[1..],
            up: &d.up,
            down: &d.down
        },
        None,
        Isa::Scalar,
        1,
        0
    )
    .is_err());
}

/// A skipped slot (-1) adds nothing and gets nothing: the same output bits and gradients
/// as that slot with weight 0 (scalar kernels, whose rows do not depend on the other rows
/// of their expert).
#[test]
fn skipped_slots_add_nothing() {
    let c = Case::new(5, 48, 40, 3, 7, 4);
    let d = make(&c, 12);
    let layer = layer_for(&c, &d, Isa::Scalar, 2);
    let mut ids = d.ids.clone();
    let mut w0 = d.w.clone();
    for i in [1usize, 4, 5, 9, 20] {
        ids[i] = -1;
        w0[i] = 0.0;
    }
    ids[c.k..2 * c.k].fill(-1); // a token with no expert at all
    w0[c.k..2 * c.k].fill(0.0);
    let (mut skipped, mut zero_weight) = (c.out_buf(), c.out_buf());
    layer
        .forward(&d.hidden, c.t, &ids, &d.w, c.k, &mut skipped, false)
        .unwrap();
    layer
        .forward(&d.hidden, c.t, &d.ids, &w0, c.k, &mut zero_weight, false)
        .unwrap();
    assert_eq!(skipped, zero_weight);
    assert!(skipped[c.h..2 * c.h].iter().all(|&v| v == 0));

    // Backward: the same gradients as weight 0 (values: -0.0 may become +0.0), and a zero
    // routing-weight gradient for the skipped slots.
    let grads = |ids: &[i64], w: &[f32]| {
        let mut out = c.out_buf();
        let cache = layer
            .forward(&d.hidden, c.t, ids, w, c.k, &mut out, true)
            .unwrap()
            .unwrap();
        let (mut gh, mut gw) = (c.out_buf(), vec![f32::NAN; c.t * c.k]);
        backward_owned(&layer, &cache, &d, &mut gh, &mut gw).unwrap();
        let lora: Vec<Vec<f32>> = crate::lora::LoraMatrix::ALL
            .iter()
            .map(|&m| layer.lora().unwrap().grad(m).as_slice().to_vec())
            .collect();
        layer.lora().unwrap().zero_grads();
        (gh, gw, lora)
    };
    let (gh_s, gw_s, lora_s) = grads(&ids, &d.w);
    let (gh_z, gw_z, lora_z) = grads(&d.ids, &w0);
    let same = |a: &[u16], b: &[u16]| {
        a.iter()
            .zip(b)
            .all(|(&x, &y)| bf16::to_f32(x) == bf16::to_f32(y))
    };
    assert!(same(&gh_s, &gh_z));
    assert_eq!(lora_s, lora_z);
    for (i, &id) in ids.iter().enumerate() {
        if id < 0 {
            assert_eq!(gw_s[i], 0.0);
        } else {
            assert_eq!(gw_s[i], gw_z[i], "slot {i}");
        }
    }
}

#[test]
fn set_and_get_expert_round_trip() {
    let c = Case::new(3, 40, 24, 1, 1, 0);
    let d = make(&c, 12);
    let cfg = c.config();
    let full = layer_for(&c, &d, Isa::Scalar, 1);
    let mut empty = MoeLayer::new_empty(cfg, None, Isa::Scalar, 1, 0).unwrap();
    for e in 0..3 {
        let (g, u, dn) = full.get_expert(e).unwrap();
        assert_eq!(g, d.gate[e * 960..(e + 1) * 960]);
        assert_eq!(dn, d.down[e * 960..(e + 1) * 960]);
        empty.set_expert(e, &g, &u, &dn).unwrap();
    }
    let (mut o1, mut o2) = (vec![0u16; 40], vec![0u16; 40]);
    full.forward(&d.hidden, 1, &d.ids, &d.w, 1, &mut o1, false)
        .unwrap();
    empty
        .forward(&d.hidden, 1, &d.ids, &d.w, 1, &mut o2, false)
        .unwrap();
    assert_eq!(o1, o2);
    assert!(empty.set_expert(3, &[], &[], &[]).is_err());
}

/// After one round of training forward, backward and inference forward, the next rounds
/// take every scratch block from the pool: fresh blocks are page faults (and unmaps,
/// with TLB shootdowns) in every call otherwise.
#[test]
fn steady_state_allocates_nothing() {
    let c = Case::new(8, 64, 48, 2, 40, 4);
    let d = make(&c, 9);
    let mut layer = layer_for(&c, &d, Isa::best(), 2);
    layer.scratch = BufferPool::new(); // a pool of its own, so other tests do not count
    let mut out = c.out_buf();
    let (mut gh, mut gw) = c.grad_bufs();
    let mut round = |layer: &MoeLayer| {
        let cache = forward_saved(layer, &c, &d, &mut out);
        backward_owned(layer, &cache, &d, &mut gh, &mut gw).unwrap();
        drop(cache);
        layer
            .forward(&d.hidden, c.t, &d.ids, &d.w, c.k, &mut out, false)
            .unwrap();
    };
    round(&layer);
    let after_first = layer.scratch.fresh_allocations();
    for _ in 0..3 {
        round(&layer);
    }
    assert_eq!(layer.scratch.fresh_allocations(), after_first);
}

/// Failure-modes row 12: a forward cache made before `set_lora` is refused, whether the
/// new rank is larger (the old cache is too small), smaller (gradients of nothing) or 0.
#[test]
fn backward_refuses_a_cache_from_before_set_lora() {
    let c = Case::new(4, 32, 32, 2, 3, 2);
    let d = make(&c, 21);
    for new_rank in [8, 1, 2, 0] {
        let mut layer = layer_for(&c, &d, Isa::Scalar, 1);
        let mut out = c.out_buf();
        let cache = forward_saved(&layer, &c, &d, &mut out);
        let lora = (new_rank > 0).then_some(LoraConfig {
            rank: new_rank,
            alpha: 1.0,
            use_rslora: false,
        });
        layer.set_lora(lora, 1).unwrap();
        let (mut gh, mut gw) = c.grad_bufs();
        let e = backward_owned(&layer, &cache, &d, &mut gh, &mut gw).unwrap_err();
        assert!(
            matches!(e, KtrsError::StaleCache(_)) && e.to_string().contains("set_lora"),
            "{e}"
        );
        // A fresh forward works again.
        let cache = forward_saved(&layer, &c, &d, &mut out);
        backward_owned(&layer, &cache, &d, &mut gh, &mut gw).unwrap();
    }
}

/// A forward with LoRA switched off computes the base experts, and its backward gives
/// the base input gradient and zero LoRA gradients, whatever the layer's LoRA holds.
#[test]
fn forward_without_lora_matches_a_layer_without_lora() {
    let c = Case::new(5, 48, 40, 2, 7, 4);
    let d = make(&c, 5);
    let with = layer_for(&c, &d, Isa::Scalar, 1);
    let base = layer_for(&Case { r: 0, ..c }, &d, Isa::Scalar, 1);
    let (mut o1, mut o2) = (c.out_buf(), c.out_buf());
    let c1 = with
        .forward_with(&d.hidden, c.t, &d.ids, &d.w, c.k, &mut o1, true, false)
        .unwrap()
        .unwrap();
    let c2 = forward_saved(&base, &c, &d, &mut o2);
    assert_eq!(o1, o2);
    assert_eq!(c1.lora_rank(), 0);
    let ((mut gh1, mut gw1), (mut gh2, mut gw2)) = (c.grad_bufs(), c.grad_bufs());
    let l = with.lora().unwrap();
    let mut ext: Vec<Vec<f32>> = crate::lora::LoraMatrix::ALL
        .iter()
        .map(|&m| vec![f32::NAN; l.grad(m).len()])
        .collect();
    let mut it = ext.iter_mut().map(|v| v.as_mut_slice());
    let bufs = [(); 6].map(|_| it.next().unwrap());
    with.backward(
        &c1,
        &d.gout,
        &mut gh1,
        &mut gw1,
        GradTarget::External {
            bufs,
            accumulate: false,
        },
    )
    .unwrap();
    base.backward(&c2, &d.gout, &mut gh2, &mut gw2, GradTarget::Skip)
        .unwrap();
    assert_eq!(gh1, gh2);
    assert_eq!(gw1, gw2);
    assert!(ext.iter().flatten().all(|&v| v == 0.0));
}

/// Sizes whose products overflow, or that no machine holds, are errors, never a wrapped
/// buffer size or an abort.
#[test]
fn impossible_layer_sizes_are_errors() {
    for (e, h, i) in [
        (1 << 20, 1 << 20, 1 << 20),
        (1 << 22, 1 << 22, 1 << 22),
        (1, usize::MAX, 1),
        (2, 1 << 40, 1 << 40),
    ] {
        let cfg = MoeConfig {
            experts: e,
            hidden: h,
            intermediate: i,
        };
        let err = MoeLayer::new_empty(cfg, None, Isa::Scalar, 1, 0)
            .err()
            .expect("refused");
        assert!(
            matches!(
                err,
                KtrsError::OutOfMemory { .. } | KtrsError::InvalidArgument { .. }
            ),
            "{err}"
        );
    }
    let cfg = MoeConfig {
        experts: 2,
        hidden: 16,
        intermediate: 16,
    };
    for threads in [0, 1 << 20] {
        assert!(MoeLayer::new_empty(cfg, None, Isa::Scalar, threads, 0).is_err());
    }
    let mut layer = MoeLayer::new_empty(cfg, None, Isa::Scalar, 1, 0).unwrap();
    assert!(layer.set_threads(0).is_err() && layer.set_threads(1 << 20).is_err());
    assert_eq!(layer.threads(), 1);
}

// ---- the transposed cache (transposed_cache.rs) ----

/// Output, gradients (input, routing weights as bits) and LoRA gradients (bits) of one
/// training forward and backward.
type Bits = (Vec<u16>, Vec<u16>, Vec<u32>, Vec<Vec<u32>>);

fn train_call(layer: &MoeLayer, c: &Case, d: &Data) -> Bits {
    let mut out = c.out_buf();
    let cache = forward_saved(layer, c, d, &mut out);
    let (mut gh, mut gw) = c.grad_bufs();
    let mut lg: Vec<Vec<f32>> = d.lora.iter().map(|m| vec![f32::NAN; m.len()]).collect();
    {
        let grads = if c.r > 0 {
            let [a, b, cc, dd, e, f] = &mut lg[..] else {
                unreachable!()
            };
            GradTarget::External {
                bufs: [a, b, cc, dd, e, f],
                accumulate: false,
            }
        } else {
            GradTarget::Skip
        };
        layer
            .backward(&cache, &d.gout, &mut gh, &mut gw, grads)
            .unwrap();
    }
    let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<u32>>();
    (out, gh, bits(&gw), lg.iter().map(|v| bits(v)).collect())
}

/// Sets the layer's ISA, AMX through the tile emulation where the CPU lacks it.
fn use_isa(layer: &mut MoeLayer, isa: Isa) {
    if isa == Isa::Amx && Isa::Amx.check_available().is_err() {
        layer.isa = Isa::Amx; // tiles emulated (see isas_with_emulated_amx)
    } else {
        layer.set_isa(isa).unwrap();
    }
}

fn layer_with_budget(c: &Case, d: &Data, isa: Isa, limit: usize) -> MoeLayer {
    let mut l = layer_for(c, d, isa, 2);
    l.set_cache_budget(CacheBudget::with_limit(limit));
    l
}

/// Bytes the cache holds once every expert with more than `KTRS_BWD_DIRECT_ROWS` rows
/// (the ones that take a transposed block) has been through a backward.
fn full_cache_bytes(layer: &MoeLayer, c: &Case, d: &Data) -> usize {
    let direct = crate::tuning::get(crate::tuning::Knob::BwdDirectRows).min(16);
    let per_expert = layer.weight_bytes() / c.e;
    (0..c.e)
        .filter(|&e| d.ids.iter().filter(|&&x| x as usize == e).count() > direct)
        .count()
        * per_expert
}

/// Backward with the cache filled (first call) and used (second call), on every ISA,
/// gives the bits of the per-call repack; a cache filled under one ISA serves another.
#[test]
fn transposed_cache_gives_the_same_bits() {
    let _guard = crate::tuning::test_override_guard();
    for (c, seed) in [
        // ~24 rows per expert: every active expert takes a transposed block.
        (Case::new(5, 70, 45, 2, 48, 4), 31),
        // ~12 rows per expert: some experts take the direct product instead.
        (Case::new(16, 96, 40, 6, 30, 0), 32),
    ] {
        let d = make(&c, seed);
        let mut shared = layer_with_budget(&c, &d, Isa::Scalar, usize::MAX);
        for isa in isas_with_emulated_amx() {
            let tag = format!("{isa} E{} T{}", c.e, c.t);
            let mut off = layer_with_budget(&c, &d, Isa::Scalar, 0);
            let mut on = layer_with_budget(&c, &d, Isa::Scalar, usize::MAX);
            for l in [&mut off, &mut on, &mut shared] {
                use_isa(l, isa);
            }
            let want = train_call(&off, &c, &d);
            assert_eq!(off.transposed_cache_bytes(), 0, "{tag}");
            let full = full_cache_bytes(&on, &c, &d);
            assert!(full > 0, "{tag}: no expert takes a transposed block");
            assert!(train_call(&on, &c, &d) == want, "{tag}: cold cache differs");
            assert_eq!(on.transposed_cache_bytes(), full, "{tag}");
            assert!(train_call(&on, &c, &d) == want, "{tag}: warm cache differs");
            assert_eq!(on.transposed_cache_bytes(), full, "{tag}");
            assert!(
                train_call(&shared, &c, &d) == want,
                "{tag}: cache of another ISA"
            );
        }
    }
}

/// `set_expert` drops that expert's transposed blocks: the next backward equals a fresh
/// layer's with the new weights (with stale blocks, grad_hidden would differ).
#[test]
fn set_expert_invalidates_the_transposed_cache() {
    let _guard = crate::tuning::test_override_guard();
    let c = Case::new(4, 40, 56, 2, 40, 4);
    let d = make(&c, 33);
    let new = make(&c, 34);
    let (e, ih) = (1, c.i * c.h);
    let mut layer = layer_with_budget(&c, &d, Isa::best(), usize::MAX);
    train_call(&layer, &c, &d);
    let before = layer.transposed_cache_bytes();
    assert_eq!(before, full_cache_bytes(&layer, &c, &d));
    let per_expert = layer.weight_bytes() / c.e;
    assert!(d.ids.iter().filter(|&&x| x == e as i64).count() > 8);
    let part = |v: &[u16]| v[e * ih..(e + 1) * ih].to_vec();
    layer
        .set_expert(e, &part(&new.gate), &part(&new.up), &part(&new.down))
        .unwrap();
    assert_eq!(layer.transposed_cache_bytes(), before - per_expert);
    let got = train_call(&layer, &c, &d);
    assert_eq!(layer.transposed_cache_bytes(), before);
    let patch = |old: &[u16], src: &[u16]| {
        let mut v = old.to_vec();
        v[e * ih..(e + 1) * ih].copy_from_slice(&src[e * ih..(e + 1) * ih]);
        v
    };
    let d2 = Data {
        gate: patch(&d.gate, &new.gate),
        up: patch(&d.up, &new.up),
        down: patch(&d.down, &new.down),
        ..d.clone()
    };
    let fresh = layer_with_budget(&c, &d2, Isa::best(), 0);
    assert!(
        got == train_call(&fresh, &c, &d2),
        "stale transposed blocks used"
    );
}

/// A budget too small for one expert's matrix caches nothing, a middling one part of the
/// experts, shared by two layers; results never change, the budget is never exceeded and
/// every byte returns when the layers drop.
#[test]
fn transposed_cache_budget_is_kept_and_returned() {
    let _guard = crate::tuning::test_override_guard();
    let c = Case::new(4, 70, 45, 2, 40, 2);
    let d = make(&c, 35);
    let off = layer_with_budget(&c, &d, Isa::best(), 0);
    let want = train_call(&off, &c, &d);
    let (gu, dn) = (off.gate_up.shape.len() * 2, off.down.shape.len() * 2);
    let smallest = gu.min(dn);
    for limit in [smallest - 1, gu + dn + smallest, usize::MAX] {
        let budget = CacheBudget::with_limit(limit);
        let mut a = layer_for(&c, &d, Isa::best(), 2);
        let mut b = layer_for(&c, &d, Isa::best(), 2);
        a.set_cache_budget(budget.clone());
        b.set_cache_budget(budget.clone());
        for _ in 0..2 {
            assert!(train_call(&a, &c, &d) == want, "limit {limit}");
            assert!(train_call(&b, &c, &d) == want, "limit {limit}");
        }
        let (ua, ub) = (a.transposed_cache_bytes(), b.transposed_cache_bytes());
        assert_eq!(budget.used(), ua + ub);
        assert!(ua + ub <= limit, "limit {limit}: {} held", ua + ub);
        if limit < smallest {
            assert_eq!(ua + ub, 0);
        } else if limit == usize::MAX {
            assert_eq!(ua, full_cache_bytes(&a, &c, &d));
            assert_eq!(ub, ua);
        } else {
            assert!(ua > 0 && ua + ub < 2 * full_cache_bytes(&a, &c, &d));
        }
        drop(a);
        assert_eq!(budget.used(), ub);
        b.clear_transposed_cache();
        assert_eq!((budget.used(), b.transposed_cache_bytes()), (0, 0));
        train_call(&b, &c, &d);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}

/// The process-wide budget follows `KTRS_TRANSPOSED_CACHE_MB`: 0 keeps nothing.
#[test]
fn transposed_cache_knob() {
    use crate::tuning::{get, set, Knob};
    let _guard = crate::tuning::test_override_guard();
    #[cfg(target_os = "linux")]
    assert!(super::transposed_cache_default_mb() > 0);
    let c = Case::new(3, 40, 56, 2, 30, 0);
    let d = make(&c, 36);
    let layer = layer_for(&c, &d, Isa::best(), 2);
    set(Knob::TransposedCacheMb, Some(0));
    assert_eq!(CacheBudget::global().limit(), 0);
    let want = train_call(&layer, &c, &d);
    assert_eq!(layer.transposed_cache_bytes(), 0);
    set(Knob::TransposedCacheMb, Some(1 << 20));
    assert_eq!(get(Knob::TransposedCacheMb), 1 << 20);
    assert!(train_call(&layer, &c, &d) == want);
    assert_eq!(
        layer.transposed_cache_bytes(),
        full_cache_bytes(&layer, &c, &d)
    );
    set(Knob::TransposedCacheMb, None);
}
