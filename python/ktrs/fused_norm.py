"""One GPU kernel for the RMSNorm of HF's MoE models at decode sizes.

HF's RMSNorm (``x.float()``, ``pow``, ``mean``, ``+ eps``, ``rsqrt``, ``*``, cast back,
``weight *``) is seven kernels of a few microseconds each; a DeepSeek-V2-Lite decode step
runs 82 of them (three per layer and the final one), about a millisecond of GPU time
per token on the critical path between the CPU experts of two layers. Here the same
float32 arithmetic, with the two roundings HF does (the normalised value to the input's
dtype, then the product with the weight), runs as one Triton kernel.

It applies where it computes what HF computes: a module whose ``forward`` is, byte code
for byte code, the standard RMSNorm forward (DeepSeek-V2/V3, Qwen2/3-MoE, Mixtral,
GLM-4-MoE, OLMoE and Llama share it), no autograd, CUDA, at most :data:`MAX_ROWS` rows,
weight and input of one 16-bit dtype. Every other call runs HF's forward. The sum of
squares is added in another order than torch's reduction, so a result can differ from
HF's by one unit in the last place; decode's graph and eager paths both run this
forward, so their tokens stay identical. :func:`install` wraps the norms of a model
(decode does this at every ``generate``); ``KTRS_FUSED_NORM=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import torch
from torch import nn

from .fused_lora import triton

__all__ = ["available", "install", "rms_norm", "MAX_ROWS"]

#: Python-side calls of the fused path (a captured graph replays without counting).
calls = 0

#: Rows (tokens × batch) up to which the fused kernel runs (prefill keeps torch's).
MAX_ROWS = 16

#: Widest normalised dimension (one program holds a row).
MAX_WIDTH = 16384

if triton is not None:
    import triton.language as tl

    from .fused_lora import rounded, store_rounded

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, x_stride, y_stride, eps, n: tl.constexpr, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        c = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + row * x_stride + c, mask=c < n, other=0.0).to(tl.float32)
        var = tl.sum(x * x, axis=0) / n
        h = x * tl.math.rsqrt(var + eps)
        # HF rounds the normalised value to the input dtype before the weight multiplies it.
        hr = rounded(h, y_ptr).to(tl.float32)
        w = tl.load(w_ptr + c, mask=c < n, other=0.0).to(tl.float32)
        store_rounded(y_ptr, row * y_stride + c, w * hr, c < n)


def available() -> bool:
    """Whether the fused kernel can run here (Triton importable, not switched off)."""
    return triton is not None and os.environ.get("KTRS_FUSED_NORM", "1") != "0"


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """HF's RMSNorm of `x` ``[..., n]`` with `weight` ``[n]`` (both bf16 or both fp16,
    last dimension contiguous) as one kernel; a new tensor like `x`."""
    n = x.shape[-1]
    x2 = x.reshape(-1, n)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    y2 = out.view(-1, n)
    _rms_norm_kernel[(x2.shape[0],)](x2, weight, y2, x2.stride(0), y2.stride(0), float(eps), n=n,
                                     BLOCK=triton.next_power_of_2(n))
    return out


@functools.lru_cache(maxsize=None)
def _standard_forward(code: Any) -> bool:
    """Whether a forward's code object is the standard RMSNorm forward."""
    try:
        from transformers.models.llama.modeling_llama import LlamaRMSNorm
    except Exception:  # noqa: BLE001 - no reference, nothing is standard
        return False
    ref = LlamaRMSNorm.forward.__code__
    return (code.co_code, code.co_consts, code.co_names, code.co_varnames) == (
        ref.co_code, ref.co_consts, ref.co_names, ref.co_varnames)


def _applies(m: nn.Module, x: torch.Tensor) -> bool:
    w = m.weight
    return (not torch.is_grad_enabled() and x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and w.dtype == x.dtype and w.is_cuda and w.dim() == 1 and w.is_contiguous() and x.shape[-1] == w.shape[0]
            and x.shape[-1] <= MAX_WIDTH and x.numel() <= MAX_ROWS * x.shape[-1])


def _forward(m: nn.Module, hf_forward: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    if args or kwargs or not _applies(m, x):
        return hf_forward(x, *args, **kwargs)
    global calls
    calls += 1
    return rms_norm(x, m.weight, m.variance_epsilon)


def install(model: nn.Module) -> int:
    """Routes the standard RMSNorms of `model` through the fused kernel where it applies
    (idempotent); returns how many modules are routed."""
    if not available():
        return 0
    count = 0
    for m in model.modules():
        fwd = getattr(type(m), "forward", None)
        if not hasattr(m, "variance_epsilon") or not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue
        if fwd is None or not _standard_forward(fwd.__code__):
            continue
        if "forward" not in m.__dict__:
            m.forward = functools.partial(_forward, m, m.forward)
        count += 1
    return count
