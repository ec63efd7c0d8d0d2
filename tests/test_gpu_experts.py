"""The GPU prefill path (ktrs/gpu_experts.py): the packed-weight view's layout, the
streamed computation against the float64 reference (run on the CPU here, on CUDA where
there is one), and which calls take the path."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import ktrs
from ktrs import gpu_experts
from ktrs.experts import LORA_NAMES

from conftest import build, make_problem, reference, rel_l2


def test_packed_view_unpacks_to_the_expert_weights():
    p = make_problem(E=3, H=96, I=80, k=2, T=4, r=0, seed=1)  # both padded: H, I not multiples of 32
    ex = build(p)
    s = gpu_experts.StreamedExperts(ex)
    gu = s._unpack(ex.packed_weights("gate_up"))
    dn = s._unpack(ex.packed_weights("down"))
    i_pad = gu.shape[1] // 2
    for e in range(3):
        g, u, d = ex.get_expert(e)
        panels = gu[e].view(i_pad // 16, 2, 16, -1)
        assert torch.equal(panels[:, 0].reshape(i_pad, -1)[:80, :96], g)
        assert torch.equal(panels[:, 1].reshape(i_pad, -1)[:80, :96], u)
        assert torch.equal(dn[e][:96, :80], d)
        assert not panels[:, 0].reshape(i_pad, -1)[80:].any()  # padding is zero


def test_packed_weights_refuses_other_names():
    ex = build(make_problem(E=2, H=64, I=32, k=1, T=1, r=0))
    with pytest.raises(ktrs.KtrsValueError, match="gate_up"):
        ex.packed_weights("gate")


def devices():
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("rank", [0, 4])
def test_streamed_forward_matches_the_reference(device, rank, monkeypatch):
    p = make_problem(E=6, H=96, I=80, k=2, T=40, r=rank, seed=3, used_experts=5)
    ex = build(p)
    # Chunks of two experts: the double-buffered copy runs through several groups.
    per_expert = (ex.packed_weights("gate_up")[0].numel() + ex.packed_weights("down")[0].numel()) * 2
    monkeypatch.setattr(gpu_experts, "CHUNK_BYTES", 2 * per_expert)
    s = gpu_experts.StreamedExperts(ex)
    lora = [ex.lora_weight(n) for n in LORA_NAMES] if rank else None
    got = s.forward(p.hidden.to(device), p.ids.to(device), p.weights.to(device), lora=lora, scaling=ex.lora_scaling)
    assert got.device.type == device and got.dtype == torch.bfloat16
    want = reference(p)["out"]
    assert rel_l2(got.cpu(), want) < 1e-2
    cpu = ex.forward(p.hidden, p.ids, p.weights, use_lora=bool(rank))[0]
    assert rel_l2(got.cpu(), cpu) < 1e-2


def test_streamed_forward_refuses_out_of_range_ids():
    p = make_problem(E=4, H=64, I=32, k=2, T=3, r=0)
    s = gpu_experts.StreamedExperts(build(p))
    with pytest.raises(ktrs.KtrsValueError, match="topk_ids"):
        s.forward(p.hidden, torch.tensor([[0, 4], [1, 2], [0, 1]]), p.weights)


def test_only_long_cuda_inference_calls_take_the_path(monkeypatch):
    ex = build(make_problem(E=8, H=64, I=32, k=2, T=1, r=0))
    ids_long = torch.zeros(64, 2, dtype=torch.long)  # 16 rows per expert
    monkeypatch.delenv("KTRS_GPU_PREFILL_ROWS", raising=False)
    x = torch.zeros(1, 64)
    # Not CUDA: never.
    assert not gpu_experts.wanted(ex, x, ids_long)
    fake_cuda = torch.empty(1, 64, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    with torch.no_grad():
        assert gpu_experts.wanted(ex, fake_cuda, ids_long)
        assert not gpu_experts.wanted(ex, fake_cuda, ids_long[:63])
        monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "0")
        assert not gpu_experts.wanted(ex, fake_cuda, ids_long)
        monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "4")
        assert gpu_experts.wanted(ex, fake_cuda, ids_long[:16])
    # Autograd on (training): never.
    assert not gpu_experts.wanted(ex, fake_cuda, ids_long)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_patched_module_uses_the_gpu_for_a_long_prompt(monkeypatch):
    p = make_problem(E=4, H=64, I=32, k=2, T=256, r=4, seed=5)
    ex = build(p)
    m = ktrs.KtrsExperts(ex)
    x, ids, w = p.hidden.cuda(), p.ids.cuda(), p.weights.cuda()
    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "0")
    with torch.no_grad():
        cpu = m(x, ids, w)
    assert m._streamed is None
    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "64")
    with torch.no_grad():
        gpu = m(x, ids, w)
        fut = m.submit(x, ids, w).result()
    assert m._streamed is not None
    assert gpu.is_cuda and rel_l2(gpu, cpu) < 1e-2 and torch.equal(gpu, fut)


def test_split_moves_the_busiest_experts_while_it_pays(monkeypatch):
    monkeypatch.delenv("KTRS_GPU_PREFILL_MODEL", raising=False)
    H, I = 2048, 1408
    nbytes, fpr = 3 * H * I * 2, 2.0 * 3 * H * I
    # V2-Lite at 2048 tokens (192 rows per expert): most experts go, not all.
    many = gpu_experts.split([192] * 64, nbytes, fpr)
    assert 32 < len(many) < 64
    # Training: two copies against forward + backward on the CPU (slower while it shares
    # the DRAM); still a split, and idle experts never move.
    train = gpu_experts.split([192] * 60 + [0] * 4, nbytes, fpr, training=True)
    assert 30 < len(train) < 60 and max(train) < 60
    assert len(gpu_experts.split([1] * 64, nbytes, fpr, training=True)) < 32  # the DRAM floor
    # One row per expert: the CPU reads weights at DRAM speed and the copy reads the same
    # DRAM, so hardly anything moves.
    assert len(gpu_experts.split([1] * 64, nbytes, fpr)) <= 4
    # Uneven rows: the busiest go first; idle experts never.
    counts = [0, 500, 3, 400, 0, 2] + [10] * 10
    got = gpu_experts.split(counts, nbytes, fpr)
    assert got[:2] == [1, 3] and 0 not in got and 4 not in got
    monkeypatch.setenv("KTRS_GPU_PREFILL_MODEL", "1000,100,0.5")  # fast copies, a slow CPU: more go
    assert len(gpu_experts.split(counts, nbytes, fpr)) > len(got)
    for bad in ["1,2", "a,b,c", "50,0,5"]:
        monkeypatch.setenv("KTRS_GPU_PREFILL_MODEL", bad)
        with pytest.raises(ktrs.KtrsValueError, match="KTRS_GPU_PREFILL_MODEL"):
            gpu_experts.split(counts, nbytes, fpr)


@pytest.mark.parametrize("bad", ["-1", "many", "1.5"])
def test_a_bad_rows_threshold_names_the_variable(bad, monkeypatch):
    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", bad)
    with pytest.raises(ktrs.KtrsValueError, match="KTRS_GPU_PREFILL_ROWS"):
        gpu_experts.rows_threshold()


def test_skipped_slots_add_nothing_on_either_side():
    p = make_problem(E=5, H=64, I=48, k=2, T=12, r=4, seed=8)
    ex = build(p)
    ids = p.ids.clone()
    ids[::3, 1] = -1
    w0 = p.weights.clone()
    w0[::3, 1] = 0.0
    ref = reference(dataclasses.replace(p, weights=w0))
    cpu, handle = ex.forward(p.hidden, ids, p.weights, save_for_backward=True)
    s = gpu_experts.StreamedExperts(ex)
    gpu = s.forward(p.hidden, ids, p.weights, lora=[ex.lora_weight(n) for n in LORA_NAMES], scaling=ex.lora_scaling)
    assert rel_l2(cpu, ref["out"]) < 1e-2 and rel_l2(gpu, ref["out"]) < 1e-2
    # The CPU backward: skipped slots get nothing; the rest as with weight 0.
    grad_hidden, grad_weights = ex.backward(handle, p.grad_out)
    assert rel_l2(grad_hidden, ref["grad_hidden"]) < 1e-2
    assert torch.equal(grad_weights[::3, 1], torch.zeros(4))
    keep = ids >= 0
    assert rel_l2(grad_weights[keep], ref["grad_weights"][keep]) < 1e-2
    for n in LORA_NAMES:
        assert rel_l2(ex.lora_grad(n), ref[f"grad_{n}"]) < 1e-2


@pytest.mark.parametrize("device", devices())
def test_a_split_call_matches_the_reference(device, monkeypatch):
    p = make_problem(E=8, H=64, I=48, k=2, T=64, r=4, seed=9)
    ex = build(p)
    # A cost model under which some experts, not all, go to the GPU.
    per = gpu_experts.StreamedExperts(ex).expert_bytes
    counts = torch.bincount(p.ids.reshape(-1), minlength=8).tolist()
    monkeypatch.setenv("KTRS_GPU_PREFILL_MODEL", "0.005,1000,0.0001")
    chosen = gpu_experts.split(counts, per, 2.0 * 3 * 64 * 48)
    assert 0 < len(chosen) < 8
    s = gpu_experts.StreamedExperts(ex)
    got = s(p.hidden.to(device), p.ids.to(device), p.weights.to(device), lora=[ex.lora_weight(n) for n in LORA_NAMES], scaling=ex.lora_scaling)
    assert got.device.type == device
    assert rel_l2(got.cpu(), reference(p)["out"]) < 1e-2


def test_refused_page_locking_keeps_long_prompts_on_the_cpu(monkeypatch):
    p = make_problem(E=4, H=64, I=32, k=2, T=64, r=0, seed=4)
    s = gpu_experts.StreamedExperts(build(p))

    class Refusing:
        def cudaHostRegister(self, ptr, size, flags):
            return 1  # cudaErrorInvalidValue

        def cudaHostUnregister(self, ptr):
            raise AssertionError("nothing was registered")

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Refusing())
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda t: True))
    with pytest.warns(UserWarning, match="page-lock"):
        assert s(p.hidden, p.ids, p.weights) is None
    assert s(p.hidden, p.ids, p.weights) is None  # decided once, warned once


def test_a_packed_view_keeps_its_layer_alive():
    # The GPU copy may still read a view when the module that made it is gone: the
    # view holds the layer (an Arc on the Rust side), never a dangling pointer.
    import gc

    p = make_problem(E=3, H=64, I=32, k=1, T=1, r=0, seed=6)
    ex = build(p)
    view = ex.packed_weights("down")
    before = view.clone()
    del ex
    gc.collect()
    build(make_problem(E=3, H=64, I=32, k=1, T=1, r=0, seed=7))  # reuse freed memory, if any
    assert torch.equal(view, before)


# -- training calls split between the devices (StreamedExperts.train) --------------------

@pytest.fixture
def training_split(monkeypatch):
    """CPU tensors take the training split and the stream path (host functions at launch);
    a cost model under which some experts, not all, go to the "GPU"."""
    from ktrs import stream_call

    monkeypatch.setattr(gpu_experts, "ON_CPU", True)
    monkeypatch.setattr(stream_call, "INLINE_CPU", True)
    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "1")
    monkeypatch.setenv("KTRS_GPU_PREFILL_MODEL", "0.005,1000,0.0001")
    chosen = []
    real = gpu_experts.split

    def spy(*args, **kwargs):
        chosen.append(real(*args, **kwargs))
        return chosen[-1]

    monkeypatch.setattr(gpu_experts, "split", spy)
    return chosen


def training_module(p):
    m = ktrs.KtrsExperts(build(p))
    m.experts.threads = 2
    return m


def run_training(m, p, device="cpu"):
    x = p.hidden.to(device, copy=True).requires_grad_(True)
    w = p.weights.to(device, copy=True).requires_grad_(True)
    out = m(x, p.ids.to(device), w)
    out.backward(p.grad_out.to(device))
    return out, x.grad, w.grad


@pytest.mark.parametrize("device", devices())
def test_a_split_training_call_matches_the_float64_reference(device, training_split, monkeypatch):
    p = make_problem(E=8, H=64, I=48, k=2, T=64, r=4, seed=11)
    m = training_module(p)
    if device == "cuda":
        monkeypatch.setattr(gpu_experts, "ON_CPU", False)
    out, gx, gw = run_training(m, p, device)
    assert training_split and 0 < len(training_split[-1]) < 8  # both devices had experts
    ref = reference(p)
    assert out.device.type == device and out.dtype == torch.bfloat16
    assert rel_l2(out.cpu(), ref["out"]) < 1e-2
    assert rel_l2(gx.cpu(), ref["grad_hidden"]) < 1e-2
    assert rel_l2(gw.cpu(), ref["grad_weights"]) < 1e-2
    for n in LORA_NAMES:
        grad = m.lora[n].grad
        assert grad is not None and grad.data_ptr() == m.experts.lora_grad(n).data_ptr()  # still the Rust buffer
        assert rel_l2(grad, ref[f"grad_{n}"]) < 1e-2, n


def test_split_training_gradients_accumulate_and_reset(training_split):
    p = make_problem(E=8, H=64, I=48, k=2, T=64, r=4, seed=12)
    m = training_module(p)
    run_training(m, p)
    once = {n: m.lora[n].grad.clone() for n in LORA_NAMES}
    run_training(m, p)  # a second micro-batch adds, on both devices' experts
    for n in LORA_NAMES:
        assert torch.allclose(m.lora[n].grad, 2 * once[n], rtol=1e-5, atol=1e-7), n
    for prm in m.lora.values():
        prm.grad = None
    run_training(m, p)  # zero_grad(set_to_none=True): overwritten, not added
    for n in LORA_NAMES:
        assert torch.allclose(m.lora[n].grad, once[n], rtol=1e-5, atol=1e-7), n


def test_split_training_reports_a_non_finite_gpu_expert(training_split):
    p = make_problem(E=8, H=64, I=48, k=2, T=64, r=4, seed=13)
    m = training_module(p)
    counts = torch.bincount(p.ids.reshape(-1), minlength=8)
    busiest = int(counts.argmax())  # the split moves it first
    with torch.no_grad():
        m.lora["down_B"][busiest, 0, 0] = float("nan")
    with pytest.raises(ktrs.NonFiniteError, match="GPU"):
        run_training(m, p)
    assert busiest in training_split[-1]


def test_training_calls_split_only_when_wanted(training_split, monkeypatch):
    p = make_problem(E=8, H=64, I=48, k=2, T=64, r=4, seed=14)
    m = training_module(p)
    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "0")  # off
    run_training(m, p)
    assert not training_split
    monkeypatch.setattr(gpu_experts, "ON_CPU", False)  # CPU tensors: never
    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "1")
    run_training(m, p)
    assert not training_split


@pytest.mark.parametrize("slow", ["cpu", "gpu"])
def test_the_training_split_learns_the_machines_balance(slow, monkeypatch):
    """Whichever side takes longer, later calls move experts away from it."""
    monkeypatch.setattr(gpu_experts, "ON_CPU", True)
    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "1")
    monkeypatch.delenv("KTRS_GPU_PREFILL_MODEL", raising=False)
    monkeypatch.setenv("KTRS_GPU_SPLIT_LEARN", "1")
    monkeypatch.setattr(gpu_experts, "BALANCE", gpu_experts.Balance())
    p = make_problem(E=16, H=64, I=48, k=2, T=256, r=0, seed=15)
    ex = build(p)
    s = gpu_experts.StreamedExperts(ex)
    counts = torch.bincount(p.ids.reshape(-1), minlength=16).tolist()
    # A starting model that gives the GPU about half of the experts.
    for f in [10.0 ** (e / 8) for e in range(-48, 49)]:
        monkeypatch.setattr(gpu_experts, "TRAINING_CPU_FACTOR", f)
        if 6 <= len(gpu_experts.split(counts, s.expert_bytes, 2.0 * 3 * 64 * 48, training=True)) <= 10:
            break
    else:
        pytest.fail("no factor splits the experts")
    run = s._run
    # A clock the two shares advance (20 ms for the slow one, 1 ms for the other), so the
    # test does not depend on this machine's load.
    clock = [0.0]
    monkeypatch.setattr(gpu_experts, "_mark", lambda cuda, stream=None: clock[0])

    def slow_gpu(*a, **k):
        clock[0] += 0.02 if slow == "gpu" else 0.001
        return run(*a, **k)

    def cpu_call(h, i, w):
        clock[0] += 0.02 if slow == "cpu" else 0.001
        return ex.forward(h, i, w)[0]

    monkeypatch.setattr(s, "_run", slow_gpu)
    chosen = []
    real = gpu_experts.split
    monkeypatch.setattr(gpu_experts, "split", lambda *a, **k: chosen.append(len(real(*a, **k))) or real(*a, **k))
    want = reference(p)["out"]
    for _ in range(12):
        out = s.train(p.hidden, p.ids, p.weights, (), 1.0, cpu_call, lambda *a: None, guard=False)
        if out is None:  # the split gave the GPU nothing: the caller runs the CPU path
            assert slow == "gpu" and chosen[-1] == 0
        else:
            assert rel_l2(out, want) < 1e-2
    b = gpu_experts.BALANCE
    b.update()
    assert b.calls >= 6
    if slow == "cpu":
        assert b.factor > 2 and chosen[-1] > chosen[0]
    else:
        assert b.factor < 0.7 and min(chosen) < chosen[0]
        if 0 in chosen:
            # Nothing measured then: the factor creeps back, and the split is tried again.
            assert chosen[chosen.index(0) + 1:] and max(chosen[chosen.index(0) + 1:]) > 0
    # Calls under checkpointing neither learn nor are timed; nor any call by default.
    before = (b.factor, b.calls)
    s.train(p.hidden, p.ids, p.weights, (), 1.0, cpu_call, lambda *a: None, guard=False, checkpointed=True)
    b.update()
    assert (b.factor, b.calls) == before
    monkeypatch.delenv("KTRS_GPU_SPLIT_LEARN")
    s.train(p.hidden, p.ids, p.weights, (), 1.0, cpu_call, lambda *a: None, guard=False)
    b.update()
    assert (b.factor, b.calls) == before


def test_lora_buffers_are_page_locked_once_per_set(monkeypatch):
    # The GPU share copies LoRA from page-locked Rust memory: each set of buffers is
    # registered once, and unregistered when new ones (another rank) replace it.
    p = make_problem(E=64, H=512, I=512, k=2, T=4, r=8, seed=1)  # each matrix 64·8·512·4 B = 1 MiB: mapped
    ex = build(p)
    s = gpu_experts.StreamedExperts(ex)
    calls = []

    class Fake:
        def cudaHostRegister(self, ptr, size, flags):
            calls.append(("register", ptr))
            return 0

        def cudaHostUnregister(self, ptr):
            calls.append(("unregister", ptr))
            return 0

    monkeypatch.setattr(torch.cuda, "cudart", lambda: Fake())
    first = [ex.lora_weight(n) for n in LORA_NAMES]
    assert s._lora_locked(first) and s._lora_locked(first)
    assert [c[0] for c in calls] == ["register"] * 6
    ptrs = sorted(t.data_ptr() for t in first)
    del first
    ex.set_lora(4)  # half a MiB each: heap memory, gathered on the host instead
    assert not s._lora_locked([ex.lora_weight(n) for n in LORA_NAMES])
    assert sorted(p for c, p in calls if c == "unregister") == ptrs
    assert [c[0] for c in calls].count("register") == 6


@pytest.mark.parametrize("lora", [False, True])
def test_hand_backward_matches_autograd(lora):
    g = torch.Generator().manual_seed(3)
    n, m, H, I, i_pad, r = 3, 5, 64, 40, 48, 4  # I padded to whole panels of 16
    x = torch.randn(n, m, H, generator=g).bfloat16()
    w_gu = (torch.randn(n, 2 * i_pad, H, generator=g) * 0.2).bfloat16()
    w_dn = (torch.randn(n, H, i_pad, generator=g) * 0.2).bfloat16()
    shapes = {"gate_A": (r, H), "gate_B": (I, r), "up_A": (r, H), "up_B": (I, r), "down_A": (r, I), "down_B": (H, r)}
    L = {k: torch.randn(n, *v, generator=g) * 0.3 for k, v in shapes.items()} if lora else {}
    dy = torch.randn(n, m, H, generator=g)
    y, dx, dL = gpu_experts.expert_math_backward(x, w_gu, w_dn, L, 1.5, H, I, dy, True)
    xs = x.clone().requires_grad_(True)
    Ls = {k: v.clone().requires_grad_(True) for k, v in L.items()}
    want = gpu_experts.expert_math(xs, w_gu, w_dn, Ls, 1.5, H, I)
    grads = torch.autograd.grad(want, [xs, *Ls.values()], dy)
    assert rel_l2(y, want.detach()) < 1e-5
    assert rel_l2(dx, grads[0].float()) < 1e-2
    assert set(dL) == set(Ls)
    for (k, _), gr in zip(Ls.items(), grads[1:]):
        assert rel_l2(dL[k], gr) < 1e-2, k
