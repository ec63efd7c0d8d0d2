"""Activation checkpointing runs the routed experts once per step: the recompute during
backward reuses the first forward's result and Rust cache kept in host memory. Checked
against checkpointing off and against the unpatched model (PEFT + torch experts), for HF's
reentrant and non-reentrant checkpointing, PEFT's path and the Trainer's; the kept forwards
never outlive the step's autograd graph. Every test runs on both paths of training expert
calls: the synchronous one, and the stream path (ktrs/stream_call.py; without CUDA its
host functions run at launch), which keeps the first forward in its staging."""

import copy
import gc
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from torch.utils.checkpoint import checkpoint  # noqa: E402
from transformers import DeepseekV2ForCausalLM  # noqa: E402

import ktrs  # noqa: E402
from ktrs import module as ktrs_module  # noqa: E402
from ktrs import stream_call  # noqa: E402
from ktrs.module import Timer, clear_recompute_caches, live_forward_caches, pending_recomputes  # noqa: E402

from conftest import make_problem, rel_l2  # noqa: E402
from test_finetune import batch, lora_config, patched_peft, randomize_b, reference_like  # noqa: E402
from test_patch_model import DEVICES, bf16_exact, tiny_config  # noqa: E402

MOE_LAYERS = 2  # tiny_config: 3 layers, the first dense
MODES = ["off", "non_reentrant", "reentrant", "peft_non_reentrant", "peft_reentrant"]


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return bf16_exact(DeepseekV2ForCausalLM(tiny_config())).eval()


@pytest.fixture(autouse=True, params=["sync", "stream"])
def path(request, monkeypatch):
    """The test on the synchronous path, or on the stream path; there, no expert call that
    could be stream work (with grad, or a reentrant checkpoint's no-grad first pass) may
    take the synchronous path."""
    stream = request.param == "stream"
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "1" if stream else "0")
    monkeypatch.setattr(stream_call, "INLINE_CPU", stream)
    sync_calls = []
    orig_fn, orig_future = ktrs_module.experts_function, ktrs_module.ExpertsFuture.__init__

    def counted(*a, **k):
        if torch.is_grad_enabled() or ktrs_module._reentrant_checkpoint_owner() is not None:
            sync_calls.append(1)
        return orig_fn(*a, **k)

    def future(*a, **k):
        if ktrs_module._reentrant_checkpoint_owner() is not None:  # else no-grad inference
            sync_calls.append(1)
        return orig_future(*a, **k)

    monkeypatch.setattr(ktrs_module, "experts_function", counted)
    monkeypatch.setattr(ktrs_module.ExpertsFuture, "__init__", future)
    yield request.param
    if stream:
        assert not sync_calls, "an expert call took the synchronous path"


@pytest.fixture(autouse=True)
def no_kept_forwards(path):
    """Every test starts and ends without kept forwards or live caches."""
    gc.collect()
    assert live_forward_caches() == 0 and pending_recomputes() == 0
    yield
    gc.collect()
    stream_call.synchronize()
    assert live_forward_caches() == 0 and pending_recomputes() == 0


def model_in_mode(base, mode, seed=31, device="cpu"):
    """A patched PEFT model in training mode with checkpointing as `mode` says; the same
    LoRA values for every mode (PEFT draws A from torch's generator)."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if mode.startswith("peft_"):
            # Checkpointing switched on before PEFT wraps the model: PeftModel's own
            # preparation for it (enable_input_require_grads) runs.
            model = ktrs.patch_model(copy.deepcopy(base), device=device, threads=2)
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "peft_reentrant"})
            pm = ktrs.get_peft_model(model, lora_config())
            randomize_b(pm, seed)  # as patched_peft does
        else:
            pm = patched_peft(base, seed=seed, device=device)
            if mode != "off":
                pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": mode == "reentrant"})
    pm.train()
    return pm


def grads(pm):
    return {n: p.grad.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def step_counts():
    t = Timer.global_()
    return t.forwards, t.backwards, t.reused


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", MODES)
def test_one_expert_forward_per_layer_and_the_same_loss_and_gradients(base, mode, device):
    off = model_in_mode(base, "off", device=device)
    ref = reference_like(off, base, device)  # before any step: the same LoRA values
    b = batch(seed=9, device=device)
    off_loss = off(**b).loss
    off_loss.backward()
    ref_loss = ref(**b).loss
    ref_loss.backward()

    pm = model_in_mode(base, mode, device=device)
    Timer.global_().reset()
    loss = pm(**b).loss
    assert step_counts() == (MOE_LAYERS, 0, 0)
    loss.backward()
    # One expert forward and one backward per MoE layer; with checkpointing the recompute
    # of every MoE layer was served from the kept forward.
    assert step_counts() == (MOE_LAYERS, MOE_LAYERS, 0 if mode == "off" else MOE_LAYERS)
    assert pending_recomputes() == 0 and live_forward_caches() == 0

    # The same computation; on CUDA some GPU backward kernels accumulate in varying order.
    same = 1e-6 if device == "cpu" else 1e-5
    assert abs(loss.item() - off_loss.item()) <= same * abs(off_loss.item())
    assert abs(loss.item() - ref_loss.item()) < 1e-2 * abs(ref_loss.item())
    got, want = grads(pm), grads(off)
    ref_params = dict(ref.named_parameters())
    assert got.keys() == want.keys() and any(".lora_experts." in n for n in got)
    for n, g in got.items():
        assert rel_l2(g, want[n]) < same, n
        if ".lora_experts." in n:
            layer_path, name = n.split(".mlp.experts.lora_experts.")
            r = ref_params[f"{layer_path}.mlp.experts.ref_lora.{name}"].grad
        else:
            r = ref_params[n].grad
        assert rel_l2(g.cpu(), r.cpu()) < 3e-2, n


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_several_forwards_before_one_backward(base, mode):
    """Two micro-batches (one of them twice, identical inputs) summed into one loss: each
    recompute finds its own first pass, whatever order backward visits them in."""
    b1, b2 = batch(seed=9), batch(seed=10)
    off = model_in_mode(base, "off")
    (off(**b1).loss + 0.5 * off(**b2).loss + off(**b1).loss).backward()
    pm = model_in_mode(base, mode)
    Timer.global_().reset()
    (pm(**b1).loss + 0.5 * pm(**b2).loss + pm(**b1).loss).backward()
    assert step_counts() == (3 * MOE_LAYERS, 3 * MOE_LAYERS, 3 * MOE_LAYERS)
    want = grads(off)
    for n, g in grads(pm).items():
        assert rel_l2(g, want[n]) < 1e-6, n


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_gradient_accumulation(base, mode):
    off, pm = model_in_mode(base, "off"), model_in_mode(base, mode)
    Timer.global_().reset()
    for seed in (9, 10, 11):
        off(**batch(seed=seed)).loss.backward()
        pm(**batch(seed=seed)).loss.backward()
        assert pending_recomputes() == 0
    assert Timer.global_().reused == 3 * MOE_LAYERS
    want = grads(off)
    for n, g in grads(pm).items():
        assert rel_l2(g, want[n]) < 1e-6, n


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_forwards_without_backward_keep_nothing(base, mode):
    pm = model_in_mode(base, mode)
    b = batch(seed=9)
    # Inference in training mode: no graph, nothing kept (not even transiently counted).
    with torch.no_grad():
        pm(**b)
    assert live_forward_caches() == 0 and pending_recomputes() == 0
    # A forward with autograd whose backward never comes (evaluation inside training):
    # the kept forwards belong to its graph and go with it.
    out = pm(**b).loss
    assert pending_recomputes() == MOE_LAYERS and live_forward_caches() == MOE_LAYERS
    del out
    assert live_forward_caches() == 0 and pending_recomputes() == 0  # no GC needed
    # Evaluation mode: HF does not checkpoint, no cache is made.
    pm.eval()
    with torch.no_grad():
        pm(**b)
    assert live_forward_caches() == 0


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_second_backward_with_retain_graph(base, mode):
    """The kept forward serves the first backward; a second one (retain_graph) recomputes."""
    b = batch(seed=9)
    off, pm = model_in_mode(base, "off"), model_in_mode(base, mode)
    loss = off(**b).loss
    loss.backward(retain_graph=True)
    loss.backward()
    Timer.global_().reset()
    loss = pm(**b).loss
    loss.backward(retain_graph=True)
    loss.backward()
    assert step_counts() == (2 * MOE_LAYERS, 2 * MOE_LAYERS, MOE_LAYERS)
    want = grads(off)
    for n, g in grads(pm).items():
        assert rel_l2(g, want[n]) < 1e-6, n
    del loss


class Boom(Exception):
    pass


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_aborted_steps_leak_nothing(base, mode):
    pm = model_in_mode(base, mode)
    b = batch(seed=9)
    layer2 = pm.base_model.model.model.layers[2]

    def fail(*_):
        raise Boom()

    # Fails in the forward after layer 1's experts ran and kept their forward.
    h = layer2.register_forward_pre_hook(fail)
    with pytest.raises(Boom):
        pm(**b)
    h.remove()
    gc.collect()
    assert live_forward_caches() == 0 and pending_recomputes() == 0
    # Fails in the backward, before the recomputes ran.
    loss = pm(**b).loss
    loss.register_hook(fail)
    with pytest.raises(Boom):
        loss.backward()
    del loss
    gc.collect()
    assert live_forward_caches() == 0 and pending_recomputes() == 0
    # The next step is whole and correct.
    pm.zero_grad(set_to_none=True)
    Timer.global_().reset()
    pm(**b).loss.backward()
    assert step_counts() == (MOE_LAYERS, MOE_LAYERS, MOE_LAYERS)


def one_layer(seed=3):
    p = make_problem(E=8, H=32, I=24, k=2, T=10, r=4, seed=seed)
    mod = ktrs.KtrsExperts.from_weights(p.gate, p.up, p.down, lora_rank=p.rank, lora_alpha=p.alpha, threads=2)
    for n, t in p.lora.items():
        mod.experts.set_lora_weight(n, t)
    mod.train()
    return p, mod


@pytest.mark.parametrize("reentrant", [False, True])
def test_recompute_with_other_inputs_runs_the_kernels(reentrant):
    """A recompute that does not see the first pass's inputs is never served the kept output."""
    p, mod = one_layer()
    calls = []

    def f(h):
        calls.append(1)
        scale = 1.0 if len(calls) == 1 else 2.0  # the recompute sees other inputs
        # sin saves the expert output, so backward unpacks it and recomputes.
        return mod(h * scale, p.ids, p.weights).float().sin()

    g = p.grad_out.float()
    h = p.hidden.float().requires_grad_(True)
    Timer.global_().reset()
    checkpoint(f, h, use_reentrant=reentrant).backward(g)
    assert step_counts() == (2, 1, 0)
    h2 = p.hidden.float().requires_grad_(True)
    if reentrant:  # backward follows the recomputed graph: inputs 2h throughout
        mod(h2 * 2.0, p.ids, p.weights).float().sin().backward(g)
    else:  # the first forward's graph (h), with sin's saved tensor from the recompute (2h)
        with torch.no_grad():
            c = mod(p.hidden.float() * 2.0, p.ids, p.weights).float().cos()
        mod(h2, p.ids, p.weights).float().backward(c * g)
    assert torch.equal(h.grad, h2.grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_recompute_after_the_layer_changed_runs_the_kernels(reentrant):
    p, mod = one_layer()
    h = p.hidden.float().requires_grad_(True)
    Timer.global_().reset()
    out = checkpoint(lambda x: mod(x, p.ids, p.weights).float().sin(), h, use_reentrant=reentrant)
    with torch.no_grad():
        mod.lora["down_B"].mul_(0.5)  # in place, as an optimizer would (between forward and backward)
    out.backward(p.grad_out.float())
    assert step_counts() == (2, 1, 0)
    del out
    mod.experts.set_lora_weight("gate_A", p.lora["gate_A"] * 2)  # through Rust: no torch version bump
    out = checkpoint(lambda x: mod(x, p.ids, p.weights).float().sin(), h, use_reentrant=reentrant)
    mod.experts.set_lora_weight("gate_A", p.lora["gate_A"])
    out.backward(p.grad_out.float())
    assert step_counts() == (4, 2, 0)
    del out
    # ktrs' AdamW writes the LoRA in Rust; it bumps the parameters' version counters.
    opt = ktrs.optim.AdamW(mod.parameters(), lr=1e-2)
    out = checkpoint(lambda x: mod(x, p.ids, p.weights).float().sin(), h, use_reentrant=reentrant)
    versions = [q._version for q in mod.parameters()]
    opt.step()
    assert all(q._version > v for q, v in zip(mod.parameters(), versions))
    out.backward(p.grad_out.float())
    assert step_counts() == (6, 3, 0)


def test_the_cache_limit_and_clear_fall_back_to_recomputing(base, monkeypatch):
    b = batch(seed=9)
    off = model_in_mode(base, "off")
    off(**b).loss.backward()
    want = grads(off)
    for how in ("limit", "clear"):
        pm = model_in_mode(base, "non_reentrant")
        Timer.global_().reset()
        if how == "limit":
            monkeypatch.setenv("KTRS_RECOMPUTE_CACHE_MB", "0")
        loss = pm(**b).loss
        if how == "clear":
            assert pending_recomputes() == MOE_LAYERS
            clear_recompute_caches()
        assert pending_recomputes() == 0
        loss.backward()
        monkeypatch.delenv("KTRS_RECOMPUTE_CACHE_MB", raising=False)
        assert step_counts() == (2 * MOE_LAYERS, MOE_LAYERS, 0)
        for n, g in grads(pm).items():
            assert rel_l2(g, want[n]) < 1e-6, (how, n)
        del loss


def test_bad_cache_limit_is_a_ktrs_error(base, monkeypatch):
    pm = model_in_mode(base, "non_reentrant")
    monkeypatch.setenv("KTRS_RECOMPUTE_CACHE_MB", "lots")
    with pytest.raises(ktrs.KtrsValueError, match="KTRS_RECOMPUTE_CACHE_MB"):
        pm(**batch(seed=9))


def test_submitted_first_pass_is_kept_too():
    """The no-grad first pass of a reentrant checkpoint may go through ``submit`` (as the
    MoE block does for CUDA inputs); its recompute reuses it as well."""
    p, mod = one_layer()

    def f(h):
        if torch.is_grad_enabled():
            return mod(h, p.ids, p.weights)
        return mod.submit(h, p.ids, p.weights).result()

    h = p.hidden.float().requires_grad_(True)
    Timer.global_().reset()
    checkpoint(f, h, use_reentrant=True).float().backward(p.grad_out.float())
    assert step_counts() == (1, 1, 1)
    h2 = p.hidden.float().requires_grad_(True)
    mod(h2, p.ids, p.weights).float().backward(p.grad_out.float())
    assert torch.equal(h.grad, h2.grad)


@pytest.mark.parametrize("reentrant", [False, True])
def test_hf_trainer_with_gradient_checkpointing(base, tmp_path, reentrant):
    from transformers import Trainer, TrainingArguments

    data = [{k: v[0] for k, v in batch(seed=s, n=1, t=12).items()} for s in range(8)]
    result = {}
    for ckpt in (False, True):
        pm = model_in_mode(base, "off", seed=5)
        args = TrainingArguments(
            output_dir=str(tmp_path / str(ckpt)), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=3,
            learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
            gradient_checkpointing=ckpt, gradient_checkpointing_kwargs={"use_reentrant": reentrant} if ckpt else None,
        )
        Timer.global_().reset()
        Trainer(model=pm, args=args, train_dataset=data, optimizer_cls_and_kwargs=ktrs.optim.from_args(args)).train()
        micro = 3 * 2
        assert step_counts() == (micro * MOE_LAYERS, micro * MOE_LAYERS, micro * MOE_LAYERS if ckpt else 0)
        result[ckpt] = {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}
    for n, w in result[False].items():
        assert rel_l2(result[True][n], w) < 1e-6, n


@pytest.mark.parametrize("family", ["qwen3_moe", "mixtral"])
@pytest.mark.parametrize("reentrant", [False, True])
def test_families_without_shared_experts(family, reentrant):
    """Without shared experts the experts' backward runs before the router's, whose
    unpacking recomputes the layer: the kept output must still be there."""
    from tiny_families import mixtral
    from tiny_families import qwen3_moe as qwen3

    torch.manual_seed(0)
    stock = bf16_exact({"qwen3_moe": qwen3, "mixtral": mixtral}[family]())
    ids = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    result = {}
    for ckpt in (False, True):
        model = ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2, lora_rank=4, seed=3)
        with torch.no_grad():
            for p in ktrs.expert_lora_parameters(model):
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(p.numel()))
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        Timer.global_().reset()
        model(input_ids=ids, labels=ids).loss.backward()
        assert step_counts() == (2, 2, 2 if ckpt else 0)
        result[ckpt] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert any(".lora_experts." in n for n in result[False])
    for n, g in result[False].items():
        assert rel_l2(result[True][n], g) < 1e-6, n


@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_bf16_model(base, mode):
    """A bf16 model on the CPU hands the experts its own hidden states (no copy) and gets
    their output tensor back as is: the kept forward aliases model activations."""
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    b = batch(seed=9)
    result = {}
    for m in ("off", mode):
        pm = model_in_mode(bf16, m)
        Timer.global_().reset()
        pm(**b).loss.backward()
        assert step_counts() == (MOE_LAYERS, MOE_LAYERS, 0 if m == "off" else MOE_LAYERS)
        result[m] = grads(pm)
    for n, g in result["off"].items():
        assert rel_l2(result[mode][n], g) < 1e-6, n
