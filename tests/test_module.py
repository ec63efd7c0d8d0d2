"""KtrsExperts: autograd, zero-copy LoRA parameters, and what device/dtype moves do."""

import warnings

import pytest
import torch
from torch import nn

import ktrs
from ktrs.experts import LORA_NAMES

from conftest import build, make_problem, reference, rel_l2


def module_for(p, **kw):
    return ktrs.KtrsExperts(build(p, **kw))


def test_autograd_matches_float64_reference(isa):
    # failure-modes row 2: expert-LoRA gradients are float32 (the one documented dtype), bf16 kernel inside.
    p = make_problem(E=8, H=64, I=48, k=3, T=11, r=4, seed=21)
    m = module_for(p, isa=isa)
    x = p.hidden.float().requires_grad_(True)  # fp32 in, fp32 out: the module converts
    w = p.weights.clone().requires_grad_(True)
    out = m(x, p.ids, w)
    assert out.dtype == torch.float32
    out.backward(p.grad_out.float())
    ref = reference(p)
    assert rel_l2(out, ref["out"]) < 1e-2
    assert rel_l2(x.grad, ref["grad_hidden"]) < 1e-2
    assert rel_l2(w.grad, ref["grad_weights"]) < 1e-2
    for n in LORA_NAMES:
        assert m.lora[n].grad is not None and m.lora[n].grad.dtype == torch.float32
        assert rel_l2(m.lora[n].grad, ref[f"grad_{n}"]) < 1e-2, n


def test_gradients_accumulate_over_two_backward_calls():
    p = make_problem(E=6, H=48, I=32, k=2, T=8, r=4, seed=22)
    q = make_problem(E=6, H=48, I=32, k=2, T=5, r=4, seed=23)
    q.gate, q.up, q.down, q.lora = p.gate, p.up, p.down, p.lora
    m = module_for(p)
    for prob in (p, q):  # two micro-batches, one optimizer step
        m(prob.hidden, prob.ids, prob.weights).backward(prob.grad_out)
    rp, rq = reference(p), reference(q)
    for n in LORA_NAMES:
        assert rel_l2(m.lora[n].grad, rp[f"grad_{n}"] + rq[f"grad_{n}"]) < 1e-2, n


def test_lora_parameters_are_the_rust_buffers():
    # failure-modes row 1: the parameters' storage is the Rust buffer the kernel reads.
    p = make_problem(E=4, H=32, I=32, k=2, T=6, r=4, seed=24)
    m = module_for(p)
    for n in LORA_NAMES:
        assert m.lora[n].data_ptr() == m.experts.lora_weight(n).data_ptr()
    # A write from Python changes the next forward.
    with torch.no_grad():
        m.lora["down_B"].mul_(3.0)
    p.lora["down_B"] = p.lora["down_B"] * 3.0
    assert rel_l2(m(p.hidden, p.ids, p.weights), reference(p)["out"]) < 1e-2


def test_optimizer_step_changes_next_forward_as_expected():
    p = make_problem(E=4, H=32, I=32, k=2, T=6, r=4, seed=25)
    m = module_for(p)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    out = m(p.hidden, p.ids, p.weights)
    out.backward(p.grad_out)
    ref = reference(p)
    opt.step()
    stepped = {n: p.lora[n] - 0.5 * ref[f"grad_{n}"].float() for n in LORA_NAMES}
    for n in LORA_NAMES:
        assert rel_l2(m.experts.lora_weight(n), stepped[n]) < 1e-2
    assert rel_l2(m(p.hidden, p.ids, p.weights), reference(p, stepped)["out"]) < 1e-2


def test_adamw_and_zero_grad_set_to_none_keep_training_expert_lora():
    # failure-modes row 10: with zero_grad(set_to_none=True) gradients must still reach the
    # optimizer through autograd, and every expert that got tokens must change.
    p = make_problem(E=8, H=32, I=32, k=2, T=16, r=4, seed=26, used_experts=6)
    m = module_for(p)
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    before = {n: m.lora[n].detach().clone() for n in LORA_NAMES}
    for _ in range(3):
        opt.zero_grad(set_to_none=True)
        m(p.hidden, p.ids, p.weights).float().pow(2).mean().backward()
        opt.step()
    for n in LORA_NAMES:
        changed = (m.experts.lora_weight(n) - before[n]).flatten(1).abs().amax(1) > 0
        assert changed[:6].all(), n  # experts that received tokens
        # AdamW weight decay also touches idle experts; their A/B stay finite.
        assert torch.isfinite(m.experts.lora_weight(n)).all()


@pytest.mark.parametrize(
    "move",
    [
        lambda mod: mod.to(torch.float16),
        lambda mod: mod.half(),
        lambda mod: mod.float(),
        lambda mod: mod.double(),
        lambda mod: mod.to(torch.bfloat16),
        lambda mod: mod.to("cpu"),
        lambda mod: mod.cuda() if torch.cuda.is_available() else mod.to("meta"),
    ],
    ids=["to-fp16", "half", "float", "double", "to-bf16", "to-cpu", "cuda-or-meta"],
)
def test_moving_or_casting_a_parent_module_does_not_detach_lora(move):
    # failure-modes row 1: the Trainer's model.to(device) must not reach the kernel's memory.
    p = make_problem(E=4, H=32, I=32, k=2, T=6, r=4, seed=27)
    parent = nn.Sequential(nn.Linear(4, 4))
    parent.experts = module_for(p)
    ptrs = {n: parent.experts.experts.lora_weight(n).data_ptr() for n in LORA_NAMES}
    move(parent)
    for n in LORA_NAMES:
        prm = parent.experts.lora[n]
        assert prm.device.type == "cpu" and prm.dtype == torch.float32 and prm.data_ptr() == ptrs[n]
    # Still trains: an optimizer step on the expert LoRA changes the kernel's output.
    opt = torch.optim.SGD(parent.experts.parameters(), lr=1.0)
    out0 = parent.experts(p.hidden, p.ids, p.weights)
    out0.float().sum().backward()
    opt.step()
    out1 = parent.experts(p.hidden, p.ids, p.weights)
    assert not torch.equal(out0, out1)


def test_rebinding_parameter_data_is_detected_and_restored():
    # failure-modes row 1: a rebound storage is detected before the next kernel call.
    p = make_problem(E=4, H=32, I=32, k=2, T=6, r=4, seed=28)
    m = module_for(p)
    view_ptr = m.experts.lora_weight("up_B").data_ptr()
    m.lora["up_B"].data = m.lora["up_B"].data.to(torch.float64) * 2  # e.g. a careless cast
    p.lora["up_B"] = p.lora["up_B"] * 2
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        out = m(p.hidden, p.ids, p.weights)
    assert any("storage of expert LoRA parameter 'up_B'" in str(w.message) for w in rec)
    assert m.lora["up_B"].data_ptr() == view_ptr and m.lora["up_B"].dtype == torch.float32
    assert rel_l2(out, reference(p)["out"]) < 1e-2


@pytest.mark.parametrize(
    "replace",
    [lambda t: t.transpose(1, 2).clone(), lambda t: t.reshape(-1).clone(), lambda t: t[:2].clone(), lambda t: t.to(torch.complex64)],
    ids=["transposed", "flattened", "fewer-experts", "complex"],
)
def test_rebinding_to_a_tensor_that_cannot_be_restored_is_a_clear_error(replace):
    # failure-modes row 1: a replaced storage that cannot be copied back as it is (same
    # shape, real values) is refused, naming the parameter; it was reshaped into the
    # kernel's memory (scrambled values) or failed inside torch.
    p = make_problem(E=4, H=32, I=32, k=2, T=6, r=4, seed=28)
    m = module_for(p)
    m.where = "model.layers.3.mlp.experts"
    kept = m.experts.lora_weight("up_B").clone()
    m.lora["up_B"].data = replace(m.lora["up_B"].data)
    with pytest.raises(ktrs.KtrsValueError, match=r"expert LoRA parameter 'up_B' in model\.layers\.3\.mlp\.experts was replaced"):
        m(p.hidden, p.ids, p.weights)
    assert torch.equal(m.experts.lora_weight("up_B"), kept)  # the kernel's memory is untouched
    m.lora["up_B"].data = m.experts.lora_weight("up_B")  # the view back: runs as before
    assert rel_l2(m(p.hidden, p.ids, p.weights), reference(p)["out"]) < 1e-2


def test_views_outlive_the_layer_and_drop_order_never_crashes():
    p = make_problem(E=4, H=32, I=32, k=2, T=6, r=4, seed=29)
    ex = build(p)
    view = ex.lora_weight("gate_A")
    grad_view = ex.lora_grad("down_B")
    _, handle = ex.forward(p.hidden, p.ids, p.weights, save_for_backward=True)
    expected = p.lora["gate_A"].clone()
    del ex
    import gc

    gc.collect()
    assert torch.equal(view, expected)  # memory kept alive by the view
    view.add_(1.0)
    assert grad_view.abs().sum() == 0
    del handle, view, grad_view
    gc.collect()
    m = module_for(p)
    out = m(p.hidden, p.ids, p.weights)
    del m
    gc.collect()
    out.float().sum().backward() if out.requires_grad else None


def test_module_keeps_input_device_and_dtype_and_signature():
    p = make_problem(E=4, H=32, I=32, k=2, T=6, r=0, seed=30)
    m = module_for(p)
    assert len(list(m.parameters())) == 0
    out = m(p.hidden.to(torch.float16), p.ids.to(torch.int32), p.weights.to(torch.float64))
    assert out.dtype == torch.float16 and out.shape == (6, 32)
    assert rel_l2(out, reference(p)["out"]) < 1e-2


def test_non_finite_guard_names_layer_and_experts():
    # failure-modes row 3: the non-finite guard is on in training and names layer and experts.
    p = make_problem(E=4, H=32, I=32, k=2, T=6, r=4, seed=31)
    m = module_for(p)
    m.where = "model.layers.3.mlp.experts"
    with torch.no_grad():
        m.lora["down_B"][2].fill_(float("inf"))  # expert 2 now produces Inf
    uses_2 = (p.ids == 2).any(1)
    assert uses_2.any()
    x = p.hidden.float().requires_grad_(True)
    with pytest.raises(FloatingPointError, match=r"model\.layers\.3\.mlp\.experts.*experts \[.*2"):
        m(x, p.ids, p.weights)
    m.check_finite = False  # off on request: the Inf shows in the output instead
    out = m(x, p.ids, p.weights)
    assert not torch.isfinite(out[uses_2]).all()
    with torch.no_grad():
        m.lora["down_B"][2].zero_()
    m.check_finite = None
    out = m(x, p.ids, p.weights)
    with pytest.raises(FloatingPointError, match="grad_output at token 0"):  # caught at the boundary
        out.backward(torch.full_like(out, float("nan")))
    out = m(x, p.ids, p.weights)
    with pytest.raises(FloatingPointError, match=r"non-finite (input gradient|gradient of expert LoRA) in model\.layers\.3"):
        out.backward(torch.full_like(out, 3e38))  # finite, but overflows inside


def test_finite_guard_flags_nan_and_inf_and_never_finite_overflow():
    from ktrs.module import NonFiniteError, _all_finite, _guard_rows

    ids = torch.zeros(4, 2, dtype=torch.int64)
    ok = torch.randn(4, 8).bfloat16()
    assert _all_finite(ok)
    _guard_rows(ok, "layer", "output", ids)
    huge = torch.full((4, 8), 3e38).bfloat16()  # finite; its float32 sum overflows
    assert not _all_finite(huge)  # the quick test defers ...
    _guard_rows(huge, "layer", "output", ids)  # ... and the exact one finds nothing
    for bad in (float("nan"), float("inf"), -float("inf")):
        t = ok.clone()
        t[2, 5] = bad
        assert not _all_finite(t)
        with pytest.raises(NonFiniteError, match=r"tokens \[2\]"):
            _guard_rows(t, "layer", "output", ids)
    both = ok.clone()
    both[0, 0], both[3, 1] = float("inf"), -float("inf")  # opposite infinities: NaN sum
    assert not _all_finite(both)
