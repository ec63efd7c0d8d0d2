"""The fused LoRA kernel (ktrs.fused_lora) against PEFT's own lora.Linear forward and
float64 math. Without CUDA the Triton kernel runs in Triton's interpreter, in a child
process (the interpreter is chosen at import); with CUDA it runs on the GPU, inside a
decode with an adapter."""

import textwrap

import pytest
import torch

from conftest import run_triton_case

pytest.importorskip("triton")
pytest.importorskip("peft")

CASE = textwrap.dedent(
    """
    import torch
    from torch import nn
    from peft import LoraConfig, get_peft_model
    from ktrs import fused_lora

    torch.manual_seed(0)
    dev = DEVICE
    # more than 16 rows: several column tiles per program (decode's kv_b_proj over the cache)
    for n_in, n_out, r, rows, alpha in [(2048, 4096, 8, 1, 16), (300, 130, 5, 3, 7), (64, 2048, 16, 16, 32),
                                        (512, 2048, 8, 40, 16), (300, 130, 5, 17, 7), (96, 1200, 40, 24, 8)]:
        base = nn.Sequential(nn.Linear(n_in, n_out, bias=False)).to(torch.bfloat16)
        pm = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=["0"]))
        layer = pm.base_model.model[0]
        with torch.no_grad():
            layer.lora_B["default"].weight.normal_(0, 0.5)
        layer.to(dev)
        assert layer.lora_A["default"].weight.dtype == torch.float32  # PEFT's default upcast
        x = torch.randn(rows, n_in).to(torch.bfloat16).to(dev)
        with torch.no_grad():
            want = layer(x)  # PEFT's forward (the fused one is not installed yet)
            a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
            got = fused_lora.lora_add(x, a, b, layer.scaling["default"], layer.base_layer(x))
            strided = torch.stack([x, x], dim=-1)[..., 0]  # the same values, every other element
            assert not strided.is_contiguous()
            assert torch.equal(fused_lora.lora_add(strided, a, b, layer.scaling["default"], layer.base_layer(x)), got)
            # A row's result does not depend on how many rows the call has: graph decode
            # runs kv_b_proj over a static cache, eager decode over the positions so far.
            base_rows = layer.base_layer(x)
            for i in sorted({0, rows // 2, rows - 1}):
                one = fused_lora.lora_add(x[i : i + 1], a, b, layer.scaling["default"], base_rows[i : i + 1].clone())
                assert torch.equal(one, fused_lora.lora_add(x, a, b, layer.scaling["default"], base_rows.clone())[i : i + 1])
        # float64 reference of the same formula
        ref = layer.base_layer(x).double() + (x.double() @ a.double().T @ b.double().T) * layer.scaling["default"]
        assert got.dtype == want.dtype == torch.bfloat16 and got.shape == want.shape
        # One rounding to bf16 of a float32 value: within one bf16 ulp of float64, plus the
        # float32 sums' own error where terms cancel (it scales with the terms' magnitude) ...
        mag = layer.base_layer(x).double().abs() + (x.double().abs() @ a.double().abs().T @ b.double().abs().T) * layer.scaling["default"]
        tol = ref.abs().clamp_min(1e-30) * 2.0**-7 + mag * 2.0**-18
        assert ((got.double() - ref).abs() <= tol).all(), ((got.double() - ref).abs() / tol).max()
        # ... and equal to PEFT's result but where the float32 sums part at a rounding tie.
        differ = (got != want).float().mean().item()
        assert differ < 0.01, differ
        assert ((got.double() - want.double()).abs() <= 2 * tol).all()
    print("ok")
    """
)


def test_fused_lora_kernel_matches_peft_in_the_interpreter():
    run_triton_case(CASE, "cpu")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")
def test_fused_lora_kernel_matches_peft_on_the_gpu():
    run_triton_case(CASE, "cuda")


def test_install_routes_only_plain_lora_linears_and_falls_back_off_the_gpu():
    from peft import LoraConfig, get_peft_model
    from torch import nn

    from ktrs import fused_lora

    if not fused_lora.available():
        pytest.skip("Triton not importable")
    base = nn.Sequential(nn.Linear(32, 48, bias=False), nn.ReLU(), nn.Linear(48, 16, bias=False)).to(torch.bfloat16)
    pm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["0", "2"]))
    x = torch.randn(2, 32).to(torch.bfloat16)
    with torch.no_grad():
        want = pm(x)
    assert fused_lora.install(pm) == 2
    assert fused_lora.install(pm) == 2  # idempotent: no double wrapping
    with torch.no_grad():
        got = pm(x)  # on the CPU: PEFT's forward runs
    assert torch.equal(got, want)
    # training still goes through PEFT (autograd), and gradients reach the LoRA weights
    pm(x).float().sum().backward()
    assert pm.base_model.model[0].lora_B["default"].weight.grad is not None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")
def test_decode_with_an_adapter_runs_the_fused_kernel_and_matches_peft():
    from transformers import DeepseekV2ForCausalLM

    import ktrs
    from ktrs import fused_lora
    from test_decode import adapter_model, prompt
    from test_patch_model import bf16_exact, tiny_config

    torch.manual_seed(0)
    reference = bf16_exact(DeepseekV2ForCausalLM(tiny_config(vocab_size=256, max_position_embeddings=256))).eval()
    pm = adapter_model(reference)
    ids = prompt(t=5)
    with torch.no_grad():
        want = pm(ids).logits  # PEFT's forward: nothing installed yet
    before = fused_lora.calls
    out = pm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert fused_lora.calls > before  # generate installed it, the capture went through it
    with torch.no_grad():
        got = pm(ids).logits
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # the same tokens as PEFT's own forward, eagerly
    from peft.tuners.lora.layer import Linear as LoraLinear

    routed = [m for m in pm.modules() if type(m) is LoraLinear and "forward" in m.__dict__]
    assert routed
    for m in routed:
        del m.forward
    ktrs.decode.disable(pm)
    try:
        ref_out = pm.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    finally:
        ktrs.decode.enable(pm)
    assert torch.equal(out, ref_out)
