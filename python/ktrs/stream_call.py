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
  after ``backward()`` returns, so they see finished gradients. A backward that raises
  gets no such callback: the next forward outside a backward waits for its runs and
  frees what it left (``_drop_stale_tasks``).

Staging memory: one :class:`_Stage` per call in flight (a forward and its backward),
taken from a per-layer free list when the shape matches, returned when the backward is
done (or its autograd graph dies), so steady training reuses the same pinned blocks.
Another stream using a stage waits for the stage's last event; a stage is freed only
after its last event.

Activation checkpointing (``torch.utils.checkpoint``, reentrant or not: HF's, PEFT's,
the Trainer's) takes this path too, with the synchronous path's reuse: the first forward
runs with its cache kept in its stage (``keep``: the backward gets its own staging
regions, so the forward's inputs and output stay), indexed for its recompute by
``module._take``/``_remember`` as a :class:`_KeptStage` (the one matching of recomputes
to first passes: layer, state, shapes; ``KTRS_RECOMPUTE_CACHE_MB``). The recompute during
backward copies its inputs into a stage of its own and enqueues
``TrainStage.recompute``, whose host function compares them byte for byte with the kept
forward's (the synchronous path's ``torch.equal``, without a sync here) and hands back the
kept output, and for reentrant checkpointing the cache, or runs the forward when they
differ. Non-reentrant: the first forward's node runs the backward on the kept stage;
reentrant: the recompute's node does, and the recompute's stages are waited for at the
end of the outer backward, not of checkpointing's nested one.

Not taken (the synchronous path runs instead): CPU hidden states, ``KTRS_ASYNC_EXPERTS=0``,
no grad (other than a reentrant checkpoint's first pass), CUDA graph capture, and
saved-tensor hooks other than checkpointing's. ``torch.autograd.grad`` with respect to
the expert LoRA parameters is not supported here (their gradients go to ``.grad``): use
``KTRS_ASYNC_EXPERTS=0``.
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
from . import module as _module
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
#: Bindings whose backward ran (or recompute, in a backward), with their stages, per
#: autograd graph task, until its end-of-backward callback. The stage is kept apart: a
#: recompute's binding may be released (its token freed) before its run has finished.
_TASKS: Dict[int, List[Tuple["_Binding", "_Stage"]]] = {}


def enabled() -> bool:
    """False when ``KTRS_ASYNC_EXPERTS=0`` (read at each call)."""
    return os.environ.get("KTRS_ASYNC_EXPERTS", "1") != "0"


def _driver() -> bool:
    global _DRIVER
    if _DRIVER is None:
        _DRIVER = bool(_native.HostStage.driver_available())
    return _DRIVER


#: What kind of call `_mode` found.
PLAIN, FIRST, REENTRANT_FIRST, RECOMPUTE = "plain", "first", "reentrant_first", "recompute"


def _hook_kind(hooks) -> Optional[str]:
    """"first"/"recompute" for the saved-tensor hooks of non-reentrant checkpointing's
    first pass / recompute, None for any other hooks."""
    qual = getattr(hooks[0], "__qualname__", "")
    if qual.startswith("_checkpoint_hook."):
        return FIRST
    if qual.startswith("_recomputation_hook."):
        return RECOMPUTE
    return None


def _mode(hidden: torch.Tensor):
    """``(kind, owner)`` of an expert call on `hidden` on the stream path now (`owner`: a
    reentrant checkpoint's node), or None for the synchronous path."""
    if not enabled() or _GRAPH_TASK_ID is None or _TOP_HOOKS is None:
        return None
    if hidden.dim() != 2 or hidden.shape[0] == 0:
        return None
    if hidden.is_cuda:
        if not _driver() or torch.cuda.is_current_stream_capturing():
            return None
    elif not (INLINE_CPU and hidden.device.type == "cpu"):
        return None
    if not torch.is_grad_enabled():
        # Reentrant checkpointing's first pass (no grad): kept for its recompute.
        owner = _module._reentrant_checkpoint_owner()
        return None if owner is None else (REENTRANT_FIRST, owner)
    hooks = _TOP_HOOKS(False)
    kind = PLAIN if hooks is None else _hook_kind(hooks)
    if kind is None:
        return None  # other saved-tensor hooks (e.g. offloading): synchronous path
    if _GRAPH_TASK_ID() != -1:
        # Inside a backward: a checkpoint recompute (reentrant: no hooks; non-reentrant:
        # checkpointing's recompute hooks), served from its first pass when one matches.
        return (RECOMPUTE, None)
    return None if kind == RECOMPUTE else (kind, None)


def eligible(hidden: torch.Tensor) -> bool:
    """Whether an expert call on `hidden` takes the stream path now."""
    return _mode(hidden) is not None


class _Stage:
    """One call's staging (Rust) and the CUDA event after its last enqueued use."""

    def __init__(self, module, tokens: int, top_k: int, pinned: bool, keep: bool = False) -> None:
        self.native = _native.TrainStage(module.experts._native, tokens, top_k, module.where, pinned=pinned, keep=keep)
        self.x, self.ids, self.w, self.out, self.gout, self.gx, self.gw = (torch.from_dlpack(c) for c in self.native.tensors())
        self.key = (tokens, top_k, pinned, keep)
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


def _acquire(module, tokens: int, top_k: int, pinned: bool, keep: bool = False) -> _Stage:
    with _LOCK:
        free = _POOLS.get(module, {}).get((tokens, top_k, pinned, keep))
        st = free.pop() if free else None
    if st is None:
        if pinned:
            torch.cuda.synchronize()  # pinning needs this thread's CUDA context current (once per stage)
        return _Stage(module, tokens, top_k, pinned, keep)
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

    fr, fs, br, bs, rec, reused = st.native.take_times()
    timer = Timer.global_()
    # Runs were counted at launch (so counts are right before any sync); a recompute's
    # outcome (run, or served from the kept forward) is known once it ran.
    if fr or rec:
        timer.add("forward", fs, st.name, count=False)
    for _ in range(rec):
        timer.add("forward", 0.0, st.name)
    for _ in range(reused):
        timer.add("reused", 0.0, st.name)
    if br:
        timer.add("backward", bs, st.name, count=False)


class _Binding:
    """A stage bound to one forward's autograd node; returned to its layer's free list
    after the backward, or when the node dies without one."""

    __slots__ = ("module", "stage", "token", "task", "keep", "__weakref__")

    def __init__(self, module, stage: _Stage) -> None:
        self.module, self.stage = module, stage
        self.token = None
        #: The graph task whose end waits for this stage (None: not registered).
        self.task: Optional[int] = None
        #: The kept forward's binding a recompute reads: released after this one.
        self.keep: Optional["_Binding"] = None

    def release(self) -> None:
        self.keep = None
        st, self.stage = self.stage, None
        if st is not None:
            _release(self.module, st)

    def __del__(self) -> None:
        try:
            self.release()
        except Exception:
            pass  # interpreter shutdown


class _KeptStage(_module._FirstPass):
    """A first pass kept in its stage for the recompute of activation checkpointing,
    indexed with the synchronous path's kept forwards (``module._remember``/``_take``,
    one matching). Its inputs are in the stage: the recompute's host function compares
    them (``same_inputs`` defers to it), so matching needs no sync."""

    __slots__ = ("binding", "dims", "reentrant")

    def __init__(self, experts, dims: tuple, state: tuple, binding: _Binding, reentrant: bool) -> None:
        self.experts, self.dims, self.state, self.binding = experts, dims, state, binding
        #: Reentrant checkpointing: the recompute's node runs the backward (takes the cache).
        self.reentrant = reentrant
        self.x = self.ids = self.w = self.out = self.handle = None
        self.versions = ()
        self.owner = None
        # The staging block and the cache (estimated from the shapes, as the forward may
        # not have run yet: gathered inputs, gate/up/SiLU·up, LoRA projections, routing).
        (tokens, _), (_, k), _ = dims
        pairs = tokens * k
        rank = experts.lora_rank if state[2] else 0
        cache = pairs * (2 * experts.hidden_size + 6 * experts.intermediate_size + 12 * rank + 12)
        self.nbytes = binding.stage.native.nbytes + cache
        self.order = next(_module._ORDER)

    def usable(self) -> bool:
        b = self.binding
        return b is not None and b.stage is not None

    @property
    def shape(self) -> tuple:
        return self.dims

    def same_inputs(self, x, ids, w) -> bool:
        return True  # compared byte for byte by TrainStage.recompute

    def release_inputs(self) -> None:
        """Taken by its recompute: no other recompute may match it."""
        self.binding = None

    def drop(self) -> None:
        """Frees the stage (over the cache limit, or cleared): the recompute runs the
        experts, and a non-reentrant backward uses the recompute's stage."""
        b, self.binding = self.binding, None
        if b is not None:
            b.release()
        self.disown()


class _Call:
    __slots__ = ("module", "guard", "lora", "kind", "owner", "entry")

    def __init__(self, module, guard: bool, lora: Tuple[torch.Tensor, ...], kind: str = PLAIN, owner=None) -> None:
        self.module, self.guard, self.lora = module, guard, lora
        self.kind, self.owner = kind, owner
        #: The first pass this call made (kept for its recompute), for `experts_call`.
        self.entry: Optional[_KeptStage] = None


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
        experts = module.experts
        tokens, top_k = topk_ids.shape
        stream = _stream(hidden)
        nb = stream is not None
        use_lora = len(lora_params) > 0
        first = call.kind in (FIRST, REENTRANT_FIRST)
        if _TASKS and call.kind != RECOMPUTE:
            _drop_stale_tasks()
        state = _module._state_key(experts, use_lora, lora_params) if call.kind != PLAIN else None
        kept: Optional[_KeptStage] = None
        if call.kind == RECOMPUTE:
            kept = _module._take(experts, hidden, topk_ids, topk_weights, state, kind=_KeptStage)
        st = _acquire(module, tokens, top_k, nb, keep=first)
        st.order_after(stream)
        st.x.copy_(hidden.detach().to(torch.bfloat16), non_blocking=nb)
        st.ids.copy_(topk_ids.detach().to(torch.int64), non_blocking=nb)
        st.w.copy_(topk_weights.detach().to(torch.float32), non_blocking=nb)
        needs = any(ctx.needs_input_grad[1:]) or first
        binding = _Binding(module, st)
        if kept is not None:
            # A checkpoint recompute: served from the kept forward in its host function
            # when the inputs are the same (counted as reused or run there).
            kb = kept.binding
            kept.disown()
            kept.release_inputs()
            ks = kb.stage
            ks.order_after(stream)
            st.native.recompute(_handle(stream), ks.native, reuse=True, take_cache=kept.reentrant, save=needs, use_lora=use_lora, guard=call.guard)
            ks.mark(stream)
            binding.keep = kb
            if kept.reentrant:
                # No backward of its own: this backward's end waits for it (and raises what
                # its forward recorded), then frees it.
                _register(kb)
        else:
            st.native.forward(_handle(stream), save=needs, use_lora=use_lora, guard=call.guard)
            Timer.global_().add("forward", 0.0, module.where)  # counted now, timed at the sync
        if call.kind == RECOMPUTE:
            # Its runs are waited for at the end of this (outer) backward, also when its
            # own backward runs in reentrant checkpointing's nested one.
            _register(binding)
        out = torch.empty(hidden.shape, dtype=torch.bfloat16, device=hidden.device)
        out.copy_(st.out, non_blocking=nb)
        st.mark(stream)
        if first:
            dims = (tuple(hidden.shape), tuple(topk_ids.shape), tuple(topk_weights.shape))
            call.entry = _KeptStage(experts, dims, state, binding, call.kind == REENTRANT_FIRST)
        # An empty saved tensor tells the end-of-backward callback whether autograd keeps
        # the graph (retain_graph): freed with the saved tensors, the cache can go. It
        # carries the binding: non-reentrant checkpointing hands a recompute's token to
        # the first forward's backward.
        token = torch.empty(0)
        token._ktrs_binding = binding
        ctx.save_for_backward(token)
        binding.token = weakref.ref(token)
        ctx.ktrs_binding, ctx.call = binding, call
        ctx.ktrs_entry = call.entry
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
        if st is None and ctx.ktrs_entry is not None:
            # A checkpointed first forward released (a second backward, or over the cache
            # limit): non-reentrant checkpointing recomputes it when its token is unpacked,
            # and the recompute's stage holds the cache.
            (token,) = ctx.saved_tensors
            binding = getattr(token, "_ktrs_binding", None) or binding
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
    """Makes the end of the current backward wait for `binding`'s runs (once: a reentrant
    checkpoint's recompute registers with the outer backward, before its nested one)."""
    if binding.task is not None:
        return
    gid = binding.task = _GRAPH_TASK_ID()
    with _LOCK:
        _task(gid).append((binding, binding.stage))


def _task(gid: int) -> list:
    """What the end of backward `gid` waits for and finishes (queues that callback on first
    use); under `_LOCK`."""
    pending = _TASKS.get(gid)
    if pending is None:
        pending = _TASKS[gid] = []
        torch.autograd.Variable._execution_engine.queue_callback(functools.partial(_end_of_backward, gid))
    return pending


class _GpuGrads:
    """The expert-LoRA gradients of a training call's GPU share (``gpu_experts``), added
    into the layer's gradient buffers once the backward's host functions (which write or
    overwrite those buffers) are done."""

    __slots__ = ("module", "experts", "grads", "bad")

    def __init__(self, module, experts: List[int], grads: Optional[Dict[str, torch.Tensor]], bad: Optional[torch.Tensor]) -> None:
        self.module, self.experts, self.grads, self.bad = module, experts, grads, bad

    def apply(self) -> None:
        if self.grads:
            idx = torch.tensor(self.experts, dtype=torch.long)
            with torch.no_grad():
                for n, g in self.grads.items():
                    self.module.experts.lora_grad(n).index_add_(0, idx, g.to("cpu", torch.float32))

    def failed(self) -> bool:
        return self.bad is not None and bool(self.bad)

    def check(self) -> None:
        if self.failed():
            raise _native.NonFiniteError(f"ktrs: non-finite output or gradient of the experts computed on the GPU in {self.module.where}")


def gpu_share_done(module, experts: List[int], grads: Optional[Dict[str, torch.Tensor]], bad: Optional[torch.Tensor]) -> None:
    """Called by a GPU share's backward (in a backward): its LoRA gradients go into the
    layer's buffers, and its non-finite flag is checked, at the end of this backward."""
    with _LOCK:
        _task(_GRAPH_TASK_ID()).append(_GpuGrads(module, experts, grads, bad))


def _drop_stale_tasks() -> None:
    """Ends the bookkeeping of backwards that raised: autograd runs no final callback
    then, and their registered bindings (stages, caches) would stay forever. Called at a
    forward outside any backward, where every backward of this (training) thread is over;
    it waits for their runs and frees what nothing uses. Errors those runs recorded stay
    in their stages (raised at the stage's next use or `synchronize`). Assumes backwards
    with stream-path experts are not running concurrently in another thread."""
    with _LOCK:
        if not _TASKS:
            return
        # GPU shares' gradients of a backward that raised are dropped with it.
        stale = [p for pairs in _TASKS.values() for p in pairs if isinstance(p, tuple)]
        _TASKS.clear()
    for b, _ in stale:
        b.task = None
    stages = list({id(st): st for _, st in stale if st is not None}.values())
    _wait_and_harvest(stages)
    for b, _ in stale:
        if b.token is None or b.token() is None:
            b.release()


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
        entries = _TASKS.pop(gid, [])
    pairs = [p for p in entries if isinstance(p, tuple)]
    shares = [p for p in entries if isinstance(p, _GpuGrads)]
    bindings = [b for b, _ in pairs]
    for b in bindings:
        b.task = None
    stages = list({id(st): st for _, st in pairs if st is not None}.values())
    _wait_and_harvest(stages)
    # The GPU shares' LoRA gradients join the buffers only when this backward went through:
    # after an error (a CPU share's, or a GPU share's non-finite flag) they would leave
    # garbage there for the next step to add to.
    if not any(st.native.error_seq is not None for st in stages) and not any(g.failed() for g in shares):
        for g in shares:
            g.apply()
    for b in bindings:
        if b.token is None or b.token() is None:
            b.release()  # no retain_graph: nothing will use the cache again
    _raise_earliest(stages)
    for g in shares:
        g.check()


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


def experts_call(module, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, guard: bool, mode=None) -> torch.Tensor:
    """The differentiable expert call of ``KtrsExperts.forward`` as stream work (see the
    module doc); returns ``[T, H]`` on `hidden`'s device and dtype."""
    return _apply(module, mode or _mode(hidden) or (PLAIN, None), hidden, topk_ids, topk_weights, guard)


def _apply(module, mode, hidden, topk_ids, topk_weights, guard: bool) -> torch.Tensor:
    kind, owner = mode
    if kind == REENTRANT_FIRST:
        # Its recompute (with grad, guarded) may be served this output: guard it here.
        guard = module.check_finite is not False
    lora = module.lora_params()
    call = _Call(module, guard, lora, kind, owner)
    out = _StreamExpertsFunction.apply(call, hidden, topk_ids, topk_weights, *lora)
    entry, call.entry = call.entry, None
    if entry is not None:
        if kind == REENTRANT_FIRST:
            # No autograd node: the reentrant checkpoint's node keeps it until its recompute.
            _module._keep_for_recompute(owner, entry)
        else:
            # Checkpointing's hook dropped the saved token: the node keeps the forward (its
            # ctx holds the entry) for its own backward, indexed for the recompute.
            _module._remember(entry)
    return out


class StreamFuture:
    """:meth:`KtrsExperts.submit`'s result on the stream path (a reentrant checkpoint's
    no-grad first pass): the output is already enqueued."""

    def __init__(self, out: torch.Tensor) -> None:
        self._out = out

    def result(self) -> torch.Tensor:
        return self._out


def submit(module, hidden, topk_ids, topk_weights, guard: bool) -> Optional[StreamFuture]:
    """:meth:`KtrsExperts.submit` as stream work when it is a reentrant checkpoint's first
    pass on this path (kept for the recompute); None otherwise."""
    mode = _mode(hidden)
    if mode is None or mode[0] != REENTRANT_FIRST:
        return None
    return StreamFuture(_apply(module, mode, hidden, topk_ids, topk_weights, guard))
