"""The stream path of training expert calls (ktrs/stream_call.py) against the synchronous
path, bit for bit: loss, every LoRA gradient and the weights after AdamW steps with
gradient accumulation; plus the bookkeeping (gradients bound to Rust buffers, staging
reuse, errors raised at the end of backward); and the same under activation checkpointing
(HF's non-reentrant and reentrant flavours, PEFT's), where the recompute is served from
the forward kept in its stage: one expert forward per layer and micro-batch.

On CUDA the real stream path runs (host functions on the current stream). Without CUDA
the same bookkeeping runs with `stream_call.INLINE_CPU` (host functions run at launch)."""

import collections
import copy
import gc
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

import ktrs  # noqa: E402
from ktrs import stream_call  # noqa: E402
from ktrs.experts import LORA_NAMES  # noqa: E402
from ktrs import module as ktrs_module  # noqa: E402
from ktrs.module import Timer, live_forward_caches, pending_recomputes  # noqa: E402
from ktrs.optim import AdamW  # noqa: E402

from test_finetune import base, lora_config, patched_peft, randomize_b  # noqa: E402,F401
from test_patch_model import DEVICES  # noqa: E402

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")
MOE_LAYERS = (1, 2)


@pytest.fixture(autouse=True)
def inline_on_cpu(monkeypatch):
    """CPU models take the stream path too (host functions run at launch)."""
    monkeypatch.setattr(stream_call, "INLINE_CPU", True)
    yield
    gc.collect()


def experts_of(pm, layer):
    return pm.base_model.model.model.layers[layer].mlp.experts


def fresh(base, device, checkpointing=None):
    """A patched PEFT model; the same LoRA values each time (PEFT draws A from torch's
    generator). `checkpointing`: None, "non_reentrant", "reentrant" (HF's switch on the
    PEFT model) or "peft_non_reentrant", "peft_reentrant" (switched on before PEFT wraps
    the model, so PEFT's own preparation runs)."""
    torch.manual_seed(0)
    if checkpointing is None or not checkpointing.startswith("peft_"):
        pm = patched_peft(base, seed=3, device=device)
        if checkpointing is not None:
            pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
        return pm
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = ktrs.patch_model(copy.deepcopy(base), device=device, threads=2)
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "peft_reentrant"})
        pm = ktrs.get_peft_model(model, lora_config())
    g = torch.Generator().manual_seed(3)  # as patched_peft
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if p.requires_grad and ("lora_B" in n or n.endswith("_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm


class SyncCalls:
    """Counts expert calls on the synchronous path that could have been stream work (with
    grad, or a reentrant checkpoint's no-grad first pass)."""

    def __init__(self, monkeypatch):
        self.n = 0
        orig_fn, orig_future = ktrs_module.experts_function, ktrs_module.ExpertsFuture.__init__

        def counted(*a, **k):
            if torch.is_grad_enabled() or ktrs_module._reentrant_checkpoint_owner() is not None:
                self.n += 1
            return orig_fn(*a, **k)

        def future(*a, **k):
            if ktrs_module._reentrant_checkpoint_owner() is not None:  # else no-grad inference
                self.n += 1
            return orig_future(*a, **k)

        monkeypatch.setattr(ktrs_module, "experts_function", counted)
        monkeypatch.setattr(ktrs_module.ExpertsFuture, "__init__", future)


def batch(device, n=2, t=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 160, (n, t), generator=g).to(device)
    return dict(input_ids=ids, labels=ids)


def train(base, device, asynchronous, monkeypatch, opt="ktrs", steps=2, accum=2, checkpointing=None, counts=None):
    """`steps` AdamW steps of `accum` micro-batches; returns losses and input-embedding
    gradients, the parameter gradients before each step and the final trainable weights.
    `counts` (a list) receives the expert (forwards, backwards, reused) of each step."""
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "1" if asynchronous else "0")
    pm = fresh(base, device, checkpointing)
    pm.train()
    Timer.global_().reset()  # patching ran a forward of its own
    params = [p for p in pm.parameters() if p.requires_grad]
    optim = AdamW(params, lr=1e-2, weight_decay=0.01) if opt == "ktrs" else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    losses, grads = [], []
    embed = pm.get_input_embeddings()
    t = Timer.global_()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
            before = (t.forwards, t.backwards, t.reused)
            for micro in range(accum):
                b = batch(device, seed=10 * step + micro)
                # Hidden states as a leaf: their gradient went through every expert backward.
                emb = embed(b["input_ids"]).detach().requires_grad_()
                loss = pm(inputs_embeds=emb, labels=b["labels"]).loss / accum
                loss.backward()
                losses.append(loss.detach().cpu())
                losses.append(emb.grad.cpu())
            torch.nn.utils.clip_grad_norm_(params, 1e9)  # reads every gradient (mixed devices)
            grads.append({n: p.grad.detach().cpu().clone() for n, p in pm.named_parameters() if p.requires_grad})
            optim.step()
            optim.zero_grad(set_to_none=True)
            if counts is not None:
                counts.append(tuple(a - b for a, b in zip((t.forwards, t.backwards, t.reused), before)))
    weights = {n: p.detach().cpu().clone() for n, p in pm.named_parameters() if p.requires_grad}
    return pm, losses, grads, weights


def assert_same(a, b):
    _, la, ga, wa = a
    _, lb, gb, wb = b
    assert all(torch.equal(x, y) for x, y in zip(la, lb))
    for sa, sb in zip(ga, gb):
        assert sa.keys() == sb.keys()
        for n in sa:
            assert torch.equal(sa[n], sb[n]), n
    for n in wa:
        assert torch.equal(wa[n], wb[n]), n


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt", ["ktrs", "torch"])
def test_stream_path_is_bit_identical_to_the_synchronous_one(base, device, opt, monkeypatch):
    sync = train(base, device, False, monkeypatch, opt=opt)
    t = Timer.global_()
    assert t.forwards == t.backwards == 2 * 2 * len(MOE_LAYERS) and t.wait_seconds == 0
    asy = train(base, device, True, monkeypatch, opt=opt)
    assert t.forwards == t.backwards == 2 * 2 * len(MOE_LAYERS)
    assert any("lora_experts" in n for n in asy[2][0])
    assert_same(sync, asy)
    # Expert-LoRA gradients live in the layer's Rust buffers (bound as .grad).
    pm = asy[0]
    ex = experts_of(pm, 1)
    loss = pm(**batch(device)).loss
    loss.backward()
    for n in LORA_NAMES:
        assert ex.lora[n].grad.data_ptr() == ex.experts.lora_grad(n).data_ptr()


@pytest.mark.parametrize("device", DEVICES)
def test_staging_is_reused_across_steps_and_caches_are_freed(base, device, monkeypatch):
    pm, *_ = train(base, device, True, monkeypatch, steps=1, accum=1)
    ex = experts_of(pm, 1)
    pool = stream_call._POOLS[ex]
    before = {k: [id(s) for s in v] for k, v in pool.items()}
    assert sum(len(v) for v in before.values()) == 1
    for seed in range(3):
        pm(**batch(device, seed=seed)).loss.backward()
    assert {k: [id(s) for s in v] for k, v in pool.items()} == before
    gc.collect()
    assert live_forward_caches() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_two_forwards_before_one_backward_and_retain_graph(base, device, monkeypatch):
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "0")
    ref = fresh(base, device).train()
    (ref(**batch(device, seed=1)).loss + ref(**batch(device, seed=2)).loss).backward()
    want = {n: p.grad.cpu().clone() for n, p in ref.named_parameters() if p.requires_grad}
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "1")
    pm = fresh(base, device).train()
    loss = pm(**batch(device, seed=1)).loss + pm(**batch(device, seed=2)).loss
    loss.backward(retain_graph=True)
    got = {n: p.grad.cpu().clone() for n, p in pm.named_parameters() if p.requires_grad}
    for n in want:
        assert torch.equal(want[n], got[n]), n
    assert live_forward_caches() > 0  # retained for a second backward
    loss.backward()  # adds the same gradients again (the expert LoRA call by call,
    # so in another order than autograd's sum of the two calls first: allclose)
    for n in want:
        torch.testing.assert_close(pm.get_parameter(n).grad.cpu(), got[n] + got[n], rtol=1e-6, atol=1e-9)
    del loss
    gc.collect()
    assert live_forward_caches() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_lora_raises_at_the_end_of_backward_naming_the_layer(base, device, monkeypatch):
    # failure-modes row 3: in a training step of the patched model the guard names layer, tokens and experts.
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "1")
    pm = fresh(base, device).train()
    Timer.global_().reset()
    ex = experts_of(pm, 2)
    with torch.no_grad():
        ex.lora["down_B"][3].fill_(float("nan"))
    loss = pm(**batch(device)).loss  # no error yet: the forward is in flight
    assert Timer.global_().forwards == len(MOE_LAYERS)  # counted at launch
    with pytest.raises(ktrs.NonFiniteError, match=r"non-finite expert output in model\.layers\.2\.mlp\.experts: tokens \[.*experts \[.*rows affected"):
        loss.backward()
    del loss
    with torch.no_grad():
        ex.lora["down_B"][3].zero_()
    pm.zero_grad(set_to_none=True)
    pm(**batch(device)).loss.backward()  # the next step is clean


@pytest.mark.parametrize("device", DEVICES)
def test_non_finite_output_gradient_is_reported(base, device, monkeypatch):
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "1")
    pm = fresh(base, device).train()
    out = pm(**batch(device)).logits
    with pytest.raises(ktrs.KtrsError, match="non-finite"):
        (out * float("inf")).sum().backward()


CKPT_MODES = ["non_reentrant", "reentrant", "peft_non_reentrant", "peft_reentrant"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", CKPT_MODES)
def test_checkpointing_on_the_stream_path_is_bit_identical_and_reuses_the_forward(base, device, mode, monkeypatch):
    """2 AdamW steps of 2 micro-batches under checkpointing: loss, input gradients, every
    parameter gradient and the final weights as on the synchronous path, bit for bit; one
    expert forward and backward per MoE layer and micro-batch (the recompute served from
    the kept forward), no synchronous expert call, nothing kept after the steps."""
    per_step = len(MOE_LAYERS) * 2
    sync_counts, asy_counts = [], []
    sync = train(base, device, False, monkeypatch, checkpointing=mode, counts=sync_counts)
    assert sync_counts == [(per_step, per_step, per_step)] * 2
    calls = SyncCalls(monkeypatch)
    asy = train(base, device, True, monkeypatch, checkpointing=mode, counts=asy_counts)
    assert calls.n == 0  # every expert call of the steps was stream work
    assert asy_counts == [(per_step, per_step, per_step)] * 2
    assert any(stream_call._POOLS.get(experts_of(asy[0], layer)) for layer in MOE_LAYERS)
    assert_same(sync, asy)
    assert pending_recomputes() == 0 and live_forward_caches() == 0  # no GC needed
    del sync, asy
    gc.collect()
    assert pending_recomputes() == 0 and live_forward_caches() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["off", "non_reentrant", "reentrant"])
def test_checkpointing_on_the_stream_path_frees_kept_forwards_after_errors(base, device, mode, monkeypatch):
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "1")
    pm = fresh(base, device, None if mode == "off" else mode).train()
    kept = 0 if mode == "off" else len(MOE_LAYERS)
    layer2 = pm.base_model.model.model.layers[2]

    class Boom(Exception):
        pass

    def fail(*_):
        raise Boom()

    # A forward that fails after layer 1's experts were kept for their recompute.
    h = layer2.register_forward_pre_hook(fail)
    with pytest.raises(Boom):
        pm(**batch(device))
    h.remove()
    gc.collect()
    assert pending_recomputes() == 0 and live_forward_caches() == 0
    # A forward whose backward never comes: the kept forwards go with its graph.
    loss = pm(**batch(device)).loss
    assert pending_recomputes() == kept
    assert device != "cpu" or live_forward_caches() == len(MOE_LAYERS)  # CPU: the runs happened at launch
    del loss
    assert pending_recomputes() == 0
    gc.collect()
    stream_call.synchronize()
    assert live_forward_caches() == 0
    # A backward that fails before the recomputes.
    loss = pm(**batch(device)).loss
    loss.register_hook(fail)
    with pytest.raises(Boom):
        loss.backward()
    del loss
    gc.collect()
    stream_call.synchronize()
    assert pending_recomputes() == 0 and live_forward_caches() == 0
    # A backward that fails after the expert backwards (and recomputes) ran: autograd runs
    # no end-of-backward callback; the next forward ends what that backward registered.
    b = batch(device)
    emb = pm.get_input_embeddings()(b["input_ids"]).detach().requires_grad_()
    emb.register_hook(fail)
    loss = pm(inputs_embeds=emb, labels=b["labels"]).loss
    with pytest.raises(Boom):
        loss.backward()
    del loss, emb
    gc.collect()
    pm(**batch(device))
    gc.collect()
    stream_call.synchronize()
    assert pending_recomputes() == 0 and live_forward_caches() == 0 and not stream_call._TASKS
    # The next step is whole.
    pm.zero_grad(set_to_none=True)
    Timer.global_().reset()
    pm(**batch(device)).loss.backward()
    t = Timer.global_()
    assert (t.forwards, t.backwards, t.reused) == (len(MOE_LAYERS), len(MOE_LAYERS), kept)
    assert pending_recomputes() == 0 and live_forward_caches() == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
@pytest.mark.parametrize("how", ["limit", "clear", "retain_graph"])
def test_checkpointing_on_the_stream_path_without_a_kept_forward_recomputes(base, device, mode, how, monkeypatch):
    """Over KTRS_RECOMPUTE_CACHE_MB, after clear_recompute_caches(), and in a second
    backward (retain_graph), the recompute runs the experts: the synchronous path's
    counts and gradients, bit for bit."""
    L = len(MOE_LAYERS)
    result = {}
    for asynchronous in (False, True):
        monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "1" if asynchronous else "0")
        pm = fresh(base, device, mode).train()
        calls = SyncCalls(monkeypatch)
        Timer.global_().reset()
        if how == "limit":
            monkeypatch.setenv("KTRS_RECOMPUTE_CACHE_MB", "0")
        loss = pm(**batch(device)).loss
        if how == "clear":
            assert pending_recomputes() == L
            ktrs_module.clear_recompute_caches()
        if how != "retain_graph":
            assert pending_recomputes() == 0
        loss.backward(retain_graph=how == "retain_graph")
        if how == "retain_graph":
            loss.backward()
        monkeypatch.delenv("KTRS_RECOMPUTE_CACHE_MB", raising=False)
        monkeypatch.undo()  # the counter
        t = Timer.global_()
        assert (calls.n == 0) == asynchronous
        assert (t.forwards, t.backwards, t.reused) == ((2 * L, 2 * L, L) if how == "retain_graph" else (2 * L, L, 0))
        result[asynchronous] = {k: p.grad.cpu().clone() for k, p in pm.named_parameters() if p.requires_grad}
        del loss
        gc.collect()
        assert pending_recomputes() == 0 and live_forward_caches() == 0
        monkeypatch.setattr(stream_call, "INLINE_CPU", True)  # undone above
    for k, g in result[False].items():
        assert torch.equal(result[True][k], g), k


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_checkpointing_on_the_stream_path_reports_non_finite_outputs(base, device, mode, monkeypatch):
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "1")
    pm = fresh(base, device, mode).train()
    ex = experts_of(pm, 2)
    with torch.no_grad():
        ex.lora["down_B"][3].fill_(float("nan"))
    loss = pm(**batch(device)).loss
    with pytest.raises(ktrs.NonFiniteError, match=r"non-finite expert output in model\.layers\.2\.mlp\.experts: tokens \[.*rows affected"):
        loss.backward()
    del loss
    with torch.no_grad():
        ex.lora["down_B"][3].zero_()
    pm.zero_grad(set_to_none=True)
    gc.collect()
    stream_call.synchronize()
    Timer.global_().reset()
    pm(**batch(device)).loss.backward()  # the next step is clean
    t = Timer.global_()
    assert (t.forwards, t.backwards, t.reused) == (len(MOE_LAYERS),) * 3
    gc.collect()
    assert pending_recomputes() == 0 and live_forward_caches() == 0


def test_switch_and_eligibility(monkeypatch):
    x = torch.zeros(3, 4)
    assert stream_call.eligible(x)
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "0")
    assert not stream_call.eligible(x)
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "1")
    with torch.no_grad():
        assert not stream_call.eligible(x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert not stream_call.eligible(x)  # other hooks than checkpointing's (offloading)
    seen = []

    def f(h):
        seen.append(stream_call._mode(h))
        return h.sin()  # saves its input: backward recomputes

    h = torch.ones(3, 4, requires_grad=True)
    torch.utils.checkpoint.checkpoint(f, h, use_reentrant=False).sum().backward()
    torch.utils.checkpoint.checkpoint(f, h, use_reentrant=True).sum().backward()
    kinds = [m[0] if m else None for m in seen]
    assert kinds == [stream_call.FIRST, stream_call.RECOMPUTE, stream_call.REENTRANT_FIRST, stream_call.RECOMPUTE]
    monkeypatch.setattr(stream_call, "INLINE_CPU", False)
    assert not stream_call.eligible(x)  # CPU models keep the synchronous path


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("checkpointing", [None, "non_reentrant", "reentrant"])
def test_training_split_with_the_gpu_matches_the_cpu_only_stream_path(base, device, checkpointing, monkeypatch):
    """Long training calls run some experts on the GPU (gpu_experts.StreamedExperts.train):
    losses, input gradients and every parameter gradient, summed over two micro-batches,
    stay those of the CPU-only run up to bf16 rounding (other GEMMs). (Weights after AdamW
    steps are not compared: Adam's per-coordinate normalisation turns rounding-level
    differences of near-zero gradients into full-size update differences.)"""
    from ktrs import gpu_experts

    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "0")
    _, la, (ga,), _ = train(base, device, True, monkeypatch, steps=1, checkpointing=checkpointing)
    chosen = []
    real = gpu_experts.split
    monkeypatch.setattr(gpu_experts, "split", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    monkeypatch.setattr(gpu_experts, "ON_CPU", device == "cpu")
    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "1")
    monkeypatch.setenv("KTRS_GPU_PREFILL_MODEL", "0.005,1000,0.0001")  # some experts go, not all
    counts = []
    calls = SyncCalls(monkeypatch)
    pm, lb, (gb,), _ = train(base, device, True, monkeypatch, steps=1, checkpointing=checkpointing, counts=counts)
    passes = 1 if checkpointing is None else 2  # the recompute splits as its first pass did
    assert len(chosen) == passes * 2 * len(MOE_LAYERS) and all(chosen)
    if passes == 2:
        assert all(n % 2 == 0 for n in collections.Counter(map(tuple, chosen)).values())
    # The CPU's share: every call stream work, one forward per layer and micro-batch (the
    # recompute served from the kept first pass), nothing kept after the step.
    per_step = 2 * len(MOE_LAYERS)
    assert calls.n == 0 and counts == [(per_step, per_step, 0 if checkpointing is None else per_step)]
    assert pending_recomputes() == 0 and live_forward_caches() == 0
    assert all(0 < len(c) < pm.config.n_routed_experts for c in chosen)

    def rel(a, b):
        a, b = a.double(), b.double()
        return float((a - b).norm() / a.norm())

    assert max(rel(a, b) for a, b in zip(la, lb)) < 1e-2
    assert ga.keys() == gb.keys() and any("lora_experts" in n for n in ga)
    for n in ga:
        assert rel(ga[n], gb[n]) < 1e-2, n
