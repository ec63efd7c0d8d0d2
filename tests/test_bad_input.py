"""Bad input raises a Python exception that names the argument and the expectation."""

import pytest
import torch

import ktrs
from ktrs.experts import LORA_NAMES

from conftest import build, make_problem


@pytest.fixture(scope="module")
def prob():
    return make_problem(E=4, H=32, I=32, k=2, T=5, r=2, seed=40)


@pytest.fixture(scope="module")
def ex(prob):
    return build(prob)


class FakeCudaTensor:
    """Stands in for a CUDA tensor on machines without one."""

    def __dlpack_device__(self):
        return (2, 0)

    def __dlpack__(self, *a, **k):  # pragma: no cover - must not be reached
        raise AssertionError("device must be checked before export")


def call(ex, prob, **over):
    args = dict(hidden=prob.hidden, topk_ids=prob.ids, topk_weights=prob.weights)
    args.update(over)
    out = torch.empty(prob.hidden.shape, dtype=torch.bfloat16)
    return ex.forward(args["hidden"], args["topk_ids"], args["topk_weights"], out=out)


@pytest.mark.parametrize(
    "over, exc, words",
    [
        (dict(hidden=lambda p: p.hidden.float()), TypeError, ["hidden_states", "torch.bfloat16", "float32"]),
        (dict(hidden=lambda p: p.hidden[:, :16].contiguous()), ValueError, ["hidden_states", "shape"]),
        (dict(hidden=lambda p: p.hidden.t().contiguous().t()), ValueError, ["hidden_states", "contiguous"]),
        (dict(hidden=lambda p: p.hidden[None]), ValueError, ["hidden_states", "shape"]),
        (dict(hidden=lambda p: p.hidden.tolist()), TypeError, ["hidden_states", "torch.Tensor"]),
        (dict(hidden=lambda p: FakeCudaTensor()), ValueError, ["hidden_states", "CPU", "cuda:0"]),
        (dict(topk_ids=lambda p: p.ids.int()), TypeError, ["topk_ids", "torch.int64"]),
        (dict(topk_ids=lambda p: p.ids[:3]), ValueError, ["topk_ids", "shape"]),
        (dict(topk_ids=lambda p: p.ids + 4), ValueError, ["topk_ids", "[0, 4)"]),
        (dict(topk_ids=lambda p: p.ids - 5), ValueError, ["topk_ids", "[0, 4)"]),
        (dict(topk_weights=lambda p: p.weights[:, :1].contiguous()), ValueError, ["topk_weights", "shape"]),
        (dict(topk_weights=lambda p: p.weights.double()), TypeError, ["topk_weights", "torch.float32"]),
        (dict(topk_weights=lambda p: p.weights.clone().fill_(float("nan"))), FloatingPointError, ["topk_weights"]),
        (dict(topk_weights=lambda p: p.weights.clone().requires_grad_()), ValueError, ["topk_weights", "detach"]),
    ],
)
def test_forward_rejects(ex, prob, over, exc, words):
    kw = {k: v(prob) for k, v in over.items()}
    with pytest.raises(exc) as e:
        call(ex, prob, **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the fake-device case above runs everywhere)")
def test_real_cuda_tensor_is_rejected_by_low_level_api(ex, prob):
    with pytest.raises(ValueError, match="hidden_states.*CPU"):
        call(ex, prob, hidden=prob.hidden.cuda())


def test_nan_in_hidden_names_the_token(ex, prob):
    h = prob.hidden.clone()
    h[3, 7] = float("nan")
    with pytest.raises(FloatingPointError, match="hidden_states at token 3"):
        call(ex, prob, hidden=h)
    h[3, 7] = float("inf")
    with pytest.raises(FloatingPointError):
        call(ex, prob, hidden=h)


def test_backward_rejects(ex, prob):
    _, handle = ex.forward(prob.hidden, prob.ids, prob.weights, save_for_backward=True)
    with pytest.raises(TypeError, match="ForwardHandle"):
        ex.backward(None, prob.grad_out)
    with pytest.raises(ValueError, match="grad_output.*shape"):
        ex.backward(handle, prob.grad_out[:2].contiguous())
    with pytest.raises(TypeError, match="grad_output.*bfloat16"):
        ex.backward(handle, prob.grad_out.float())
    g = prob.grad_out.clone()
    g[1, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="grad_output at token 1"):
        ex.backward(handle, g)
    with pytest.raises(ValueError, match="6 tensors"):
        ex.backward(handle, prob.grad_out, lora_grads=[torch.zeros(1)])
    bad = [torch.zeros(ex.lora_shape(n)) for n in LORA_NAMES]
    bad[3] = torch.zeros(1, 2, 3)
    with pytest.raises(ValueError, match="up_B"):
        ex.backward(handle, prob.grad_out, lora_grads=bad)
    # The handle is still good after rejected calls.
    ex.backward(handle, prob.grad_out)


def test_construction_rejects():
    z = lambda *s, dt=torch.bfloat16: torch.zeros(*s, dtype=dt)
    with pytest.raises(ValueError, match="`up` must have shape"):
        ktrs.MoeExperts(z(2, 8, 16), z(2, 8, 17), z(2, 16, 8))
    with pytest.raises(ValueError, match="`down` must have shape"):
        ktrs.MoeExperts(z(2, 8, 16), z(2, 8, 16), z(2, 8, 16))
    with pytest.raises(ValueError, match="`gate` must have shape"):
        ktrs.MoeExperts(z(8, 16), z(8, 16), z(16, 8))
    with pytest.raises(TypeError, match="gate"):
        ktrs.MoeExperts([1.0], z(2, 8, 16), z(2, 16, 8))
    with pytest.raises(ValueError, match="isa"):
        ktrs.MoeExperts(z(1, 8, 16), z(1, 8, 16), z(1, 16, 8), isa="sse2")
    with pytest.raises(ValueError, match="lora_alpha"):
        ktrs.MoeExperts(z(1, 8, 16), z(1, 8, 16), z(1, 16, 8), lora_rank=2, lora_alpha=float("nan"))
    with pytest.raises(ValueError, match="experts"):
        ktrs.MoeExperts.empty(0, 16, 8)
    ex = ktrs.MoeExperts(z(1, 8, 16), z(1, 8, 16), z(1, 16, 8))
    with pytest.raises(ValueError, match="no LoRA"):
        ex.lora_weight("gate_A")
    with pytest.raises(ValueError, match="threads"):
        ex.threads = 0


def test_set_lora_weight_rejects(ex):
    with pytest.raises(ValueError, match="gate_A.*shape"):
        ex.set_lora_weight("gate_A", torch.zeros(3))
    with pytest.raises(ktrs.KtrsValueError, match="gate_C"):
        ex.set_lora_weight("gate_C", torch.zeros(3))
    with pytest.raises(FloatingPointError, match="gate_A"):
        ex.set_lora_weight("gate_A", torch.full(ex.lora_shape("gate_A"), float("nan")))


def test_unavailable_isa_is_an_error_never_a_fallback(monkeypatch):
    missing = [i for i in ("avx512", "amx") if i not in ktrs.info()["available_isas"]]
    z = lambda *s: torch.zeros(*s, dtype=torch.bfloat16)
    for isa in missing:
        with pytest.raises(ktrs.IsaUnavailableError, match=isa):
            ktrs.MoeExperts(z(1, 8, 16), z(1, 8, 16), z(1, 16, 8), isa=isa)
        monkeypatch.setenv("KTRS_ISA", isa)
        with pytest.raises(ktrs.IsaUnavailableError):
            ktrs.MoeExperts(z(1, 8, 16), z(1, 8, 16), z(1, 16, 8))
    monkeypatch.setenv("KTRS_ISA", "bogus")
    with pytest.raises(ValueError, match="KTRS_ISA"):
        ktrs.MoeExperts(z(1, 8, 16), z(1, 8, 16), z(1, 16, 8))
    monkeypatch.setenv("KTRS_ISA", "scalar")
    assert ktrs.MoeExperts(z(1, 8, 16), z(1, 8, 16), z(1, 16, 8)).isa == "scalar"
    assert ktrs.info()["selected_isa"] == "scalar"


BAD_CALLS = [
    # Broadcastable or castable ones: torch would run them silently.
    (lambda p: (p.hidden, p.ids, p.weights[:, :1]), ValueError, ["topk_weights", "shape"]),
    (lambda p: (p.hidden, p.ids.float(), p.weights), TypeError, ["topk_ids", "integer"]),
    (lambda p: (p.hidden, p.ids.bool(), p.weights), TypeError, ["topk_ids", "integer"]),
    (lambda p: (p.hidden.to(torch.int32), p.ids, p.weights), TypeError, ["hidden_states", "floating"]),
    (lambda p: (p.hidden, p.ids, p.weights.to(torch.int64)), TypeError, ["topk_weights", "floating"]),
    (lambda p: (p.hidden, p.ids, p.weights[:10]), ValueError, ["topk_weights", "shape"]),
    (lambda p: (p.hidden[:, :32], p.ids, p.weights), ValueError, ["hidden_states", "shape"]),
    (lambda p: (p.hidden[:10], p.ids, p.weights), ValueError, ["topk_ids", "one row per token"]),
    (lambda p: (p.hidden, p.ids.tolist(), p.weights), TypeError, ["topk_ids", "torch.Tensor"]),
]


@pytest.mark.parametrize("path", ["sync", "stream", "gpu split"])
@pytest.mark.parametrize("case", range(len(BAD_CALLS)))
def test_the_module_rejects_bad_calls_on_every_path(path, case, monkeypatch):
    """`KtrsExperts` (what patched models call) names the argument on the synchronous path,
    the stream path and the GPU split alike, before anything runs."""
    from ktrs import gpu_experts, stream_call

    monkeypatch.setenv("KTRS_ASYNC_EXPERTS", "0" if path == "sync" else "1")
    monkeypatch.setattr(stream_call, "INLINE_CPU", path != "sync")
    monkeypatch.setattr(gpu_experts, "ON_CPU", path == "gpu split")
    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "1")
    monkeypatch.setenv("KTRS_GPU_PREFILL_MODEL", "0.005,1000,0.0001")
    p = make_problem(E=8, H=64, I=48, k=2, T=64, r=4, seed=41)
    m = ktrs.KtrsExperts(build(p))
    make, exc, words = BAD_CALLS[case]
    x, ids, w = make(p)
    with pytest.raises(exc) as e:
        m(x.clone().requires_grad_() if x.is_floating_point() else x, ids, w)
    assert isinstance(e.value, (ktrs.KtrsValueError, ktrs.KtrsTypeError))
    for word in words:
        assert word in str(e.value), (word, str(e.value))


def test_a_failed_split_step_leaves_no_garbage_for_the_next(monkeypatch):
    """NaN routing weights in a split training call: the error is raised at the end of
    backward, and the GPU share's (NaN) LoRA gradients stay out of the gradient buffers, so
    the next step runs clean."""
    from ktrs import gpu_experts, stream_call

    monkeypatch.setattr(stream_call, "INLINE_CPU", True)
    monkeypatch.setattr(gpu_experts, "ON_CPU", True)
    monkeypatch.setenv("KTRS_GPU_PREFILL_ROWS", "1")
    monkeypatch.setenv("KTRS_GPU_PREFILL_MODEL", "0.005,1000,0.0001")
    p = make_problem(E=8, H=64, I=48, k=2, T=64, r=4, seed=42)
    m = ktrs.KtrsExperts(build(p))
    chosen = []
    real = gpu_experts.split
    monkeypatch.setattr(gpu_experts, "split", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    w = p.weights.clone()
    w[3] = float("nan")
    with pytest.raises(FloatingPointError, match="topk_weights"):
        m(p.hidden.clone().requires_grad_(), p.ids, w).sum().backward()
    assert set(p.ids[3].tolist()) & set(chosen[0])  # a NaN slot's expert ran on the "GPU"
    m(p.hidden.clone().requires_grad_(), p.ids, p.weights).sum().backward()
    assert all(bool(torch.isfinite(prm.grad).all()) for prm in m.lora.values())
