"""Autograd and ``nn.Module`` on top of :class:`ktrs.MoeExperts`."""

from __future__ import annotations

import os
import warnings
import weakref
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from ._native import NonFiniteError, StaleHandleError
from .experts import LORA_NAMES, MoeExperts


class Timer:
    """Wall time spent in ktrs expert kernels (forward and backward), for reports."""

    _GLOBAL: "Timer" = None  # type: ignore[assignment]

    def __init__(self) -> None:
        self.seconds = 0.0

    @classmethod
    def global_(cls) -> "Timer":
        if cls._GLOBAL is None:
            cls._GLOBAL = cls()
        return cls._GLOBAL

    def reset(self) -> None:
        self.seconds = 0.0


def _timed(fn, *args, **kwargs):
    import time

    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        Timer.global_().seconds += time.perf_counter() - t0


#: Forward caches alive now (for tests and memory accounting).
_LIVE_HANDLES: "weakref.WeakSet" = weakref.WeakSet()


def live_forward_caches() -> int:
    """How many expert forward caches (Rust memory) are alive."""
    return len(_LIVE_HANDLES)


class _ExpertsFunction(torch.autograd.Function):
    """``out = experts(hidden, ids, weights)``; LoRA parameters are inputs so autograd
    delivers their gradients (fresh tensors each backward: nothing the optimizer holds
    is ever overwritten by a later backward)."""

    @staticmethod
    def forward(ctx, experts: MoeExperts, where: Optional[str], hidden, topk_ids, topk_weights, *lora_params):
        needs = any(ctx.needs_input_grad[2:])
        # Without LoRA parameters the call runs the base experts (adapter disabled).
        use_lora = len(lora_params) > 0
        out, handle = _timed(experts.forward, hidden.detach(), topk_ids.detach(), topk_weights.detach(), save_for_backward=needs, use_lora=use_lora)
        if where is not None:
            _guard_rows(out, where, "expert output", topk_ids)
        # The Rust forward cache rides on an empty saved tensor rather than on ctx, so
        # activation checkpointing sees it: non-reentrant checkpointing drops it after the
        # forward and the recomputed forward makes the one backward uses.
        token = torch.empty(0)
        token._ktrs_handle, token._ktrs_ids = handle, topk_ids.detach()
        if handle is not None:
            _LIVE_HANDLES.add(handle)
        ctx.save_for_backward(token)
        ctx.experts, ctx.where = experts, where
        # Gradients take the shapes of the parameters that went in; a LoRA replaced since
        # (enable_lora) makes the handle stale, which backward reports.
        ctx.lora_shapes = [p.shape for p in lora_params]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        experts: MoeExperts = ctx.experts
        (token,) = ctx.saved_tensors
        handle, ids = getattr(token, "_ktrs_handle", None), getattr(token, "_ktrs_ids", None)
        if handle is None:
            raise StaleHandleError("ktrs: backward without a saved forward (was the forward run under torch.no_grad()?)")
        grad_out = grad_out.detach().to("cpu", torch.bfloat16).contiguous()
        n_lora = len(ctx.lora_shapes)
        want_lora = n_lora > 0 and any(ctx.needs_input_grad[5:])
        lora_grads = [torch.empty(s, dtype=torch.float32) for s in ctx.lora_shapes] if want_lora else None
        grad_hidden, grad_w = _timed(experts.backward, handle, grad_out, lora_grads=lora_grads, accumulate=False)
        if ctx.where is not None:
            _guard_rows(grad_hidden, ctx.where, "input gradient", ids)
            for name, g in zip(LORA_NAMES, lora_grads or ()):
                bad = (~torch.isfinite(g)).flatten(1).any(1).nonzero().flatten().tolist()
                if bad:
                    raise NonFiniteError(f"ktrs: non-finite gradient of expert LoRA {name} in {ctx.where}, experts {bad[:8]}")
        lora_out = tuple(lora_grads) if want_lora else (None,) * n_lora
        return (None, None, grad_hidden, None, grad_w, *lora_out)


def _guard_rows(t: torch.Tensor, where: str, what: str, ids: torch.Tensor) -> None:
    """Raises, naming layer, tokens and their experts, if `t` holds NaN or Inf."""
    bad = (~torch.isfinite(t)).any(1).nonzero().flatten()
    if len(bad):
        toks = bad[:4].tolist()
        experts = sorted(set(ids[bad[:4]].flatten().tolist()))
        raise NonFiniteError(f"ktrs: non-finite {what} in {where}: tokens {toks} (routed to experts {experts}); {len(bad)} rows affected")


def experts_function(experts: MoeExperts, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, *lora_params: torch.Tensor, guard: Optional[str] = None) -> torch.Tensor:
    """Differentiable call of ``experts`` (CPU, bf16 hidden, int64 ids, f32 weights).
    The layer's LoRA applies when ``lora_params`` (its six parameters) are given, and
    they receive its gradients; without them the base experts run.
    With ``guard`` (a name for messages), NaN/Inf in the output or any gradient raise."""
    return _ExpertsFunction.apply(experts, guard, hidden, topk_ids, topk_weights, *lora_params)


_EXECUTOR = None


def _executor():
    global _EXECUTOR
    if _EXECUTOR is None:
        from concurrent.futures import ThreadPoolExecutor

        # One thread: ktrs runs one layer at a time anyway (its pool serialises jobs).
        _EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktrs-submit")
    return _EXECUTOR


class ExpertsFuture:
    """The pending result of :meth:`KtrsExperts.submit`."""

    def __init__(self, module: "KtrsExperts", hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.device, self.dtype = hidden.device, hidden.dtype
        pin = hidden.is_cuda
        x = torch.empty(hidden.shape, dtype=torch.bfloat16, pin_memory=pin)
        i = torch.empty(ids.shape, dtype=torch.int64, pin_memory=pin)
        w = torch.empty(weights.shape, dtype=torch.float32, pin_memory=pin)
        x.copy_(hidden.detach(), non_blocking=pin)
        i.copy_(ids.detach(), non_blocking=pin)
        w.copy_(weights.detach(), non_blocking=pin)
        event = None
        if pin:
            event = torch.cuda.Event()
            event.record()
        out = torch.empty(hidden.shape, dtype=torch.bfloat16, pin_memory=pin)
        experts, use_lora = module.experts, module.lora_active

        def work():
            if event is not None:
                event.synchronize()
            _timed(experts.forward, x, i, w, out=out, use_lora=use_lora)
            return out

        self._future = _executor().submit(work)

    def result(self) -> torch.Tensor:
        out = self._future.result()
        return out.to(device=self.device, dtype=self.dtype, non_blocking=self.device.type == "cuda")


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
        # "lora_" in the name: PEFT keeps such parameters trainable when it freezes the rest.
        self.lora_experts = nn.ParameterDict()
        self._bind_lora()
        self._warned_rebind = False
        #: Name used in error messages (patch_model sets the block's path).
        self.where = "experts"
        #: Non-finite guard: None = on while autograd records (training), or True/False.
        self.check_finite: Optional[bool] = None if os.environ.get("KTRS_CHECK_FINITE", "1") != "0" else False
        # PEFT adapter state, kept in step with the PeftModel by `ktrs.peft` (PEFT's
        # controls act on its own layers only, failure-modes row 11): the expert LoRA
        # belongs to adapter `expert_adapter` and applies while adapters are enabled and
        # that adapter is active. Other adapters' expert LoRA waits in `_stash` (CPU
        # copies the kernels never read) until `set_adapter` activates it.
        self.expert_adapter: Optional[str] = "default"
        self.active_adapters: Tuple[str, ...] = ("default",)
        self.adapters_enabled = True
        #: Set by PEFT's merge_adapter. ktrs keeps the expert LoRA unfused while "merged"
        #: (the outputs are those of the merged weights; unmerge is exact).
        self.lora_merged = False
        self._stash: Dict[str, Tuple[Tuple[int, float, bool], Dict[str, torch.Tensor]]] = {}

    @property
    def lora_active(self) -> bool:
        """Whether the expert LoRA takes part in the forward now (see PEFT's adapter controls)."""
        return len(self.lora_experts) > 0 and self.adapters_enabled and self.expert_adapter in self.active_adapters

    def adapter_names(self) -> List[str]:
        """Adapters whose expert LoRA this layer holds (in Rust, or stashed)."""
        names = set(self._stash)
        if self.expert_adapter is not None and len(self.lora_experts):
            names.add(self.expert_adapter)
        return sorted(names)

    def stash_adapter(self) -> None:
        """Moves the current expert LoRA aside (CPU copies), leaving the layer without LoRA."""
        if self.expert_adapter is not None and len(self.lora_experts):
            e = self.experts
            cfg = (e.lora_rank, float(e.lora_alpha), e.use_rslora)
            self._stash[self.expert_adapter] = (cfg, {n: e.lora_weight(n).detach().clone() for n in LORA_NAMES})
        self.enable_lora(0)
        self.expert_adapter = None

    def activate_adapter(self, name: str) -> None:
        """Makes adapter ``name``'s stashed expert LoRA the one in Rust memory (new parameters)."""
        if name == self.expert_adapter or name not in self._stash:
            return
        self.stash_adapter()
        (rank, alpha, rslora), mats = self._stash.pop(name)
        self.enable_lora(rank, alpha=alpha, use_rslora=rslora)
        for n, t in mats.items():
            self.experts.set_lora_weight(n, t)
        self.expert_adapter = name

    def add_adapter_lora(self, name: str, rank: int, alpha: Optional[float] = None, use_rslora: bool = False, seed: int = 0) -> None:
        """Sets aside fresh expert LoRA (PEFT init) for a further adapter ``name``;
        ``activate_adapter(name)`` makes it the one the kernels run."""
        e = self.experts
        # The Rust initialisation, from a layer whose zero weights are never touched
        # (their pages are never faulted in).
        fresh = MoeExperts.empty(e.num_experts, e.hidden_size, e.intermediate_size, lora_rank=rank, lora_alpha=alpha, use_rslora=use_rslora, threads=1, seed=seed)
        self._stash[name] = ((rank, float(fresh.lora_alpha), use_rslora), {n: fresh.lora_weight(n).clone() for n in LORA_NAMES})

    def delete_adapter(self, name: str) -> None:
        """Drops adapter ``name``'s expert LoRA."""
        self._stash.pop(name, None)
        if name == self.expert_adapter:
            self.enable_lora(0)
            self.expert_adapter = None

    @property
    def lora(self) -> nn.ParameterDict:
        """The six expert-LoRA parameters (``gate_A`` … ``down_B``), views of Rust memory."""
        return self.lora_experts

    def _bind_lora(self) -> None:
        self.lora_experts = nn.ParameterDict()
        if self.experts.lora_rank > 0:
            for name in LORA_NAMES:
                self.lora_experts[name] = nn.Parameter(self.experts.lora_weight(name), requires_grad=True)

    def enable_lora(self, rank: int, alpha: Optional[float] = None, use_rslora: bool = False, seed: int = 0) -> None:
        """Gives the experts fresh LoRA (PEFT init) owned by Rust, as new parameters."""
        self.experts.set_lora(rank, lora_alpha=alpha, use_rslora=use_rslora, seed=seed)
        self._bind_lora()

    @classmethod
    def from_weights(cls, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor, **kwargs) -> "KtrsExperts":
        """Builds the Rust layer from ``gate [E, I, H]``, ``up [E, I, H]``, ``down [E, H, I]``."""
        return cls(MoeExperts(gate, up, down, **kwargs))

    def _apply(self, fn, recurse: bool = True):
        # Expert weights and LoRA live in Rust memory on the CPU, in fixed dtypes, and
        # the kernels read exactly that memory: device moves and casts must not reach them.
        return self

    def _ensure_views(self) -> None:
        for name, param in self.lora_experts.items():
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
        params = tuple(self.lora_experts[n] for n in LORA_NAMES) if self.lora_active else ()
        check = torch.is_grad_enabled() if self.check_finite is None else self.check_finite
        out = experts_function(self.experts, x, ids, w, *params, guard=self.where if check else None)
        return out.to(device=device, dtype=dtype)

    # -- what HF/PEFT code may inspect ---------------------------------------------------
    @property
    def gate_up_proj(self) -> torch.Tensor:
        """A zero-byte (meta) placeholder of the HF shape ``[E, 2I, H]``; the weights are in Rust."""
        e = self.experts
        return torch.empty(e.num_experts, 2 * e.intermediate_size, e.hidden_size, device="meta", dtype=torch.bfloat16)

    @property
    def down_proj(self) -> torch.Tensor:
        """A zero-byte (meta) placeholder of the HF shape ``[E, H, I]``."""
        e = self.experts
        return torch.empty(e.num_experts, e.hidden_size, e.intermediate_size, device="meta", dtype=torch.bfloat16)

    @property
    def num_experts(self) -> int:
        return self.experts.num_experts

    def submit(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> "ExpertsFuture":
        """Starts the expert computation for CUDA inputs without waiting for it (no autograd).

        Inputs are copied to pinned host memory on the current stream; a worker thread waits
        for that copy, runs the kernels (the GIL is released meanwhile) and the result comes
        back to the GPU when :meth:`ExpertsFuture.result` is called. Meanwhile the caller can
        queue more GPU work (the shared experts).
        """
        self._ensure_views()
        return ExpertsFuture(self, hidden_states, top_k_index, top_k_weights)

    def extra_repr(self) -> str:
        e = self.experts
        return f"num_experts={e.num_experts}, hidden_size={e.hidden_size}, intermediate_size={e.intermediate_size}, lora_rank={e.lora_rank}, isa={e.isa}, threads={e.threads}"
