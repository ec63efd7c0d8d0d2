"""The routed experts of a training step as stream work, so Python never waits for them.

The synchronous path (``module._ExpertsFunction``) copies a layer's inputs to the host,
waits for the CPU experts on the Python thread and copies the result back; meanwhile
nothing else is launched, and on the reference machine that idle Python time was ~15%
of a LoRA step (docs/training-step-profile.md). Here, for hidden states on CUDA, each
expert call is enqueued on the current stream like a kernel: copies into pinned memory
owned by Rust (`_native.TrainStage`), a host function that runs the experts (forward
keeping its cache there; backward writing the expert-LoRA gradients into the layer's
own gradient buffers), and the copies back. The output tensor is returned at once, so
Python goes on launching the next layers while the CPU computes.

What autograd would otherwise read too early:

* the expert-LoRA gradients: backward returns None for them and binds each parameter's
  ``.grad`` to the Rust buffer the host function writes (overwrite when ``.grad`` was
  None, add otherwise: gradient accumulation sums as autograd would);
* everything else a backward's host functions write or report: the first expert
  backward of a ``backward()`` queues a callback that runs when the whole backward is
  done; it waits for the runs of that backward and raises the earliest error any of them
  recorded (the non-finite guard's ``NonFiniteError`` names layer, tokens and experts as
  the synchronous guard does). ``clip_grad_norm_``, the optimizer and the Trainer come
  after ``backward()`` returns, so they see finished gradients.

Staging memory: one :class:`_Stage` per call in flight (a forward and its backward),
taken from a per-layer free list when the shape matches, returned when the backward is
done (or its autograd graph dies), so steady training reuses the same pinned blocks.
Another stream using a stage waits for the stage's last event; a stage is freed only
after its last event.

Not taken (the synchronous path runs instead): CPU hidden states, ``KTRS_ASYNC_EXPERTS=0``,
no grad, CUDA graph capture, and activation checkpointing (a recompute inside backward,
or saved-tensor hooks during the forward), whose reuse of the first forward lives in
``module.py``. ``torch.autograd.grad`` with respect to the expert LoRA parameters is not
supported here (their gradients go to ``.grad``): use ``KTRS_ASYNC_EXPERTS=0``.
"""

from __future__ import annotations

import functools
import os
import threading
import time
import weakref
from typing import Dict, List, Optional, Tuple

import torch

from . import _native
from .experts import LORA_NAMES

__all__ = ["enabled", "eligible", "experts_call", "synchronize", "live_caches"]

#: Test hook: CPU inputs take this path too, their host functions run at launch (plain
#: memory, no CUDA), so the bookkeeping is tested on machines without a GPU.
INLINE_CPU = False

#: Free stages kept per layer and shape; a few cover gradient accumulation and
#: several forwards before one backward, without growing across steps.
MAX_FREE = 2

_GRAPH_TASK_ID = getattr(torch._C, "_current_graph_task_id", None)
_TOP_HOOKS = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
_DRIVER: Optional[bool] = None
_LOCK = threading.RLock()
#: Free stages per KtrsExperts module, by (tokens, top_k, pinned).
_POOLS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
#: Every stage alive (for `synchronize` and `live_caches`).
_ALL: "weakref.WeakSet" = weakref.WeakSet()
#: Bindings whose backward ran, per autograd graph task, until its end-of-backward callback.
_TASKS: Dict[int, List["_Binding"]] = {}


def enabled() -> bool:
    """False when ``KTRS_ASYNC_EXPERTS=0`` (read at each call)."""
    return os.environ.get("KTRS_ASYNC_EXPERTS", "1") != "0"


def _driver() -> bool:
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = bool(_native.HostStage.driver_available())
    return _DRIVER


def eligible(hidden: torch.Tensor) -> bool:
    """Whether an expert call on `hidden` takes the stream path now."""
    if not torch.is_grad_enabled() or not enabled() or _GRAPH_TASK_ID is None or _TOP_HOOKS is None:
        return False
    if hidden.dim() != 2 or hidden.shape[0] == 0:
        return False
    if hidden.is_cuda:
        if not _driver() or torch.cuda.is_current_stream_capturing():
            return False
    elif not (INLINE_CPU and hidden.device.type == "cpu"):
        return False
    # Checkpointing: its recompute runs inside a backward; a non-reentrant first pass
    # runs under saved-tensor hooks. Both keep the synchronous path, which reuses the
    # first forward for the recompute.
    return _GRAPH_TASK_ID() == -1 and _TOP_HOOKS(False) is None


class _Stage:
    """One call's staging (Rust) and the CUDA event after its last enqueued use."""

    def __init__(self, module, tokens: int, top_k: int, pinned: bool) -> None:
        self.native = _native.TrainStage(module.experts._native, tokens, top_k, module.where, pinned=pinned)
        self.x, self.ids, self.w, self.out, self.gout, self.gx, self.gw = (torch.from_dlpack(c) for c in self.native.tensors())
        self.key = (tokens, top_k, pinned)
        self.name = module.where
        self.event: Optional[torch.cuda.Event] = None
        self.stream: Optional[torch.cuda.Stream] = None
        _ALL.add(self)

    def order_after(self, stream: Optional[torch.cuda.Stream]) -> None:
        """Makes `stream` wait for this stage's earlier uses (on one stream they are in order)."""
        if stream is not None and self.event is not None and stream != self.stream:
            stream.wait_event(self.event)

    def mark(self, stream: Optional[torch.cuda.Stream]) -> None:
        if stream is not None:
            if self.event is None:
                self.event = torch.cuda.Event()
            self.event.record(stream)
            self.stream = stream

    def __del__(self) -> None:
        # The stream may still copy into the pinned block: it must outlive those copies.
        ev = self.event
        if ev is not None:
            try:
                ev.synchronize()
            except Exception:
                pass


def _acquire(module, tokens: int, top_k: int, pinned: bool) -> _Stage:
    with _LOCK:
        free = _POOLS.get(module, {}).get((tokens, top_k, pinned))
        st = free.pop() if free else None
    if st is None:
        if pinned:
            torch.cuda.synchronize()  # pinning needs this thread's CUDA context current (once per stage)
        return _Stage(module, tokens, top_k, pinned)
    # An error of an earlier forward whose backward never came.
    st.native.raise_error()
    return st


def _release(module, st: _Stage) -> None:
    st.native.drop_cache()
    _harvest(st)
    with _LOCK:
        free = _POOLS.setdefault(module, {}).setdefault(st.key, [])
        if len(free) < MAX_FREE:
            free.append(st)


def _harvest(st: _Stage) -> None:
    """Moves the stage's kernel times into the Timer."""
    from .module import Timer

    fr, fs, br, bs = st.native.take_times()
    timer = Timer.global_()
    # Runs were counted at launch (so counts are right before any sync).
    if fr:
        timer.add("forward", fs, st.name, count=False)
    if br:
        timer.add("backward", bs, st.name, count=False)


class _Binding:
    """A stage bound to one forward's autograd node; returned to its layer's free list
    after the backward, or when the node dies without one."""

    __slots__ = ("module", "stage", "token", "__weakref__")

    def __init__(self, module, stage: _Stage) -> None:
        self.module, self.stage = module, stage
        self.token = None

    def release(self) -> None:
        st, self.stage = self.stage, None
        if st is not None:
            _release(self.module, st)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass  # interpreter shutdown


class _Call:
    __slots__ = ("module", "guard", "lora")

    def __init__(self, module, guard: bool, lora: Tuple[torch.Tensor, ...]) -> None:
        self.module, self.guard, self.lora = module, guard, lora


def _stream(t: torch.Tensor) -> Optional[torch.cuda.Stream]:
    return torch.cuda.current_stream(t.device) if t.is_cuda else None


def _handle(stream: Optional[torch.cuda.Stream]) -> Optional[int]:
    return stream.cuda_stream if stream is not None else None


class _StreamExpertsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, call: _Call, hidden, topk_ids, topk_weights, *lora_params):
        from .module import Timer

        t0 = time.perf_counter()
        module = call.module
        tokens, top_k = topk_ids.shape
        stream = _stream(hidden)
        nb = stream is not None
        st = _acquire(module, tokens, top_k, nb)
        st.order_after(stream)
        st.x.copy_(hidden.detach().to(torch.bfloat16), non_blocking=nb)
        st.ids.copy_(topk_ids.detach().to(torch.int64), non_blocking=nb)
        st.w.copy_(topk_weights.detach().to(torch.float32), non_blocking=nb)
        needs = any(ctx.needs_input_grad[1:])
        binding = _Binding(module, st)
        st.native.forward(_handle(stream), save=needs, use_lora=len(lora_params) > 0, guard=call.guard)
        Timer.global_().add("forward", 0.0, module.where)  # counted now, timed at the sync
        out = torch.empty(hidden.shape, dtype=torch.bfloat16, device=hidden.device)
        out.copy_(st.out, non_blocking=nb)
        st.mark(stream)
        # An empty saved tensor tells the end-of-backward callback whether autograd keeps
        # the graph (retain_graph): freed with the saved tensors, the cache can go.
        token = torch.empty(0)
        ctx.save_for_backward(token)
        binding.token = weakref.ref(token)
        ctx.ktrs_binding, ctx.call = binding, call
        ctx.dtypes = (hidden.dtype, topk_weights.dtype)
        Timer.global_().add("copy", time.perf_counter() - t0, module.where)
        return out.to(hidden.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        from .module import Timer

        t0 = time.perf_counter()
        binding: _Binding = ctx.ktrs_binding
        call: _Call = ctx.call
        st = binding.stage
        if st is None:
            raise _native.StaleHandleError("ktrs: backward after the expert forward was released (a second backward without retain_graph?)")
        stream = _stream(grad_out)
        nb = stream is not None
        st.order_after(stream)
        n_lora = len(call.lora)
        want_lora = n_lora > 0 and any(ctx.needs_input_grad[4:])
        overwrite = _bind_grads(call.module, call.lora) if want_lora else False
        st.gout.copy_(grad_out.detach().to(torch.bfloat16), non_blocking=nb)
        st.native.backward(_handle(stream), lora=want_lora, overwrite=overwrite, guard=call.guard)
        Timer.global_().add("backward", 0.0, call.module.where)
        hidden_dtype, w_dtype = ctx.dtypes
        gh = gw = None
        if ctx.needs_input_grad[1]:
            gh = torch.empty(st.gx.shape, dtype=torch.bfloat16, device=grad_out.device)
            gh.copy_(st.gx, non_blocking=nb)
            gh = gh.to(hidden_dtype)
        if ctx.needs_input_grad[3]:
            gw = torch.empty(st.gw.shape, dtype=torch.float32, device=grad_out.device)
            gw.copy_(st.gw, non_blocking=nb)
            gw = gw.to(w_dtype)
        st.mark(stream)
        _register(binding)
        Timer.global_().add("copy", time.perf_counter() - t0, call.module.where)
        return (None, gh, None, gw, *((None,) * n_lora))


def _bind_grads(module, params: Tuple[torch.Tensor, ...]) -> bool:
    """Makes each LoRA parameter's ``.grad`` the layer's Rust gradient buffer; True when
    the backward should overwrite it (no gradient yet), False to add to it."""
    experts = module.experts
    views = [experts.lora_grad(n) for n in LORA_NAMES]
    grads = [p.grad for p in params]
    if all(g is None for g in grads):
        for p, v in zip(params, views):
            p.grad = v
        return True
    if all(g is not None and g.data_ptr() == v.data_ptr() and g.shape == v.shape for g, v in zip(grads, views)):
        return False
    # Some gradients were set or cleared one by one: fold them into the buffers once no
    # run writes these (rare; it waits).
    synchronize()
    with torch.no_grad():
        for p, g, v in zip(params, grads, views):
            if g is None:
                v.zero_()
            elif g.data_ptr() != v.data_ptr():
                v.copy_(g.to(v.device, v.dtype).reshape(v.shape))
            p.grad = v
    return False


def _register(binding: _Binding) -> None:
    gid = _GRAPH_TASK_ID()
    with _LOCK:
        pending = _TASKS.get(gid)
        if pending is None:
            pending = _TASKS[gid] = []
            torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_end_of_backward, gid))
        pending.append(binding)


def _raise_earliest(stages: List[_Stage]) -> None:
    """Raises the error of the earliest run among `stages` (its consequences in later
    layers are cleared)."""
    bad = [(st.native.error_seq, st) for st in stages if st.native.error_seq is not None]
    if not bad:
        return
    bad.sort(key=lambda p: p[0])
    for _, st in bad[1:]:
        try:
            st.native.raise_error()
        except Exception:
            pass
    bad[0][1].native.raise_error()


def _end_of_backward(gid: int) -> None:
    with _LOCK:
        bindings = _TASKS.pop(gid, [])
    stages = [b.stage for b in bindings if b.stage is not None]
    _wait_and_harvest(stages)
    for b in bindings:
        if b.token is None or b.token() is None:
            b.release()  # no retain_graph: nothing will use the cache again
    _raise_earliest(stages)


def _wait_and_harvest(stages: List["_Stage"]) -> None:
    """Waits for `stages`' runs (the time counts as "wait") and moves their kernel times
    into the Timer."""
    from .module import Timer

    t0 = time.perf_counter()
    for st in stages:
        st.native.wait()
    Timer.global_().add("wait", time.perf_counter() - t0)
    for st in stages:
        _harvest(st)


def synchronize() -> None:
    """Waits for every expert call in flight, moves their times into the Timer and raises
    the earliest error any recorded (e.g. of a forward whose backward never came)."""
    stages = list(_ALL)
    _wait_and_harvest(stages)
    _raise_earliest(stages)


def live_caches() -> int:
    """Forward caches held by stages now."""
    return sum(1 for st in list(_ALL) if st.native.has_cache)


def experts_call(module, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, guard: bool) -> torch.Tensor:
    """The differentiable expert call of ``KtrsExperts.forward`` as stream work (see the
    module doc); returns ``[T, H]`` on `hidden`'s device and dtype."""
    lora = module.lora_params()
    return _StreamExpertsFunction.apply(_Call(module, guard, lora), hidden, topk_ids, topk_weights, *lora)
