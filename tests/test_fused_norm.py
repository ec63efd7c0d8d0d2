"""The fused RMSNorm kernel (ktrs.fused_norm) against HF's own RMSNorm forward and
float64 math. Without CUDA the Triton kernel runs in Triton's interpreter, in a child
process (the interpreter is chosen at import); with CUDA it runs on the GPU."""

import textwrap

import pytest
import torch
from torch import nn

from conftest import run_triton_case

pytest.importorskip("triton")

CASE = textwrap.dedent(
    """
    import torch
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm
    from ktrs import fused_norm

    torch.manual_seed(0)
    dev = DEVICE
    for n, rows, dtype, scale in [(2048, 1, torch.bfloat16, 1.0), (512, 3, torch.bfloat16, 30.0), (300, 16, torch.float16, 0.01),
                                  (1408, 4, torch.bfloat16, 1e-3)]:
        norm = DeepseekV2RMSNorm(n, eps=1e-6)
        with torch.no_grad():
            norm.weight.normal_(1.0, 0.3)
        norm = norm.to(dtype).to(dev)
        x = (torch.randn(rows, n) * scale).to(dtype).to(dev)
        with torch.no_grad():
            want = norm(x)  # HF's forward
            got = fused_norm.rms_norm(x, norm.weight, norm.variance_epsilon)
            strided = torch.stack([x, x], dim=-1)[..., 0]
            assert not strided.is_contiguous()
            assert torch.equal(fused_norm.rms_norm(strided, norm.weight, norm.variance_epsilon), got)
        assert got.dtype == want.dtype == dtype and got.shape == want.shape
        # float64 of HF's formula with its intermediate rounding to the input dtype
        xd = x.double()
        h = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype).double()
        ref = norm.weight.double() * h
        eps = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
        ulp = ref.abs().clamp_min(1e-30) * eps
        # two roundings, each within an ulp of float64 (the first can move by one ulp)
        assert ((got.double() - ref).abs() <= 3 * ulp).all(), (got.double() - ref).abs().max()
        differ = (got != want).float().mean().item()
        assert differ < 0.02, differ
        assert ((got.double() - want.double()).abs() <= 3 * ulp).all()
    print("ok")
    """
)


def test_fused_norm_kernel_matches_hf_in_the_interpreter():
    run_triton_case(CASE, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")
def test_fused_norm_kernel_matches_hf_on_the_gpu():
    run_triton_case(CASE, "cuda")


class _OffsetNorm(nn.Module):
    """A norm HF-like in its attributes but not in its formula (Gemma's 1 + weight)."""

    def __init__(self, n):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(n))
        self.variance_epsilon = 1e-6

    def forward(self, x):
        h = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return (h * (1.0 + self.weight.float())).to(x.dtype)


def test_install_routes_only_standard_norms_and_falls_back_off_the_gpu():
    from transformers import DeepseekV2ForCausalLM

    from ktrs import fused_norm
    from test_patch_model import tiny_config

    if not fused_norm.available():
        pytest.skip("Triton not importable")
    torch.manual_seed(0)
    model = DeepseekV2ForCausalLM(tiny_config()).to(torch.bfloat16).eval()
    norms = [m for m in model.modules() if type(m).__name__ == "DeepseekV2RMSNorm"]
    model.model.extra_norm = _OffsetNorm(8)
    ids = torch.randint(1, 100, (1, 5))
    with torch.no_grad():
        want = model(ids).logits
    assert fused_norm.install(model) == len(norms) > 0  # the offset norm is not standard
    assert fused_norm.install(model) == len(norms)  # idempotent
    assert "forward" not in model.model.extra_norm.__dict__
    before = fused_norm.calls
    with torch.no_grad():
        got = model(ids).logits  # on the CPU: HF's forward runs
    assert fused_norm.calls == before
    assert torch.equal(got, want)
    # training goes through HF's forward (autograd) and reaches the norm weights
    model.train()
    model(ids).logits.float().sum().backward()
    assert norms[0].weight.grad is not None
