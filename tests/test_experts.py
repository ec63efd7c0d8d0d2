"""MoeExperts (low level) and KtrsExperts (autograd) against a float64 torch reference,
on every ISA this machine has."""

import gc
import queue

import pytest
import torch

import ktrs
from ktrs.experts import LORA_NAMES

from conftest import build, make_problem, reference, rel_l2

SHAPES = [
    dict(E=8, H=64, I=48, k=2, T=7, r=4),
    dict(E=16, H=130, I=97, k=6, T=33, r=8),  # sizes not multiples of 16/32
    dict(E=64, H=96, I=40, k=8, T=20, r=2),  # many experts, k = 8, most experts idle
    dict(E=1, H=32, I=32, k=1, T=1, r=16),
    dict(E=4, H=48, I=32, k=3, T=600, r=0),  # many tokens, no LoRA
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "E{E}-H{H}-I{I}-k{k}-T{T}-r{r}".format(**s))
def test_forward_and_all_gradients_match_float64(isa, shape):
    p = make_problem(**shape, seed=1)
    ex = build(p, isa=isa)
    assert ex.isa == isa
    out, handle = ex.forward(p.hidden, p.ids, p.weights, save_for_backward=True)
    ref = reference(p)
    assert out.dtype == torch.bfloat16 and out.shape == p.hidden.shape
    assert rel_l2(out, ref["out"]) < 1e-2
    n = len(LORA_NAMES) if p.rank else 0
    grads = [torch.full(ex.lora_shape(nm), float("nan")) for nm in LORA_NAMES[:n]] if n else None
    gh, gw = ex.backward(handle, p.grad_out, lora_grads=grads)
    assert rel_l2(gh, ref["grad_hidden"]) < 1e-2
    assert rel_l2(gw, ref["grad_weights"]) < 1e-2
    for nm, g in zip(LORA_NAMES[:n], grads or []):
        assert torch.isfinite(g).all(), nm
        assert rel_l2(g, ref[f"grad_{nm}"]) < 1e-2, nm


def test_awkward_wide_shape_h2050_i1407():
    p = make_problem(E=4, H=2050, I=1407, k=2, T=5, r=8, seed=2)
    ex = build(p)
    out, handle = ex.forward(p.hidden, p.ids, p.weights, save_for_backward=True)
    ref = reference(p)
    assert rel_l2(out, ref["out"]) < 1e-2
    gh, gw = ex.backward(handle, p.grad_out)
    assert rel_l2(gh, ref["grad_hidden"]) < 1e-2
    assert rel_l2(gw, ref["grad_weights"]) < 1e-2
    for nm in LORA_NAMES:
        assert rel_l2(ex.lora_grad(nm), ref[f"grad_{nm}"]) < 1e-2, nm


def test_isas_agree_and_threads_do_not_change_results():
    p = make_problem(E=8, H=80, I=56, k=3, T=25, r=4, seed=3)
    outs = {}
    for isa in ktrs.info()["available_isas"]:
        for threads in (1, 2, 3):
            ex = build(p, isa=isa, threads=threads)
            outs[(isa, threads)] = ex.forward(p.hidden, p.ids, p.weights)[0]
    for (isa, threads), o in outs.items():
        # Each output element is computed by one task in a fixed order: bitwise equal.
        assert torch.equal(o, outs[(isa, 1)]), (isa, threads)
        assert rel_l2(o, outs[("scalar", 1)]) < 1e-2
    if ktrs.info()["available_isas"] == ["scalar"]:
        pytest.skip("only the scalar kernels run here: no other ISA to compare them with")


def test_layer_owned_gradients_accumulate_and_zero():
    p = make_problem(E=6, H=40, I=24, k=2, T=9, r=4, seed=4)
    ex = build(p)
    _, h = ex.forward(p.hidden, p.ids, p.weights, save_for_backward=True)
    ex.backward(h, p.grad_out)
    once = {n: ex.lora_grad(n).clone() for n in LORA_NAMES}
    ex.backward(h, p.grad_out)
    ref = reference(p)
    for n in LORA_NAMES:
        assert rel_l2(once[n], ref[f"grad_{n}"]) < 1e-2
        torch.testing.assert_close(ex.lora_grad(n), 2 * once[n], rtol=1e-5, atol=1e-6)
    ex.zero_lora_grads()
    assert all(ex.lora_grad(n).abs().sum() == 0 for n in LORA_NAMES)


def test_external_grads_accumulate_flag():
    p = make_problem(E=5, H=32, I=32, k=2, T=6, r=2, seed=5)
    ex = build(p)
    _, h = ex.forward(p.hidden, p.ids, p.weights, save_for_backward=True)
    grads = [torch.ones(ex.lora_shape(n)) for n in LORA_NAMES]
    ex.backward(h, p.grad_out, lora_grads=grads, accumulate=True)
    ref = reference(p)
    for n, g in zip(LORA_NAMES, grads):
        assert rel_l2(g - 1, ref[f"grad_{n}"]) < 1e-2


def test_experts_without_tokens_get_zero_lora_gradients():
    p = make_problem(E=16, H=32, I=32, k=2, T=10, r=2, seed=6, used_experts=4)
    ex = build(p)
    _, h = ex.forward(p.hidden, p.ids, p.weights, save_for_backward=True)
    grads = [torch.full(ex.lora_shape(n), 7.0) for n in LORA_NAMES]
    ex.backward(h, p.grad_out, lora_grads=grads)
    for g in grads:
        assert g[4:].abs().sum() == 0 and g[:4].abs().sum() > 0


def test_interleaved_forwards_keep_their_own_caches():
    p = make_problem(E=8, H=48, I=32, k=2, T=12, r=4, seed=7)
    q = make_problem(E=8, H=48, I=32, k=2, T=5, r=4, seed=8)
    ex = build(p)
    _, h1 = ex.forward(p.hidden, p.ids, p.weights, save_for_backward=True)
    _, h2 = ex.forward(q.hidden, q.ids, q.weights, save_for_backward=True)  # e.g. a recompute
    gh1, gw1 = ex.backward(h1, p.grad_out, lora_grads=[torch.empty(ex.lora_shape(n)) for n in LORA_NAMES])
    ref = reference(p)
    assert rel_l2(gh1, ref["grad_hidden"]) < 1e-2 and rel_l2(gw1, ref["grad_weights"]) < 1e-2
    gh2, _ = ex.backward(h2, q.grad_out)
    q.gate, q.up, q.down, q.lora = p.gate, p.up, p.down, p.lora  # same layer
    assert rel_l2(gh2, reference(q)["grad_hidden"]) < 1e-2


def test_handle_from_another_layer_is_refused():
    p = make_problem(E=4, H=32, I=32, k=1, T=3, r=2, seed=9)
    a, b = build(p), build(p)
    _, h = a.forward(p.hidden, p.ids, p.weights, save_for_backward=True)
    with pytest.raises(ktrs.KtrsError, match="another layer"):
        b.backward(h, p.grad_out)


def test_build_empty_then_set_experts_matches_and_round_trips():
    p = make_problem(E=3, H=40, I=24, k=1, T=4, r=0, seed=10)
    full = build(p)
    empty = ktrs.MoeExperts.empty(3, 40, 24, threads=2)
    for e in range(3):
        g, u, d = full.get_expert(e)
        assert torch.equal(g, p.gate[e]) and torch.equal(u, p.up[e]) and torch.equal(d, p.down[e])
        empty.set_expert(e, g, u, d)
    assert torch.equal(full.forward(p.hidden, p.ids, p.weights)[0], empty.forward(p.hidden, p.ids, p.weights)[0])
    with pytest.raises(ValueError, match="expert"):
        empty.set_expert(3, p.gate[0], p.up[0], p.down[0])
    with pytest.raises(ValueError, match="gate"):
        empty.set_expert(0, p.gate[0, :5], p.up[0], p.down[0])


def test_lora_init_follows_peft():
    ex = ktrs.MoeExperts(*[torch.zeros(s, dtype=torch.bfloat16) for s in [(4, 24, 64), (4, 24, 64), (4, 64, 24)]], lora_rank=8, lora_alpha=16, seed=3)
    assert ex.lora_scaling == 2.0
    a = ex.lora_weight("gate_A")
    assert a.shape == (4, 8, 64) and a.abs().max() <= 64**-0.5 and a.std() > 0.3 * 64**-0.5 / 3**0.5
    assert ex.lora_weight("down_A").abs().max() <= 24**-0.5
    for n in ("gate_B", "up_B", "down_B"):
        assert ex.lora_weight(n).abs().sum() == 0
    rs = ktrs.MoeExperts(*[torch.zeros(s) for s in [(1, 16, 16), (1, 16, 16), (1, 16, 16)]], lora_rank=4, lora_alpha=8, use_rslora=True)
    assert rs.lora_scaling == pytest.approx(4.0)


def test_deepseek_v2_lite_shape_all_isas():
    # The shape where a peer's scratch-aliasing NaN showed up (E=64, H=2048, I=1408, k=6).
    p = make_problem(E=64, H=2048, I=1408, k=6, T=8, r=8, seed=13)
    ref = reference(p)
    for isa in ktrs.info()["available_isas"]:
        ex = build(p, isa=isa)
        for _ in range(2):  # the second call runs on recycled scratch
            out, h = ex.forward(p.hidden, p.ids, p.weights, save_for_backward=True)
            grads = [torch.empty(ex.lora_shape(n)) for n in LORA_NAMES]
            gh, gw = ex.backward(h, p.grad_out, lora_grads=grads)
            assert rel_l2(out, ref["out"]) < 1e-2, isa
            assert rel_l2(gh, ref["grad_hidden"]) < 1e-2 and rel_l2(gw, ref["grad_weights"]) < 1e-2, isa
            for n, g in zip(LORA_NAMES, grads):
                assert rel_l2(g, ref[f"grad_{n}"]) < 1e-2, (isa, n)


def test_forked_child_computes_the_same():
    # DataLoader workers fork: the child has no worker threads and must still compute,
    # also when the parent had initialised CUDA.
    import multiprocessing as mp

    p = make_problem(E=8, H=64, I=48, k=2, T=9, r=4, seed=14)
    ex = build(p, threads=2)
    want = ex.forward(p.hidden, p.ids, p.weights)[0]
    ctx = mp.get_context("fork")
    q = ctx.Queue()

    def child():
        # After fork, a parent that had initialised CUDA leaves a child where any CUDA
        # query fails (torch's `__dlpack_device__` asks whether a CPU tensor is pinned):
        # simulate that everywhere; ktrs must not need CUDA for CPU tensors.
        def no_cuda(*_a, **_k):
            raise RuntimeError("CUDA error: initialization error (simulated fork after CUDA init)")

        torch.Tensor.is_pinned = no_cuda
        try:
            q.put(ex.forward(p.hidden, p.ids, p.weights)[0].float().numpy())
        except BaseException as e:  # report instead of dying silently
            q.put(repr(e))

    proc = ctx.Process(target=child)
    proc.start()
    try:
        res = q.get(timeout=120)
        assert not isinstance(res, str), f"the forked child raised {res}"
        got = torch.from_numpy(res)
    except queue.Empty:
        proc.join(timeout=10)
        pytest.fail(f"the forked child gave no result (exit code {proc.exitcode})")
    proc.join(timeout=60)
    assert proc.exitcode == 0
    assert torch.equal(got, want.float())


KNOB_SETTINGS = [
    ("KTRS_NB", 2), ("KTRS_NB", 8), ("KTRS_NB", 16), ("KTRS_AMX_KBLOCK", 2),
    ("KTRS_AMX_ROWS_OUTER", 1), ("KTRS_AMX_PF", 4), ("KTRS_AMX_PF_L2", 1), ("KTRS_AMX_PIPELINE", 0),
    ("KTRS_MC", 32), ("KTRS_MC", 200), ("KTRS_AMX_TAIL16", 0),
]


def test_tuning_knobs_change_speed_not_results(isa):
    # Enough rows per expert for AMX tiles and enough panels for wide tasks.
    p = make_problem(E=4, H=256, I=192, k=3, T=300, r=4, seed=11)
    ex = build(p, isa=isa)

    def run():
        out, h = ex.forward(p.hidden, p.ids, p.weights, save_for_backward=True)
        grads = [torch.zeros(ex.lora_shape(n)) for n in LORA_NAMES]
        gh, gw = ex.backward(h, p.grad_out, lora_grads=grads)
        return [out, gh, gw, *grads]

    base = run()
    ref = reference(p)
    assert rel_l2(base[0], ref["out"]) < 1e-2 and rel_l2(base[1], ref["grad_hidden"]) < 1e-2
    before = ktrs.tuning()
    try:
        for name, value in KNOB_SETTINGS:
            ktrs.set_tuning(name, value)
            assert ktrs.tuning()[name] == value
            got = run()
            for i, (a, b) in enumerate(zip(got, base)):
                if i == 2:
                    # grad_topk_weights sums per-task partial dot products: the task
                    # width changes the f32 summation order, nothing else.
                    assert rel_l2(a, b) < 1e-5, (name, value)
                else:
                    assert torch.equal(a, b), (name, value, i)
            ktrs.set_tuning(name, None)
    finally:
        for name in before:
            ktrs.set_tuning(name, None)
    assert ktrs.tuning() == before


def test_set_tuning_rejects_unknown_knob():
    with pytest.raises(ValueError, match="name"):
        ktrs.set_tuning("KTRS_NO_SUCH_KNOB", 1)
