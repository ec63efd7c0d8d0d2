"""One GPU kernel for an un-merged PEFT LoRA linear at decode sizes and over an MLA cache.

PEFT's ``lora.Linear`` adds ``lora_B(lora_A(x)) * scaling`` to the base layer's output in
seven kernels (cast of x to the adapter's float32, two GEMVs, the scaling, an add that
promotes to float32, the cast back). At decode they are each a few microseconds of
launch and tail for a few thousand multiply-adds; with attention LoRA on a 27-layer
model that was more GPU time per token than the attention itself. Here the same
arithmetic — float32 products of the input with ``A`` and ``B``, times ``scaling``, added
to the float32 value of the base output, rounded once to its dtype — runs as one Triton
kernel that writes into the base layer's output.

It applies only where it computes what PEFT computes: no autograd, CUDA, at most
:data:`MAX_ROWS` rows, one active vanilla LoRA adapter with float32 weights (PEFT's
default ``autocast_adapter_dtype``), no dropout in effect, not merged, no LoRA bias; any
other call runs PEFT's own forward. :func:`install` wraps the layers of a model (decode
does this at every ``generate``); ``KTRS_FUSED_LORA=0`` turns it off.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Optional, Tuple

import torch
from torch import nn

__all__ = ["available", "install", "lora_add", "MAX_ROWS"]

#: Python-side calls of the fused path (a captured graph replays without counting).
calls = 0

#: Rows up to which the fused kernel runs. A decode step has a few (tokens × batch), but
#: the MLA attention of DeepSeek-V2/V3 in transformers 5 runs ``kv_b_proj`` over every
#: cached position at every step: its LoRA sees as many rows as the cache holds, where
#: PEFT's seven kernels pass float32 copies of the whole output around (204 µs per layer
#: at 4096 positions on an H200). Larger inputs (long prefills) run PEFT's forward.
MAX_ROWS = 8192

#: Up to this many rows a program takes one column tile; above, `_TILES_MANY_ROWS`.
_FEW_ROWS = 16
_TILES_MANY_ROWS = 16

# Launch parameters (benchmarks/bench_fused_kernels.py sweeps them on the GPU machine).
# 8 warps took 3.0 instead of 4.6 µs for one row, but 97 instead of 66 µs over 2048 rows
# (H200), and warps must be the same for both (see the kernel): 4.
_BLOCK_N = 128
_BLOCK_K = 512
_WARPS = 4

try:  # Triton ships with torch's CUDA wheels on Linux; without it PEFT's forward runs.
    import triton
    import triton.language as tl
except Exception:  # noqa: BLE001 - any import failure means "not available"
    triton = None

if triton is not None:

    @triton.jit
    def rounded(y, ptr):
        """Float32 `y` rounded once to the dtype `ptr` points to."""
        if ptr.dtype.element_ty == tl.bfloat16:
            # Round to nearest even by hand, as torch's cast does: a plain cast's rounding
            # is the backend's choice (Triton's interpreter truncates).
            bits = y.to(tl.uint32, bitcast=True)
            bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
            out = tl.where(y == y, bits.to(tl.uint16).to(tl.bfloat16, bitcast=True), y.to(tl.bfloat16))
        else:
            out = y.to(ptr.dtype.element_ty)
        return out

    @triton.jit
    def store_rounded(ptr, offs, y, mask):
        """Stores float32 `y` at `ptr + offs` rounded once to the pointer's dtype."""
        tl.store(ptr + offs, rounded(y, ptr), mask=mask)

    @triton.jit
    def _lora_add_kernel(x_ptr, a_ptr, b_ptr, y_ptr, scaling, n_out, rank, x_stride, y_stride, n_in: tl.constexpr,
                         R_PAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr, TILES: tl.constexpr):
        # n_in is a compile-time constant (a model has a few input widths): the K loop's
        # bound, which Triton 3.6's interpreter cannot take from a runtime argument.
        row = tl.program_id(0)
        r = tl.arange(0, R_PAD)
        # x·Aᵀ for this row, recomputed by every program of the row: rank × n_in
        # multiply-adds read from L2, cheaper than a second kernel and its launch.
        acc = tl.zeros([R_PAD, BLOCK_K], dtype=tl.float32)
        for k0 in range(0, n_in, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            xk = tl.load(x_ptr + row * x_stride + k, mask=k < n_in, other=0.0).to(tl.float32)
            a = tl.load(a_ptr + r[:, None] * n_in + k[None, :], mask=(r[:, None] < rank) & (k[None, :] < n_in), other=0.0)
            acc += a * xk[None, :]
        xa = tl.sum(acc, axis=1)
        # TILES column tiles per program, each computed by the same code as a lone tile:
        # a row's result does not depend on how many rows the call has (graph decode runs
        # kv_b_proj over its static cache, eager decode over the positions so far, and
        # both must give the same tokens). Block shapes and warps stay the same for every
        # call, since the reductions' order follows the block layout.
        for t in range(TILES):
            cols = (tl.program_id(1) * TILES + t) * BLOCK_N + tl.arange(0, BLOCK_N)
            b = tl.load(b_ptr + cols[:, None] * rank + r[None, :], mask=(cols[:, None] < n_out) & (r[None, :] < rank),
                        other=0.0)
            delta = tl.sum(b * xa[None, :], axis=1) * scaling
            y = tl.load(y_ptr + row * y_stride + cols, mask=cols < n_out, other=0.0).to(tl.float32) + delta
            store_rounded(y_ptr, row * y_stride + cols, y, cols < n_out)


def available() -> bool:
    """Whether the fused kernel can run here (Triton importable, not switched off)."""
    return triton is not None and os.environ.get("KTRS_FUSED_LORA", "1") != "0"


def lora_add(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, out: torch.Tensor) -> torch.Tensor:
    """``out += (x·Aᵀ·Bᵀ) * scaling`` in float32, rounded once to ``out``'s dtype, in place.

    `x` ``[..., n_in]`` (bf16/fp16), `a` ``[rank, n_in]`` and `b` ``[n_out, rank]`` float32
    contiguous, `out` ``[..., n_out]`` contiguous with x's leading shape.
    """
    n_in, n_out, rank = a.shape[1], b.shape[0], a.shape[0]
    x2 = x.reshape(-1, n_in)
    if x2.stride(1) != 1:
        x2 = x2.contiguous()
    y2 = out.view(-1, n_out)
    rows = x2.shape[0]
    r_pad = max(1, triton.next_power_of_2(rank))
    # Few rows: a program per column tile, for parallelism. Many rows (an MLA cache):
    # several tiles per program, so x·Aᵀ is recomputed less often.
    tiles = 1 if rows <= _FEW_ROWS else min(_TILES_MANY_ROWS, triton.cdiv(n_out, _BLOCK_N))
    grid = (rows, triton.cdiv(n_out, _BLOCK_N * tiles))
    _lora_add_kernel[grid](x2, a, b, y2, float(scaling), n_out, rank, x2.stride(0), y2.stride(0), n_in=n_in,
                           R_PAD=r_pad, BLOCK_K=_BLOCK_K, BLOCK_N=_BLOCK_N, TILES=tiles, num_warps=_WARPS)
    return out


def _plan(layer: nn.Module, x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor, float]]:
    """(A, B, scaling) when PEFT's forward of `layer` on `x` is exactly what `lora_add`
    computes, else None."""
    if torch.is_grad_enabled() or not x.is_cuda or x.dtype not in (torch.bfloat16, torch.float16):
        return None
    if layer.disable_adapters or layer.merged or x.numel() > MAX_ROWS * x.shape[-1]:
        return None
    active = [n for n in layer.active_adapters if n in layer.lora_A]
    if len(active) != 1 or active[0] in getattr(layer, "lora_variant", {}):
        return None
    name = active[0]
    lora_a, lora_b, drop = layer.lora_A[name], layer.lora_B[name], layer.lora_dropout[name]
    if not isinstance(drop, nn.Identity) and drop.training:
        return None
    if not (isinstance(lora_a, nn.Linear) and isinstance(lora_b, nn.Linear)) or lora_a.bias is not None or lora_b.bias is not None:
        return None
    a, b = lora_a.weight, lora_b.weight
    if a.dtype != torch.float32 or b.dtype != torch.float32 or not (a.is_cuda and b.is_cuda):
        return None
    if not (a.is_contiguous() and b.is_contiguous()):
        return None
    if not getattr(layer, "cast_input_dtype_enabled", True):
        return None  # PEFT would feed x uncast to the float32 linear
    return a, b, float(layer.scaling[name])


def _forward(layer: nn.Module, peft_forward: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    plan = None if (args or kwargs) else _plan(layer, x)
    if plan is None:
        return peft_forward(x, *args, **kwargs)
    result = layer.base_layer(x)
    if result.dtype != x.dtype or not result.is_contiguous():
        return peft_forward(x)
    global calls
    calls += 1
    a, b, scaling = plan
    return lora_add(x, a, b, scaling, result)


def install(model: nn.Module) -> int:
    """Routes the PEFT LoRA linears of `model` through the fused kernel where it applies
    (idempotent); returns how many layers are routed."""
    if not available():
        return 0
    try:
        from peft.tuners.lora.layer import Linear as LoraLinear
    except Exception:  # noqa: BLE001 - no PEFT, nothing to route
        return 0
    count = 0
    for m in model.modules():
        if type(m) is LoraLinear:  # subclasses (quantized bases, ...) keep PEFT's forward
            if "forward" not in m.__dict__:
                m.forward = functools.partial(_forward, m, m.forward)
            count += 1
    return count
