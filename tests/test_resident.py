"""Experts kept on the GPU (ktrs/resident.py): the resident share's math against the float64
reference, calls split between resident experts and the CPU (inference and training),
placement by budget and by routing counts, and what must not touch the GPU copies. The
math runs on the CPU here (the tests' ``ON_CPU`` hook lets a "GPU" be the CPU); the CUDA
cases, decode graphs included, run on the GPU machine."""

from __future__ import annotations

import copy

import pytest
import torch

import ktrs
from ktrs import gpu_experts, resident
from ktrs.experts import LORA_NAMES

from conftest import build, make_problem, reference, rel_l2

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def on_cpu(monkeypatch):
    """Resident experts and the training split on CPU tensors; no streamed weights."""
    from ktrs import stream_call

    monkeypatch.setattr(gpu_experts, "ON_CPU", True)
    monkeypatch.setattr(stream_call, "INLINE_CPU", True)
    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "0")


def lora_of(ex):
    return [ex.lora_weight(n) for n in LORA_NAMES]


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("T", [1, 2, 9])  # 3·T·k ≤ 8 or not: both shapes
@pytest.mark.parametrize("ids", [[1, 3, 5], [0, 1, 2, 3, 4, 5, 6], list(range(8))])
def test_decode_share_plus_cpu_share_is_the_layer(device, T, ids):
    # Few pairs gather each pair's expert; more pairs than residents run every resident
    # expert on all rows: both shapes, each with the CPU running the other experts.
    p = make_problem(E=8, H=64, I=48, k=2, T=T, r=4, seed=9)
    ex = build(p)
    res = resident.ResidentExperts(ex, ids, device)
    res.refresh_lora(lora_of(ex))
    x, i, w = p.hidden.to(device), p.ids.to(device), p.weights.to(device)
    on_gpu = res.decode_forward(x, i, w, True, ex.lora_scaling)
    assert on_gpu.device.type == device and on_gpu.dtype == torch.float32
    cpu_ids = res.cpu_ids(i).cpu()
    assert torch.equal(cpu_ids >= 0, ~torch.isin(p.ids, torch.tensor(ids)))
    cpu = ex.forward(p.hidden, cpu_ids, p.weights, use_lora=True)[0].float()
    assert rel_l2(cpu + on_gpu.cpu(), reference(p)["out"]) < 1e-2
    # Without LoRA (an adapter switched off): the plain experts.
    ref0 = reference(p, lora={n: torch.zeros_like(ex.lora_weight(n)) for n in LORA_NAMES})["out"]
    cpu0 = ex.forward(p.hidden, cpu_ids, p.weights, use_lora=False)[0].float()
    assert rel_l2(cpu0 + res.decode_forward(x, i, w, False, ex.lora_scaling).cpu(), ref0) < 1e-2


def test_lora_mirror_is_refreshed_in_place():
    p = make_problem(E=6, H=64, I=32, k=2, T=3, r=4, seed=2)
    ex = build(p)
    res = resident.ResidentExperts(ex, [0, 2], "cpu")
    res.refresh_lora(lora_of(ex))
    ptrs = {n: t.data_ptr() for n, t in res.lora_mirror.items()}
    with torch.no_grad():
        ex.lora_weight("down_B").add_(1.0)
    res.refresh_lora(lora_of(ex))
    assert {n: t.data_ptr() for n, t in res.lora_mirror.items()} == ptrs  # graphs keep reading them
    assert torch.equal(res.lora_mirror["down_B"], ex.lora_weight("down_B")[[0, 2]])
    res.refresh_lora([])
    assert res.lora_mirror == {}


def test_ids_out_of_range_are_refused():
    ex = build(make_problem(E=4, H=64, I=32, k=1, T=1, r=0))
    with pytest.raises(ktrs.KtrsValueError, match=r"\[0, 4\)"):
        resident.ResidentExperts(ex, [1, 4], "cpu")


def test_split_sends_resident_experts_first_and_streams_only_long_calls():
    counts = [5, 0, 7, 1, 0, 2]
    assert gpu_experts.split(counts, 10**6, 1e6, resident=[1, 2, 3], stream=False) == [2, 3]  # idle 1 stays
    both = gpu_experts.split(counts, 10**6, 1e6, resident=[3], stream=True)
    assert both[0] == 3 and 1 not in both and 4 not in both


@pytest.mark.parametrize("rank", [0, 4])
def test_an_inference_call_splits_between_resident_experts_and_the_cpu(on_cpu, rank, monkeypatch):
    p = make_problem(E=8, H=64, I=48, k=2, T=7, r=rank, seed=4)
    m = ktrs.KtrsExperts(build(p))
    chosen = []
    real = gpu_experts.split
    monkeypatch.setattr(gpu_experts, "split", lambda *a, **kw: chosen.append(real(*a, **kw)) or chosen[-1])
    m.set_resident(resident.ResidentExperts(m.experts, [0, 2, 4, 6], "cpu"))
    with torch.no_grad():
        out = m(p.hidden, p.ids, p.weights)
        fut = m.submit(p.hidden, p.ids, p.weights).result()
    used = set(p.ids.reshape(-1).tolist())
    assert chosen and set(chosen[-1]) == used & {0, 2, 4, 6}
    assert rel_l2(out, reference(p)["out"]) < 1e-2 and torch.equal(out, fut)


@pytest.mark.parametrize("device", devices())
def test_a_training_call_with_resident_experts_matches_the_float64_reference(on_cpu, device, monkeypatch):
    p = make_problem(E=8, H=64, I=48, k=2, T=24, r=4, seed=11)
    m = ktrs.KtrsExperts(build(p))
    m.experts.threads = 2
    if device == "cuda":
        monkeypatch.setattr(gpu_experts, "ON_CPU", False)
    m.set_resident(resident.ResidentExperts(m.experts, [1, 2, 5], device))
    chosen = []
    real = gpu_experts.split
    monkeypatch.setattr(gpu_experts, "split", lambda *a, **kw: chosen.append(real(*a, **kw)) or chosen[-1])
    for rep in range(2):  # a second micro-batch accumulates on both sides
        x = p.hidden.to(device, copy=True).requires_grad_(True)
        w = p.weights.to(device, copy=True).requires_grad_(True)
        out = m(x, p.ids.to(device), w)
        out.backward(p.grad_out.to(device))
    ref = reference(p)
    assert chosen and set(chosen[-1]) == set(p.ids.reshape(-1).tolist()) & {1, 2, 5}  # the resident share ran there
    assert out.device.type == device
    assert rel_l2(out.cpu(), ref["out"]) < 1e-2
    assert rel_l2(x.grad.cpu(), ref["grad_hidden"]) < 1e-2
    assert rel_l2(w.grad.cpu(), ref["grad_weights"]) < 1e-2
    for n in LORA_NAMES:
        g = m.lora[n].grad
        assert g.data_ptr() == m.experts.lora_grad(n).data_ptr()  # the Rust buffer
        assert rel_l2(g, 2 * ref[f"grad_{n}"]) < 1e-2, n


def test_replaced_expert_weights_are_copied_again(on_cpu):
    p = make_problem(E=4, H=64, I=32, k=2, T=6, r=0, seed=5)
    m = ktrs.KtrsExperts(build(p))
    m.set_resident(resident.ResidentExperts(m.experts, [0, 1, 2, 3], "cpu"))
    g, u, d = (t.float() for t in m.experts.get_expert(1))
    m.experts.set_expert(1, 2 * g, u, d)
    with torch.no_grad():
        got = m(p.hidden, p.ids, p.weights)
    want = m.experts.forward(p.hidden, p.ids, p.weights)[0]
    assert m.resident.weights_version == m.experts.weights_version
    assert rel_l2(got, want) < 1e-2


# -- placing experts in a patched model ---------------------------------------------------

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2ForCausalLM  # noqa: E402

from test_patch_model import bf16_exact, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def stock():
    torch.manual_seed(0)
    return bf16_exact(DeepseekV2ForCausalLM(tiny_config())).eval()


def patched(stock, device="cpu"):
    return ktrs.patch_model(copy.deepcopy(stock), device=device, threads=2).eval()


def layers(model):
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ktrs.KtrsExperts)]


def test_placement_by_budget_spreads_over_layers_and_keeps_logits(on_cpu, stock):
    model = patched(stock)
    ids = torch.randint(1, 160, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = stock(ids).logits
        before = model(ids).logits
    per = resident.expert_bytes(layers(model)[0][1].experts)
    placed = ktrs.place_experts_on_gpu(model, memory=5 * per, device="cpu")
    assert sorted(len(v) for v in placed.values()) == [2, 3]  # 5 experts over 2 layers
    with torch.no_grad():
        after = model(ids).logits
    assert rel_l2(after, want) < 2e-2 and rel_l2(after, before) < 2e-2
    assert not any(".resident." in k for k in model.state_dict())  # never saved
    model.to(torch.float64)  # moves and casts leave the copies alone
    assert all(m.resident.gate_up.dtype == torch.bfloat16 for _, m in layers(model))
    assert ktrs.place_experts_on_gpu(model, memory="0GB", device="cpu") == {n: [] for n, _ in layers(model)}
    assert all(m.resident is None for _, m in layers(model))


def test_counted_routing_chooses_the_busiest_experts(on_cpu, stock):
    model = patched(stock)
    ids = torch.randint(1, 160, (4, 16), generator=torch.Generator().manual_seed(2))
    with ktrs.count_routing(model), torch.no_grad():
        model(ids)
    for name, m in layers(model):
        counts = m.routing_counts
        assert int(counts.sum()) == ids.numel() * 3  # tokens × top-k
    placed = ktrs.place_experts_on_gpu(model, per_layer=2, device="cpu")
    for name, m in layers(model):
        top = sorted(range(8), key=lambda e: (-int(m.routing_counts[e]), e))[:2]
        assert placed[name] == sorted(top)
    with torch.no_grad():
        model(ids)  # counting is off again: the counts stay
    assert int(layers(model)[0][1].routing_counts.sum()) == ids.numel() * 3


def test_placement_arguments_are_checked(on_cpu, stock):
    model = patched(stock)
    name = layers(model)[0][0]
    with pytest.raises(ktrs.KtrsValueError, match="exactly one"):
        ktrs.place_experts_on_gpu(model, memory="1GB", per_layer=1, device="cpu")
    with pytest.raises(ktrs.KtrsValueError, match="memory"):
        ktrs.place_experts_on_gpu(model, memory="lots", device="cpu")
    with pytest.raises(ktrs.KtrsValueError, match="per_layer"):
        ktrs.place_experts_on_gpu(model, per_layer=-1, device="cpu")
    with pytest.raises(ktrs.KtrsValueError, match="no ktrs layer"):
        ktrs.place_experts_on_gpu(model, experts={"model.layers.9.mlp.experts": [0]}, device="cpu")
    with pytest.raises(ktrs.KtrsValueError, match=r"\[0, 8\)"):
        ktrs.place_experts_on_gpu(model, experts={name: [8]}, device="cpu")
    assert ktrs.place_experts_on_gpu(model, experts={name: [3, 1]}, device="cpu")[name] == [1, 3]
    with pytest.raises(ktrs.KtrsValueError, match="no ktrs experts"):
        ktrs.place_experts_on_gpu(torch.nn.Linear(2, 2), per_layer=1)
    assert resident.parse_bytes("1.5GiB") == 3 * 2**29 and resident.parse_bytes(" 500 MB ") == 500 * 10**6


def test_a_cpu_device_is_refused_outside_the_tests(stock):
    model = patched(stock)
    with pytest.raises(ktrs.KtrsValueError, match="CUDA"):
        ktrs.place_experts_on_gpu(model, per_layer=1, device="cpu")


@cuda
def test_a_budget_above_free_gpu_memory_is_refused(stock, monkeypatch):
    model = patched(stock, "cuda")
    per = resident.expert_bytes(layers(model)[0][1].experts)
    total = torch.cuda.mem_get_info()[1]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (per, total))  # a GPU with room for one expert
    with pytest.raises(ktrs.KtrsValueError, match="free"):
        ktrs.place_experts_on_gpu(model, per_layer=8)
    assert all(m.resident is None for _, m in layers(model))


@cuda
@pytest.mark.parametrize("experts,top_k,per_layer", [(8, 3, 3), (8, 3, 8), (16, 2, 12)])  # dense share, all resident, gathered share
def test_graph_decode_with_resident_experts_matches_the_stock_model(experts, top_k, per_layer):
    from ktrs import decode

    torch.manual_seed(0)
    stock = bf16_exact(DeepseekV2ForCausalLM(tiny_config(n_routed_experts=experts, num_experts_per_tok=top_k))).eval()
    model = patched(stock, "cuda")
    ktrs.place_experts_on_gpu(model, per_layer=per_layer)
    ids = torch.randint(1, 160, (1, 6), generator=torch.Generator().manual_seed(3)).cuda()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = copy.deepcopy(stock).cuda().generate(ids, **kw)
    decode.reset_stats(model)
    assert torch.equal(model.generate(ids, **kw), want)
    assert decode.stats(model)["replays"] > 0


@cuda
def test_graph_decode_with_resident_experts_sees_expert_lora_changes(stock):
    from ktrs import decode

    model = ktrs.patch_model(copy.deepcopy(stock).to(torch.bfloat16), device="cuda", threads=2, lora_rank=4).eval()
    ktrs.place_experts_on_gpu(model, per_layer=4)
    ids = torch.randint(1, 160, (1, 6), generator=torch.Generator().manual_seed(4)).cuda()
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        for _, m in layers(model):
            m.lora["down_B"].normal_(0, 0.5)
    first = model.generate(ids, **kw)
    decode.disable(model)
    eager = model.generate(ids, **kw)
    decode.enable(model)
    assert torch.allclose(first.scores[0], eager.scores[0], rtol=2e-2, atol=2e-2)
    with torch.no_grad():
        for _, m in layers(model):
            m.lora["down_B"].mul_(-1)  # in place, as an optimizer step
    second = model.generate(ids, **kw)
    decode.disable(model)
    eager2 = model.generate(ids, **kw)
    decode.enable(model)
    assert torch.allclose(second.scores[0], eager2.scores[0], rtol=2e-2, atol=2e-2)
    assert not torch.allclose(second.scores[0], first.scores[0], rtol=2e-2, atol=2e-2)


def test_train_config_checks_the_gpu_expert_memory(tmp_path):
    from ktrs.app.train import TrainConfig

    cfg = TrainConfig(model="m", data="d", output=str(tmp_path / "out"), gpu_expert_memory="lots")
    with pytest.raises(ktrs.KtrsValueError, match="--gpu-expert-memory"):
        cfg.check()
    TrainConfig(model="m", data="d", output=str(tmp_path / "out"), gpu_expert_memory="2GiB").check()


def test_patch_model_places_experts_when_asked(on_cpu, stock):
    model = ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2, gpu_expert_memory="1GiB")
    assert all(m.resident is not None and m.resident.count == 8 for _, m in layers(model))  # 1 GiB holds the tiny model's experts
    assert "8 kept on cpu too" in ktrs.describe(model)
    plain = ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2, gpu_expert_memory=0)
    assert all(m.resident is None for _, m in layers(plain))


def test_models_on_cuda_leave_one_core_to_python(monkeypatch):
    from ktrs import hf

    monkeypatch.delenv("KTRS_THREADS", raising=False)
    monkeypatch.setattr(hf._native, "resolve_threads", lambda t=None: 16)
    assert hf.default_threads(torch.device("cuda:0")) == 15
    assert hf.default_threads(torch.device("cpu")) is None  # the kernels' own default
    assert hf.default_threads(torch.device("cuda:0"), 4) == 4
    monkeypatch.setattr(hf._native, "resolve_threads", lambda t=None: 1)
    assert hf.default_threads(torch.device("cuda:0")) == 1
    monkeypatch.setenv("KTRS_THREADS", "16")
    assert hf.default_threads(torch.device("cuda:0")) is None
