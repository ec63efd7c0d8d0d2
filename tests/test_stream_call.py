"""The stream path of training expert calls (ktrs/stream_call.py) against the synchronous
path, bit for bit: loss, every LoRA gradient and the weights after AdamW steps with
gradient accumulation; plus the bookkeeping (gradients bound to Rust buffers, staging
reuse, errors raised at the end of backward, checkpointing falling back).

On CUDA the real stream path runs (host functions on the current stream). Without CUDA
the same bookkeeping runs with `stream_call.INLINE_CPU` (host functions run at launch)."""

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
from ktrs.module import Timer, live_forward_caches  # noqa: E402
from ktrs.optim import AdamW  # noqa: E402

from test_finetune import base, patched_peft  # noqa: E402,F401
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


def fresh(base, device):
    """A patched PEFT model; the same LoRA values each time (PEFT draws A from torch's generator)."""
    torch.manual_seed(0)
    return patched_peft(base, seed=3, device=device)


def batch(device, n=2, t=9, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 160, (n, t), generator=g).to(device)
    return dict(input_ids=ids, labels=ids)


def train(base, device, asynchronous, monkeypatch, opt="ktrs", steps=2, accum=2, checkpointing=None):
    """`steps` AdamW steps of `accum` micro-batches; returns losses and input-embedding
    gradients, the parameter gradients before each step and the final trainable weights."""
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "1" if asynchronous else "0")
    pm = fresh(base, device)
    if checkpointing is not None:
        pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": checkpointing == "reentrant"})
    pm.train()
    Timer.global_().reset()  # patching ran a forward of its own
    params = [p for p in pm.parameters() if p.requires_grad]
    optim = AdamW(params, lr=1e-2, weight_decay=0.01) if opt == "ktrs" else torch.optim.AdamW(params, lr=1e-2, weight_decay=0.01)
    losses, grads = [], []
    embed = pm.get_input_embeddings()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for step in range(steps):
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


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["non_reentrant", "reentrant"])
def test_checkpointing_keeps_the_synchronous_path_and_reuses_the_forward(base, device, mode, monkeypatch):
    sync = train(base, device, False, monkeypatch, steps=1, accum=2, checkpointing=mode)
    asy = train(base, device, True, monkeypatch, steps=1, accum=2, checkpointing=mode)
    t = Timer.global_()
    assert t.forwards == t.backwards == 2 * len(MOE_LAYERS) and t.reused == 2 * len(MOE_LAYERS)
    assert not any(stream_call._POOLS.get(experts_of(asy[0], layer)) for layer in MOE_LAYERS)
    assert_same(sync, asy)


def test_switch_and_eligibility(monkeypatch):
    x = torch.zeros(3, 4)
    assert stream_call.eligible(x)
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "0")
    assert not stream_call.eligible(x)
    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "1")
    with torch.no_grad():
        assert not stream_call.eligible(x)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert not stream_call.eligible(x)
    monkeypatch.setattr(stream_call, "INLINE_CPU", False)
    assert not stream_call.eligible(x)  # CPU models keep the synchronous path
