"""Autograd and ``nn.Module`` on top of :class:`ktrs.MoeExperts`."""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from .experts import LORA_NAMES, MoeExperts


class _ExpertsFunction(torch.autograd.Function):
    """``out = experts(hidden, ids, weights)``; LoRA parameters are inputs so autograd
    delivers their gradients (fresh tensors each backward: nothing the optimizer holds
    is ever overwritten by a later backward)."""

    @staticmethod
    def forward(ctx, experts: MoeExperts, hidden, topk_ids, topk_weights, *lora_params):
        needs = any(ctx.needs_input_grad[1:])
        out, handle = experts.forward(hidden.detach(), topk_ids.detach(), topk_weights.detach(), save_for_backward=needs)
        ctx.experts = experts
        ctx.handle = handle
        ctx.n_lora = len(lora_params)
        ctx.mark_non_differentiable(topk_ids) if False else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        experts: MoeExperts = ctx.experts
        if ctx.handle is None:
            raise RuntimeError("ktrs: backward without a saved forward")
        grad_out = grad_out.detach().to("cpu", torch.bfloat16).contiguous()
        want_lora = ctx.n_lora > 0 and any(ctx.needs_input_grad[4:])
        lora_grads = [torch.empty(experts.lora_shape(n), dtype=torch.float32) for n in LORA_NAMES] if want_lora else None
        grad_hidden, grad_w = experts.backward(ctx.handle, grad_out, lora_grads=lora_grads, accumulate=False)
        lora_out = tuple(lora_grads) if want_lora else (None,) * ctx.n_lora
        return (None, grad_hidden, None, grad_w, *lora_out)


def experts_function(experts: MoeExperts, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *lora_params: torch.Tensor) -> torch.Tensor:
    """Differentiable call of ``experts`` (CPU, bf16 hidden, int64 ids, f32 weights)."""
    return _ExpertsFunction.apply(experts, hidden, topk_ids, topk_weights, *lora_params)


class KtrsExperts(nn.Module):
    """An ``nn.Module`` with the call signature of HF's ``DeepseekV2Experts``:
    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

    Inputs may live on any device and dtype; the experts run on the CPU in bf16 and the
    result comes back on the input's device and dtype. Expert LoRA matrices are
    ``nn.Parameter``s whose storage is Rust memory; ``.to()``, ``.cuda()``, ``.half()``
    and friends leave them alone (see :meth:`_apply`), and if anything rebinds a
    parameter's ``.data`` the module copies the values back into Rust memory and
    restores the view before the next call.
    """

    def __init__(self, experts: MoeExperts) -> None:
        super().__init__()
        object.__setattr__(self, "experts", experts)  # not a submodule: no state to move
        self.lora = nn.ParameterDict()
        if experts.lora_rank > 0:
            for name in LORA_NAMES:
                self.lora[name] = nn.Parameter(experts.lora_weight(name), requires_grad=True)
        self._warned_rebind = False

    @classmethod
    def from_weights(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, **kwargs) -> "KtrsExperts":
        """Builds the Rust layer from ``gate [E, I, H]``, ``up [E, I, H]``, ``down [E, H, I]``."""
        return cls(MoeExperts(gate, up, down, **kwargs))

    def _apply(self, fn, recurse: bool = True):
        # Expert weights and LoRA live in Rust memory on the CPU, in fixed dtypes, and
        # the kernels read exactly that memory: device moves and casts must not reach them.
        return self

    def _ensure_views(self) -> None:
        for name, param in self.lora.items():
            view = self.experts.lora_weight(name)
            if param.data_ptr() == view.data_ptr() and param.device.type == "cpu" and param.dtype == torch.float32:
                continue
            # Something replaced the parameter's storage: keep its values, restore the view.
            with torch.no_grad():
                view.copy_(param.data.detach().to("cpu", torch.float32).reshape(view.shape))
            param.data = view
            if not self._warned_rebind:
                warnings.warn(
                    f"ktrs: the storage of expert LoRA parameter '{name}' was replaced (by .data assignment or a "
                    "device/dtype move); its values were copied back into ktrs memory and the view restored.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_rebind = True

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        self._ensure_views()
        device, dtype = hidden_states.device, hidden_states.dtype
        x = hidden_states.to("cpu", torch.bfloat16).contiguous()
        ids = top_k_index.to("cpu", torch.int64).contiguous()
        w = top_k_weights.to("cpu", torch.float32).contiguous()
        params = tuple(self.lora[n] for n in LORA_NAMES) if len(self.lora) else ()
        out = experts_function(self.experts, x, ids, w, *params)
        return out.to(device=device, dtype=dtype)

    def extra_repr(self) -> str:
        e = self.experts
        return f"num_experts={e.num_experts}, hidden_size={e.hidden_size}, intermediate_size={e.intermediate_size}, lora_rank={e.lora_rank}, isa={e.isa}, threads={e.threads}"
