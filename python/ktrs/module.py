"""Autograd and ``nn.Module`` on top of :class:`ktrs.MoeExperts`."""

from __future__ import annotations

import functools
import itertools
import os
import sys
import threading
import time
import warnings
import weakref
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import nn

from ._native import KtrsValueError, NonFiniteError, StaleHandleError
from . import gpu_experts
from .experts import LORA_NAMES, MoeExperts, background, check_call
from .resident import ResidentExperts


class Timer:
    """What the ktrs expert kernels cost, process-wide: wall time of forwards and
    backwards, how many ran, how many checkpoint recomputes were served from a kept
    forward (no kernel run), and the host<->device copies (with the waits on the GPU they
    imply) around them. Per-layer figures are kept while :attr:`per_layer` is True (the
    profile of ``benchmarks/bench_model.py``); the totals cost two clock reads per call."""

    _GLOBAL: "Timer" = None  # type: ignore[assignment]

    def __init__(self) -> None:
        self.per_layer = False
        self.reset()

    @classmethod
    def global_(cls) -> "Timer":
        """The process-wide timer every expert call reports to."""
        if cls._GLOBAL is None:
            cls._GLOBAL = cls()
        return cls._GLOBAL

    def reset(self) -> None:
        """Zeroes every figure (keeps :attr:`per_layer`)."""
        #: Seconds in expert kernels, forward plus backward.
        self.seconds = 0.0
        self.forward_seconds = 0.0
        self.backward_seconds = 0.0
        #: Kernel runs; a recompute served from a kept forward counts in `reused` only.
        self.forwards = 0
        self.backwards = 0
        self.reused = 0
        #: Seconds moving inputs, outputs and output gradients between the caller's
        #: device and the host (including waiting for the GPU to produce them); on the
        #: stream path (`stream_call`), only the Python time enqueuing the copies.
        self.copy_seconds = 0.0
        #: Seconds Python waited for expert calls in flight on the stream path (at the
        #: end of each backward): the CPU experts' time that nothing overlapped.
        self.wait_seconds = 0.0
        #: Per layer name: {"forward_s", "backward_s", "forwards", "backwards", "reused", "copy_s"}.
        self.layers: Dict[str, Dict[str, float]] = {}

    def snapshot(self) -> Dict[str, Any]:
        """The figures as a plain dict (for JSON)."""
        keys = ("seconds", "forward_seconds", "backward_seconds", "forwards", "backwards", "reused", "copy_seconds", "wait_seconds")
        snap: Dict[str, Any] = {k: getattr(self, k) for k in keys}
        snap["layers"] = {n: dict(v) for n, v in self.layers.items()}
        return snap

    def _layer(self, name: Optional[str]) -> Optional[Dict[str, float]]:
        if not self.per_layer or name is None:
            return None
        rec = self.layers.get(name)
        if rec is None:
            rec = self.layers[name] = dict(forward_s=0.0, backward_s=0.0, forwards=0, backwards=0, reused=0, copy_s=0.0)
        return rec

    def add(self, kind: str, seconds: float, name: Optional[str] = None, count: bool = True) -> None:
        """Records one event: ``kind`` is "forward", "backward", "reused", "copy" or "wait".
        ``count=False`` adds a kernel's seconds without counting a run (the stream path
        counts a run when it is launched and learns its time later)."""
        if kind == "wait":
            self.wait_seconds += seconds
            return
        rec = self._layer(name)
        if kind == "copy":
            self.copy_seconds += seconds
            if rec is not None:
                rec["copy_s"] += seconds
            return
        if kind == "reused":
            self.reused += 1
            if rec is not None:
                rec["reused"] += 1
            return
        self.seconds += seconds
        if kind == "forward":
            self.forward_seconds += seconds
            self.forwards += count
        else:
            self.backward_seconds += seconds
            self.backwards += count
        if rec is not None:
            rec[f"{kind}_s"] += seconds
            rec[f"{kind}s"] += count


def _timed(kind: str, name: Optional[str], fn, *args, **kwargs):
    t0 = time.perf_counter()
    try:
        return fn(*args, **kwargs)
    finally:
        Timer.global_().add(kind, time.perf_counter() - t0, name)


#: Forward caches alive now (for tests and memory accounting).
_LIVE_HANDLES: "weakref.WeakSet" = weakref.WeakSet()


def live_forward_caches() -> int:
    """How many expert forward caches (Rust memory) are alive."""
    return len(_LIVE_HANDLES) + stream_call.live_caches()


# -- forwards kept for the recompute of activation checkpointing -----------------------------
#
# A checkpointed forward's expert result and Rust cache stay in host memory until the
# recompute during backward asks for them again; the recompute then returns the kept output
# without running a kernel. Who keeps them alive decides how long they live:
#   * non-reentrant checkpointing (grad on, the saved-tensor hooks drop what the function
#     saves): the autograd node of the first forward holds its _FirstPass; its backward
#     uses the cache and lets go;
#   * reentrant checkpointing (first forward under no_grad inside CheckpointFunction): the
#     CheckpointFunction's node holds them; the recompute takes the cache over.
# So they never outlive the step's autograd graph, and a forward whose backward never
# comes frees them with its graph. `_PENDING` only indexes them (weak references) so a
# recompute can find its first pass; `KTRS_RECOMPUTE_CACHE_MB` bounds what is kept.
# The stream path (stream_call.py) keeps its first passes in its staging instead, as
# `stream_call._KeptStage` entries of the same index (one matching: `_take`, `matches`);
# their inputs are compared by the recompute's host function, without a sync.


def _state_key(experts: MoeExperts, use_lora: bool, lora_params: Tuple[torch.Tensor, ...]) -> tuple:
    """What an expert forward depends on besides its inputs."""
    return (experts.state_version, experts.lora_generation, use_lora, tuple(p._version for p in lora_params))


class _FirstPass:
    """One expert forward kept for its recompute: the host inputs it ran on (to match the
    recompute exactly), its output and Rust cache, and the state it ran under."""

    __slots__ = ("experts", "x", "ids", "w", "versions", "state", "out", "handle", "owner", "nbytes", "order", "__weakref__")

    def __init__(self, experts: MoeExperts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, state: tuple, out: torch.Tensor, handle) -> None:
        self.experts = experts
        # Detached aliases: they share the version counters (an in-place change after the
        # forward shows) but reference no autograd node (no cycle through the node that
        # owns this object).
        self.x, self.ids, self.w, self.out = x.detach(), ids.detach(), w.detach(), out.detach()
        self.versions = (x._version, ids._version, w._version, out._version)
        self.state = state
        self.handle = handle
        #: Weak reference to the list of a reentrant checkpoint node that keeps this one.
        self.owner: Optional["weakref.ref[_Kept]"] = None
        self.nbytes = (handle.nbytes if handle is not None else 0) + 2 * x.numel() * x.element_size()
        self.order = next(_ORDER)

    def usable(self) -> bool:
        """Whether a recompute can still be served from this forward."""
        return self.out is not None

    def matches(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, state: tuple) -> bool:
        """Whether a recompute on `x, ids, w` under `state` is this forward: the same layer
        state (weights, LoRA values and versions, adapter on/off) and shapes here, the same
        inputs in :meth:`same_inputs`."""
        if not self.usable() or state != self.state:
            return False
        if self.shape != (tuple(x.shape), tuple(ids.shape), tuple(w.shape)):
            return False
        return self.same_inputs(x, ids, w)

    def same_inputs(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> bool:
        """Unchanged since the forward (version counters) and equal to the recompute's."""
        if (self.x._version, self.ids._version, self.w._version, self.out._version) != self.versions:
            return False
        return torch.equal(self.ids, ids) and torch.equal(self.w, w) and torch.equal(self.x, x)

    @property
    def shape(self) -> tuple:
        return (tuple(self.x.shape), tuple(self.ids.shape), tuple(self.w.shape))

    def release_inputs(self) -> None:
        """Keeps only the cache (the output was handed to the recompute)."""
        self.x = self.w = self.out = None

    def drop(self) -> None:
        """Frees everything; a backward that wanted the cache recomputes instead."""
        self.release_inputs()
        self.handle = None
        self.disown()

    def disown(self) -> None:
        """Leaves the reentrant checkpoint node that kept it."""
        kept = self.owner() if self.owner is not None else None
        if kept is not None and self in kept:
            kept.remove(self)
        self.owner = None


class _Kept(list):
    """The forwards a reentrant checkpoint node keeps (a list that entries can refer to
    weakly, so no cycle delays freeing them)."""

    __slots__ = ("__weakref__",)


_PENDING: "weakref.WeakKeyDictionary[MoeExperts, List[weakref.ref]]" = weakref.WeakKeyDictionary()
# On CUDA, recomputes run on autograd's device thread while CPU nodes (the experts'
# backward) run on the caller's: the index is shared between them.
_PENDING_LOCK = threading.RLock()
_ORDER = itertools.count()


def _recompute_limit() -> Optional[int]:
    mb = os.environ.get("KTRS_RECOMPUTE_CACHE_MB")
    if mb in (None, ""):
        return None
    try:
        return int(float(mb) * 2**20)
    except ValueError:
        raise KtrsValueError(f"KTRS_RECOMPUTE_CACHE_MB must be a number of MiB, got {mb!r}") from None


def _pending(experts: MoeExperts) -> List["_FirstPass"]:
    with _PENDING_LOCK:
        refs = _PENDING.get(experts, [])
        alive = [e for e in (r() for r in refs) if e is not None and e.usable()]
        if len(alive) != len(refs):
            _PENDING[experts] = [weakref.ref(e) for e in alive]
        return alive


def _remember(entry: _FirstPass) -> None:
    """Indexes `entry` for its recompute; drops the oldest kept forwards beyond the limit."""
    limit = _recompute_limit()
    with _PENDING_LOCK:
        _PENDING.setdefault(entry.experts, []).append(weakref.ref(entry))
        if limit is None:
            return
        kept = [e for ex in list(_PENDING.keys()) for e in _pending(ex)]
        total = sum(e.nbytes for e in kept)
        for e in sorted(kept, key=lambda e: e.order):  # oldest first
            if total <= limit:
                break
            total -= e.nbytes
            e.drop()


def _take(experts: MoeExperts, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor, state: tuple, kind: type = None) -> Optional["_FirstPass"]:
    """The kept forward this call recomputes, removed from the index, or None. `kind`:
    the class of kept forward the caller can use (:class:`_FirstPass`, kept in host
    tensors, by default; ``stream_call`` keeps them in its stages)."""
    kind = kind or _FirstPass
    with _PENDING_LOCK:
        # Newest first: backward meets the forwards of one step in reverse order.
        for e in reversed(_pending(experts)):
            if type(e) is kind and e.matches(x, ids, w, state):
                _PENDING[experts] = [r for r in _PENDING[experts] if r() is not e]
                return e
    return None


def pending_recomputes() -> int:
    """How many expert forwards are kept for a checkpoint recompute now."""
    with _PENDING_LOCK:
        return sum(len(_pending(ex)) for ex in list(_PENDING.keys()))


def clear_recompute_caches() -> None:
    """Frees every expert forward kept for a checkpoint recompute (their recomputes then
    run the kernels again; results are unchanged)."""
    with _PENDING_LOCK:
        for ex in list(_PENDING.keys()):
            for e in _pending(ex):
                e.drop()
        _PENDING.clear()


_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)


def _in_backward() -> bool:
    """Whether autograd is running a backward on this thread (checkpoint recomputes run
    inside it). Without torch's probe no forward is reused: always correct, only slower."""
    return _GRAPH_TASK_ID is not None and _GRAPH_TASK_ID() != -1


_CHECKPOINT_CODE = None


def _reentrant_checkpoint_owner():
    """The node of the reentrant ``torch.utils.checkpoint`` whose no-grad forward is running
    this call (``CheckpointFunction.forward`` on the stack), or None."""
    global _CHECKPOINT_CODE
    if _CHECKPOINT_CODE is None:
        from torch.utils.checkpoint import CheckpointFunction

        _CHECKPOINT_CODE = getattr(CheckpointFunction.forward, "__code__", False)
    if not _CHECKPOINT_CODE:
        return None
    f = sys._getframe(2)
    for _ in range(128):
        if f is None:
            return None
        if f.f_code is _CHECKPOINT_CODE:
            return f.f_locals.get("ctx")
        f = f.f_back
    return None


def _keep_for_recompute(owner, entry: _FirstPass) -> None:
    """Makes the reentrant checkpoint node `owner` keep `entry` until its recompute."""
    kept = getattr(owner, "_ktrs_first_passes", None)
    if kept is None:
        kept = owner._ktrs_first_passes = _Kept()
    kept.append(entry)
    entry.owner = weakref.ref(kept)
    _remember(entry)


class _Call:
    """Per-call options of :class:`_ExpertsFunction` (not tensors, so autograd ignores them)."""

    __slots__ = ("experts", "guard", "name", "record")

    def __init__(self, experts: MoeExperts, guard: Optional[str], name: Optional[str], record: bool) -> None:
        self.experts, self.guard, self.name, self.record = experts, guard, name, record


class _ExpertsFunction(torch.autograd.Function):
    """``out = experts(hidden, ids, weights)``; LoRA parameters are inputs so autograd
    delivers their gradients (fresh tensors each backward: nothing the optimizer holds
    is ever overwritten by a later backward)."""

    @staticmethod
    def forward(ctx, call: _Call, hidden, topk_ids, topk_weights, *lora_params):
        experts = call.experts
        x, ids, w = hidden.detach(), topk_ids.detach(), topk_weights.detach()
        # Without LoRA parameters the call runs the base experts (adapter disabled).
        use_lora = len(lora_params) > 0
        # `record`: autograd records this call (the function's own forward always runs
        # without grad); otherwise no backward can come, unless this is the no-grad first
        # pass of a reentrant checkpoint, whose recompute will ask for the same forward.
        needs = call.record and any(ctx.needs_input_grad[1:])
        state = _state_key(experts, use_lora, lora_params)
        kept = _take(experts, x, ids, w, state) if call.record and _in_backward() else None
        entry: Optional[_FirstPass] = None
        if kept is not None:
            # A checkpoint recompute of a forward kept in host memory: its output again,
            # no kernel run. Reentrant: this recompute's node is the one backward runs, and
            # takes the cache over. Non-reentrant: the first pass's node keeps the cache for
            # its own backward (this node shares it, should anything run its backward).
            Timer.global_().add("reused", 0.0, call.name)
            out = kept.out.clone()
            kept.disown()
            kept.release_inputs()
            entry = kept
        else:
            owner = None if call.record else _reentrant_checkpoint_owner()
            out, handle = _timed("forward", call.name, experts.forward, x, ids, w, save_for_backward=needs or owner is not None, use_lora=use_lora)
            if handle is not None:
                _LIVE_HANDLES.add(handle)
                entry = _FirstPass(experts, x, ids, w, state, out, handle)
                if owner is not None:
                    _keep_for_recompute(owner, entry)
                    entry = None
        if call.guard is not None:
            _guard_rows(out, call.guard, "expert output", ids)
        # The cache rides on an empty saved tensor, so it lives exactly as long as autograd
        # keeps saved tensors (freed after backward). If a saved-tensor hook drops the token
        # (non-reentrant checkpointing), experts_function moves the entry onto the node.
        token = torch.empty(0)
        token._ktrs_entry = entry
        ctx.save_for_backward(token)
        ctx._ktrs_token = weakref.ref(token)
        ctx._ktrs_entry = entry
        ctx.call = call
        # Gradients take the shapes of the parameters that went in; a LoRA replaced since
        # (enable_lora) makes the handle stale, which backward reports.
        ctx.lora_shapes = [p.shape for p in lora_params]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        call: _Call = ctx.call
        kept: Optional[_FirstPass] = ctx._ktrs_entry
        if kept is not None and kept.handle is not None:
            # A forward kept on the node (checkpointing dropped its token). Its cache is not
            # needed after this backward (a second one, retain_graph, unpacks a recomputed
            # token); its output stays until its recompute asks for it, as backward may
            # reach this node before the op whose unpacking recomputes.
            entry, handle = kept, kept.handle
            kept.handle = None
        else:
            # The usual case: autograd frees the token, and with it the cache, after
            # backward (or keeps it for retain_graph).
            (token,) = ctx.saved_tensors
            entry = getattr(token, "_ktrs_entry", None)
            handle = entry.handle if entry is not None else None
        if handle is None:
            raise StaleHandleError("ktrs: backward without a saved forward (was the forward run under torch.no_grad()?)")
        t0 = time.perf_counter()
        grad_out = grad_out.detach().to("cpu", torch.bfloat16).contiguous()
        Timer.global_().add("copy", time.perf_counter() - t0, call.name)
        n_lora = len(ctx.lora_shapes)
        want_lora = n_lora > 0 and any(ctx.needs_input_grad[4:])
        lora_grads = [torch.empty(s, dtype=torch.float32) for s in ctx.lora_shapes] if want_lora else None
        grad_hidden, grad_w = _timed("backward", call.name, call.experts.backward, handle, grad_out, lora_grads=lora_grads, accumulate=False)
        if call.guard is not None:
            _guard_rows(grad_hidden, call.guard, "input gradient", entry.ids)
            for name, g in zip(LORA_NAMES, lora_grads if lora_grads and not _all_finite(*lora_grads) else ()):
                bad = (~torch.isfinite(g)).flatten(1).any(1).nonzero().flatten().tolist()
                if bad:
                    raise NonFiniteError(f"ktrs: non-finite gradient of expert LoRA {name} in {call.guard}, experts {bad[:8]}")
        lora_out = tuple(lora_grads) if want_lora else (None,) * n_lora
        return (None, grad_hidden, None, grad_w, *lora_out)


def _all_finite(*ts: torch.Tensor) -> bool:
    """Whether every element of `ts` is finite, in one float32 sum per tensor: a NaN or
    an Inf makes the sum non-finite, so a finite sum clears the tensor (an overflowing
    sum of finite values only sends the caller to its exact check). At T=2048 the masks
    cost 32 ms per layer and step on the main thread, the sums 4.4 (output, input
    gradient and LoRA gradients; development machine, 2 threads)."""
    return bool(torch.isfinite(torch.stack([t.sum(dtype=torch.float32) for t in ts])).all())


def _guard_rows(t: torch.Tensor, where: str, what: str, ids: torch.Tensor) -> None:
    """Raises, naming layer, tokens and their experts, if `t` holds NaN or Inf."""
    if _all_finite(t):
        return
    bad = (~torch.isfinite(t)).any(1).nonzero().flatten()
    if len(bad):
        toks = bad[:4].tolist()
        experts = sorted(set(ids[bad[:4]].flatten().tolist()))
        raise NonFiniteError(f"ktrs: non-finite {what} in {where}: tokens {toks} (routed to experts {experts}); {len(bad)} rows affected")


def experts_function(
    experts: MoeExperts,
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *lora_params: torch.Tensor,
    guard: Optional[str] = None,
    name: Optional[str] = None,
) -> torch.Tensor:
    """Differentiable call of ``experts`` (CPU, bf16 hidden, int64 ids, f32 weights).
    The layer's LoRA applies when ``lora_params`` (its six parameters) are given, and
    they receive its gradients; without them the base experts run.
    With ``guard`` (a name for messages), NaN/Inf in the output or any gradient raise.
    ``name`` labels the call in :class:`Timer`'s per-layer figures.

    Under activation checkpointing (``torch.utils.checkpoint``, reentrant or not) the
    forward's result and cache are kept in host memory and the recompute reuses them."""
    call = _Call(experts, guard, name, torch.is_grad_enabled())
    out = _ExpertsFunction.apply(call, hidden, topk_ids, topk_weights, *lora_params)
    node = out.grad_fn
    entry = getattr(node, "_ktrs_entry", None) if node is not None else None
    if entry is not None:
        if node._ktrs_token() is not None:
            # Autograd keeps the saved token, and with it the cache: the usual case.
            node._ktrs_entry = None
            entry.release_inputs()
        else:
            # A saved-tensor hook dropped the token (non-reentrant checkpointing): the node
            # keeps the forward for its backward, indexed for the recompute.
            _remember(entry)
    return out


class ExpertsFuture:
    """The pending result of :meth:`KtrsExperts.submit`."""

    def __init__(self, module: "KtrsExperts", hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> None:
        self.device, self.dtype = hidden.device, hidden.dtype
        pin = hidden.is_cuda
        t0 = time.perf_counter()
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
        experts, use_lora, name = module.experts, module.lora_active, module.where
        Timer.global_().add("copy", time.perf_counter() - t0, name)
        # The no-grad first pass of a reentrant checkpoint: keep the forward for the
        # recompute (which runs with autograd, through experts_function).
        owner = None if torch.is_grad_enabled() else _reentrant_checkpoint_owner()
        state = _state_key(experts, use_lora, module.lora_params()) if owner is not None else None

        def work():
            if event is not None:
                event.synchronize()
            _, handle = _timed("forward", name, experts.forward, x, i, w, out=out, use_lora=use_lora, save_for_backward=owner is not None)
            return handle

        self._out, self._keep = out, (owner, experts, x, i, w, state)
        self._future = background().submit(work)

    def result(self) -> torch.Tensor:
        handle = self._future.result()
        owner, experts, x, i, w, state = self._keep
        if handle is not None:
            _LIVE_HANDLES.add(handle)
            _keep_for_recompute(owner, _FirstPass(experts, x, i, w, state, self._out, handle))
        self._keep = None
        return self._out.to(device=self.device, dtype=self.dtype, non_blocking=self.device.type == "cuda")


class _Done:
    """A result that is already there, with :class:`ExpertsFuture`'s interface."""

    def __init__(self, out: torch.Tensor) -> None:
        self._out = out

    def result(self) -> torch.Tensor:
        return self._out


class KtrsExperts(nn.Module):
    """An ``nn.Module`` with the call signature of HF's ``DeepseekV2Experts``:
    ``forward(hidden_states [T, H], top_k_index [T, k], top_k_weights [T, k]) -> [T, H]``.

    Inputs may live on any device and dtype; the experts run on the CPU in bf16 and the
    result comes back on the input's device and dtype. Long CUDA inference calls (a
    prompt's prefill; see :mod:`ktrs.gpu_experts`) run on the GPU instead, with the
    weights copied from host memory. Expert LoRA matrices are
    ``nn.Parameter``s whose storage is Rust memory; ``.to()``, ``.cuda()``, ``.half()``
    and friends leave them alone (see :meth:`_apply`), and if anything rebinds a
    parameter's ``.data`` the module copies the values back into Rust memory and
    restores the view before the next call (a replacement of another shape, or not
    floating point, is a ``KtrsValueError`` instead).
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
        #: The GPU path of long CUDA inference calls, made on first use (gpu_experts.py).
        self._streamed: Optional[gpu_experts.StreamedExperts] = None
        #: Experts kept on the GPU (``ktrs.place_experts_on_gpu``, resident.py): a
        #: submodule, so its buffers are part of the model's (never of its state_dict).
        self.resident: Optional[ResidentExperts] = None
        #: Rows routed to each expert while ``ktrs.count_routing`` is on (CPU int64).
        self.routing_counts: Optional[torch.Tensor] = None
        self.counting = False
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
        res = self.resident
        if res is not None and res.weights_version != self.experts.weights_version:
            # Expert weights were replaced (merge_expert_lora, set_expert): copy them again.
            self.set_resident(None)
            self.set_resident(ResidentExperts(self.experts, res.ids, res.device))
        for name, param in self.lora_experts.items():
            view = self.experts.lora_weight(name)
            if param.data_ptr() == view.data_ptr() and param.device.type == "cpu" and param.dtype == torch.float32:
                continue
            # Something replaced the parameter's storage: keep its values, restore the view.
            new = param.data
            if new.shape != view.shape or not new.is_floating_point():
                # Reshaping or a complex/integer cast would put scrambled or lost values
                # into the kernel's memory: refuse, and leave the Rust buffer as it was.
                raise KtrsValueError(
                    f"ktrs: the storage of expert LoRA parameter '{name}' in {self.where} was replaced by a "
                    f"{tuple(new.shape)} {new.dtype} tensor on {new.device}; ktrs keeps it in its own memory as "
                    f"{tuple(view.shape)} torch.float32 and can restore only a same-shape floating-point "
                    "replacement. Change expert LoRA in place (param.data.copy_(...)) or through enable_lora()."
                )
            with torch.no_grad():
                view.copy_(new.detach().to("cpu", torch.float32))
            param.data = view
            if not self._warned_rebind:
                warnings.warn(
                    f"ktrs: the storage of expert LoRA parameter '{name}' was replaced (by .data assignment or a "
                    "device/dtype move); its values were copied back into ktrs memory and the view restored.",
                    RuntimeWarning,
                    stacklevel=3,
                )
                self._warned_rebind = True

    def lora_params(self) -> Tuple[nn.Parameter, ...]:
        """The LoRA parameters a forward passes now (:data:`LORA_NAMES` order; none while
        the expert LoRA is inactive)."""
        return tuple(self.lora_experts[n] for n in LORA_NAMES) if self.lora_active else ()

    def set_resident(self, resident: Optional[ResidentExperts]) -> None:
        """Keeps ``resident``'s experts on its device from now on (None: none); see
        :func:`ktrs.place_experts_on_gpu`, which makes them."""
        self.resident = resident
        self._streamed_experts().resident = resident

    def count_routing(self, top_k_index: torch.Tensor) -> None:
        """Adds a call's routing to :attr:`routing_counts` while counting is on."""
        if self.counting and not (top_k_index.is_cuda and torch.cuda.is_current_stream_capturing()):
            ids = top_k_index.detach().reshape(-1).to(torch.int64)
            ids = ids[(ids >= 0) & (ids < self.num_experts)]
            self.routing_counts += torch.bincount(ids, minlength=self.num_experts).cpu()

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        check_call(hidden_states, top_k_index, top_k_weights, self.experts.hidden_size)
        self._ensure_views()
        self.count_routing(top_k_index)
        check = torch.is_grad_enabled() if self.check_finite is None else self.check_finite
        mode = stream_call._mode(hidden_states)
        if mode is not None:
            # Training on CUDA (checkpointing included): enqueued on the stream, Python does
            # not wait (stream_call.py); long calls partly on the GPU (gpu_experts.py).
            out = self._gpu_training(hidden_states, top_k_index, top_k_weights, bool(check), mode)
            if out is not None:
                return out
            return stream_call.experts_call(self, hidden_states, top_k_index, top_k_weights, guard=bool(check), mode=mode)
        out = self._gpu_prefill(hidden_states, top_k_index, top_k_weights)
        if out is not None:
            return out
        device, dtype = hidden_states.device, hidden_states.dtype
        timer = Timer.global_()
        t0 = time.perf_counter()
        x = hidden_states.to("cpu", torch.bfloat16).contiguous()
        ids = top_k_index.to("cpu", torch.int64).contiguous()
        w = top_k_weights.to("cpu", torch.float32).contiguous()
        t1 = time.perf_counter()
        out = experts_function(self.experts, x, ids, w, *self.lora_params(), guard=self.where if check else None, name=self.where)
        t2 = time.perf_counter()
        out = out.to(device=device, dtype=dtype)
        timer.add("copy", (t1 - t0) + (time.perf_counter() - t2), self.where)
        return out

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
        check_call(hidden_states, top_k_index, top_k_weights, self.experts.hidden_size)
        self._ensure_views()
        self.count_routing(top_k_index)
        mode = stream_call._mode(hidden_states)
        if mode is not None and mode[0] == stream_call.REENTRANT_FIRST:
            # Split as its recompute will be (which then finds the CPU's share kept).
            out = self._gpu_training(hidden_states, top_k_index, top_k_weights, self.check_finite is not False, mode)
            if out is not None:
                return _Done(out)
        # A reentrant checkpoint's first pass on the stream path: enqueued, kept in its stage.
        fut = stream_call.submit(self, hidden_states, top_k_index, top_k_weights, guard=self.check_finite is not False)
        if fut is not None:
            return fut
        out = self._gpu_prefill(hidden_states, top_k_index, top_k_weights)
        if out is not None:
            return _Done(out)
        return ExpertsFuture(self, hidden_states, top_k_index, top_k_weights)

    # -- long prefills partly on the GPU (gpu_experts.py) --------------------------------
    def _gpu_prefill(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> Optional[torch.Tensor]:
        """The call with some experts on the GPU (weights streamed from host memory), or
        None where this call stays on the CPU (short, training, or the split says so)."""
        if not gpu_experts.wanted(self.experts, hidden_states, top_k_index, resident=self.resident) or _reentrant_checkpoint_owner() is not None:
            return None
        t0 = time.perf_counter()
        lora = self.lora_params() or None
        out = self._streamed_experts()(hidden_states, top_k_index, top_k_weights, lora=lora, scaling=self.experts.lora_scaling)
        if out is not None:
            Timer.global_().add("gpu prefill", time.perf_counter() - t0, self.where)
        return out

    def _gpu_training(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, guard: bool, mode) -> Optional[torch.Tensor]:
        """A long training call on the stream path with some experts on the GPU (forward
        and backward), or None where it stays on the CPU. Under activation checkpointing
        the first pass (a reentrant one without grad too) and the recompute split alike."""
        if not gpu_experts.wanted(self.experts, hidden_states, top_k_index, training=True, resident=self.resident):
            return None

        def cpu_share(h: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return stream_call.experts_call(self, h, ids, w, guard=guard, mode=mode)

        sink = functools.partial(stream_call.gpu_share_done, self)
        return self._streamed_experts().train(hidden_states, top_k_index, top_k_weights, self.lora_params(), self.experts.lora_scaling, cpu_share, sink, guard,
                                              checkpointed=mode[0] != stream_call.PLAIN)

    def _streamed_experts(self) -> gpu_experts.StreamedExperts:
        if self._streamed is None or self._streamed.experts is not self.experts:
            self._streamed = gpu_experts.StreamedExperts(self.experts)
            self._streamed.resident = self.resident
        return self._streamed

    def extra_repr(self) -> str:
        e = self.experts
        return f"num_experts={e.num_experts}, hidden_size={e.hidden_size}, intermediate_size={e.intermediate_size}, lora_rank={e.lora_rank}, isa={e.isa}, threads={e.threads}"


# Last: stream_call builds on this module's kept forwards.
from . import stream_call  # noqa: E402
