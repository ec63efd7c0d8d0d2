"""Fast decode: each decode step of ``model.generate`` replays one CUDA graph.

Batch-1 decode of a patched model used to spend more time launching GPU kernels from
Python and handing work between the GPU stream, a submit thread and the worker pool than
in the CPU experts themselves. Here the whole decode step (embedding, 27 attention
blocks, routers, shared experts, norms, ``lm_head``) is captured once per batch size and
cache as a CUDA graph, and the routed experts of every MoE layer enter that graph as a
*host node* (``cuLaunchHostFunc``): the stream copies the layer's hidden states, top-k ids
and weights into pinned memory owned by Rust, runs the experts on the CPU worker pool in
stream order, and copies the result back. A step is then one graph launch from Python.

What the graph bakes in is checked, not assumed:

* tensors are read where they live, so in-place changes of any weight, including every
  LoRA weight (an optimizer step, ``set_lora_weight``) reach the next step;
* what changes the *shape* of the computation (a parameter rebound to new storage, PEFT's
  active or disabled adapters, merges, scalings, ``train()``/``eval()``) is part of a
  fingerprint taken at each ``generate`` call; a changed fingerprint re-captures;
* the expert host node reads the layer's LoRA from Rust at every run.

Only ``generate`` uses graphs (with a static KV cache, which ``enable`` makes the default
on CUDA); any call that does not fit (training, gradients, inputs of other shapes, a
dynamic cache) runs the ordinary eager forward. ``KTRS_DECODE_GRAPHS=0`` or
``disable(model)`` switches graphs off.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import threading
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from . import _native

__all__ = ["enable", "disable", "stats", "reset_stats", "experts_on_stream", "submit_on_stream", "host_node_mode"]

#: Graphs kept per model (each holds its static inputs and a share of one memory pool).
MAX_GRAPHS = 8

_MODE = threading.local()


def host_node_mode() -> bool:
    """True while a decode step is being warmed up or captured: MoE blocks then route
    their experts through :func:`experts_on_stream`."""
    return getattr(_MODE, "on", False)


@contextlib.contextmanager
def _host_nodes(channel: Optional[Any] = None) -> Iterator[None]:
    """Routes MoE blocks through :func:`experts_on_stream`, handing off through `channel`
    (a ``_native.StreamChannel``) or, without one, through host nodes."""
    prev = host_node_mode(), getattr(_MODE, "channel", None)
    _MODE.on, _MODE.channel = True, channel
    try:
        yield
    finally:
        _MODE.on, _MODE.channel = prev


def new_channel() -> Optional[Any]:
    """A stream channel (the fast hand-off), or None where the driver lacks stream memory
    operations or ``KTRS_DECODE_CHANNEL=0``: then host nodes are used."""
    if os.environ.get("KTRS_DECODE_CHANNEL", "1") == "0" or not _native.StreamChannel.available():
        return None
    torch.cuda.synchronize()  # the driver calls below need this thread's CUDA context
    try:
        return _native.StreamChannel()
    except _native.KtrsError as exc:
        warnings.warn(f"ktrs: no stream channel ({exc}); decode hands off through host nodes", RuntimeWarning, stacklevel=2)
        return None


class _Stage:
    """Pinned staging for one layer and one (tokens, top_k), owned by Rust."""

    def __init__(self, experts_native: Any, tokens: int, top_k: int, channel: Optional[Any]) -> None:
        self.native = _native.HostStage(experts_native, tokens, top_k, channel)
        self.x, self.ids, self.w, self.out = (torch.from_dlpack(c) for c in self.native.tensors())


def _stages(module: nn.Module) -> Dict[Tuple[int, int, int], _Stage]:
    return module.__dict__.setdefault("_ktrs_stages", {})


def experts_on_stream(module: nn.Module, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> torch.Tensor:
    """The routed experts of a :class:`ktrs.KtrsExperts` as stream work on the current CUDA
    stream (recorded as graph nodes under capture): copies in, hand-off, copy out.
    ``hidden [T, H]`` on a CUDA device; returns ``[T, H]`` there, in ``hidden``'s dtype."""
    return submit_on_stream(module, hidden, topk_ids, topk_weights)()


def submit_on_stream(module: nn.Module, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> Callable[[], torch.Tensor]:
    """:func:`experts_on_stream` in two halves: this enqueues the copies and starts the
    experts; calling the returned function enqueues the wait and the copy back, and
    returns the output. GPU work enqueued in between (the shared experts) overlaps the
    CPU experts."""
    tokens, top_k = topk_ids.shape
    channel = getattr(_MODE, "channel", None)
    key = (tokens, top_k, id(channel))
    stage = _stages(module).get(key)
    if stage is None:
        if torch.cuda.is_current_stream_capturing():
            raise RuntimeError("ktrs: expert staging must be made before graph capture (warm-up run missing)")
        torch.cuda.synchronize()  # pinning needs this thread's CUDA context current
        stage = _stages(module)[key] = _Stage(module.experts._native, tokens, top_k, channel)
    stage.x.copy_(hidden.to(torch.bfloat16), non_blocking=True)
    stage.ids.copy_(topk_ids.to(torch.int64), non_blocking=True)
    stage.w.copy_(topk_weights.to(torch.float32), non_blocking=True)
    stream = torch.cuda.current_stream().cuda_stream
    stage.native.submit(stream)

    def finish() -> torch.Tensor:
        stage.native.finish(stream)
        return stage.out.to(hidden.device, non_blocking=True).to(hidden.dtype)

    return finish


def _ktrs_experts(model: nn.Module) -> List[nn.Module]:
    from .module import KtrsExperts

    return [m for m in model.modules() if isinstance(m, KtrsExperts)]


def _fingerprint(model: nn.Module) -> Tuple:
    """What a captured step depends on besides tensor contents (see the module doc)."""
    ptrs = tuple(t.data_ptr() for t in model.parameters()) + tuple(t.data_ptr() for t in model.buffers())
    flags = []
    for name, m in model.named_modules():
        if hasattr(m, "merged_adapters"):  # a PEFT tuner layer
            scaling = getattr(m, "scaling", None)
            flags.append((name, bool(getattr(m, "disable_adapters", False)), tuple(m.merged_adapters),
                          repr(getattr(m, "active_adapters", None)), repr(sorted(scaling.items())) if isinstance(scaling, dict) else None))
        for attr in ("lora_enabled", "lora_disabled", "active_adapter"):  # ktrs expert-LoRA switches, if any
            if attr in m.__dict__:
                flags.append((name, attr, repr(m.__dict__[attr])))
    return (ptrs, tuple(flags), model.training)


class _Captured:
    def __init__(self, graph: "torch.cuda.CUDAGraph", inputs: Dict[str, Any], output: Any) -> None:
        self.graph, self.inputs, self.output = graph, inputs, output


class DecodeGraphs:
    """The graphs of one model, and the wrappers of its ``forward`` and ``generate``."""

    def __init__(self, model: nn.Module) -> None:
        self.forward = model.forward
        self.generate = model.generate
        self.enabled = os.environ.get("KTRS_DECODE_GRAPHS", "1") != "0"
        self.graphs: "OrderedDict[Tuple, _Captured]" = OrderedDict()
        self.fingerprint: Optional[Tuple] = None
        self.pool = None
        self.active = 0
        self.failed: Optional[str] = None
        self.model = model
        self.counts = {"captures": 0, "replays": 0, "eager_steps": 0}
        self.wait_blocking = os.environ.get("KTRS_DECODE_BLOCKING_WAIT", "1") != "0"
        #: The hand-off thread (a `_native.StreamChannel`); None until the first capture,
        #: False where unavailable (host nodes are used then).
        self.channel: Any = None
        #: Worker-pool spin (µs) while a decode runs: its layers come a few hundred µs
        #: apart, and a sleeping pool costs a wake-up per layer.
        self.spin_us = int(os.environ.get("KTRS_DECODE_SPIN_US", "5000"))
        #: Static KV caches owned here, one per batch size, reused (reset) across calls:
        #: HF would make a new one per call, and every new cache means new graphs.
        self.caches: Dict[int, Tuple[int, Any]] = {}
        self.done = torch.cuda.Event(blocking=True)
        #: With `profile`, each replay is timed on the GPU (events; read by `stats`).
        self.profile = False
        self.events: List[Tuple[Any, Any]] = []

    # -- eligibility and keys ------------------------------------------------------------
    def _cache_of(self, kwargs: Dict[str, Any]):
        for name in ("past_key_values", "cache"):
            c = kwargs.get(name)
            if c is not None:
                return c
        return None

    def _eligible(self, args: tuple, kwargs: Dict[str, Any]) -> bool:
        if args or not self.active or not self.enabled or self.failed or torch.is_grad_enabled():
            return False
        if self.model.training or torch.cuda.is_current_stream_capturing():
            return False
        ids = kwargs.get("input_ids")
        if not isinstance(ids, torch.Tensor) or not ids.is_cuda or ids.dim() != 2 or ids.shape[1] != 1:
            return False
        if kwargs.get("inputs_embeds") is not None or kwargs.get("output_attentions") or kwargs.get("output_hidden_states"):
            return False
        if kwargs.get("return_dict") is False:
            return False
        cache = self._cache_of(kwargs)
        if cache is None or not getattr(cache, "is_compileable", False):
            return False
        for v in kwargs.values():
            if isinstance(v, (dict, list, tuple)):  # nested tensors (e.g. per-layer masks): not handled
                return False
        return True

    def _key(self, kwargs: Dict[str, Any]) -> Tuple:
        parts = []
        for k in sorted(kwargs):
            v = kwargs[k]
            if isinstance(v, torch.Tensor):
                parts.append((k, tuple(v.shape), v.dtype, v.device))
            elif k in ("past_key_values", "cache"):
                # The cache's own tensors are baked into the graph: key on their storage.
                layers = getattr(v, "layers", None) or []
                ptrs = tuple(getattr(l, "keys", None).data_ptr() if getattr(l, "keys", None) is not None else 0 for l in layers)
                parts.append((k, id(v), ptrs))
            else:
                parts.append((k, v if isinstance(v, (int, float, bool, str, type(None))) else repr(v)))
        return tuple(parts)

    # -- the wrapped methods -------------------------------------------------------------
    def run_forward(self, *args, **kwargs):
        if not self._eligible(args, kwargs):
            self.counts["eager_steps"] += 1 if self.active else 0
            return self.forward(*args, **kwargs)
        key = self._key(kwargs)
        entry = self.graphs.get(key)
        if entry is None:
            return self._capture(key, kwargs)
        self.graphs.move_to_end(key)
        for k, t in entry.inputs.items():
            if isinstance(t, torch.Tensor):
                t.copy_(kwargs[k])
        if self.profile:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            entry.graph.replay()
            end.record()
            self.events.append((start, end))
        else:
            entry.graph.replay()
        if self.wait_blocking:
            # Sleep until the step is done instead of letting CUDA's default sync spin:
            # a spinning Python thread takes a core from the experts' worker pool.
            self.done.record()
            self.done.synchronize()
        self.counts["replays"] += 1
        return _detached_output(entry.output)

    def _capture(self, key: Tuple, kwargs: Dict[str, Any]):
        static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        # The warm-up is this step, run for real on a side stream (it also makes the
        # staging memory, which cannot be pinned during capture); capture only records.
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        if self.channel is None:
            self.channel = new_channel() or False
            if self.channel:
                self.channel.set_active(True)
        channel = self.channel or None
        with torch.cuda.stream(side), _host_nodes(channel):
            out = self.forward(**static)
        torch.cuda.current_stream().wait_stream(side)
        _raise_stage_errors(self.model, synchronize=True)
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with _host_nodes(channel), torch.cuda.graph(graph, pool=self.pool):
                static_out = self.forward(**static)
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
            self.failed = f"{type(exc).__name__}: {exc}"
            warnings.warn(f"ktrs: decode graph capture failed, decoding eagerly from now on ({self.failed})", RuntimeWarning, stacklevel=3)
            return out
        self.graphs[key] = _Captured(graph, static, static_out)
        self.counts["captures"] += 1
        while len(self.graphs) > MAX_GRAPHS:
            self.graphs.popitem(last=False)
        return out

    def run_generate(self, *args, **kwargs):
        if not self.enabled or self.active:
            return self.generate(*args, **kwargs)
        fp = _fingerprint(self.model)
        if fp != self.fingerprint:
            self.drop()
            self.fingerprint = fp
        for m in _ktrs_experts(self.model):
            m._ensure_views()
        _raise_stage_errors(self.model, synchronize=False)
        self._provide_cache(args, kwargs)
        from .info import set_tuning, tuning

        spin = tuning().get("KTRS_SPIN_US")
        set_tuning("KTRS_SPIN_US", max(self.spin_us, spin or 0))
        if self.channel:
            self.channel.set_active(True)
        self.active += 1
        try:
            result = self.generate(*args, **kwargs)
        finally:
            self.active -= 1
            try:
                _raise_stage_errors(self.model, synchronize=True)
            finally:
                if self.channel:  # only once the stream is idle: nothing waits on it now
                    self.channel.set_active(False)
                set_tuning("KTRS_SPIN_US", spin)
        return result

    def _provide_cache(self, args: tuple, kwargs: Dict[str, Any]) -> None:
        """Passes a persistent static cache to `generate` where HF would make its own
        (a plain call with a static cache configured, greedy or sampling, one sequence
        per prompt); capacity is rounded up to 256 positions and only ever grows."""
        from transformers import StaticCache

        name = "cache" if "cache" in inspect.signature(type(self.model).forward).parameters else "past_key_values"
        if kwargs.get(name) is not None or kwargs.get("past_key_values") is not None or kwargs.get("cache") is not None:
            return
        gc = kwargs.get("generation_config") or getattr(self.model, "generation_config", None)
        impl = kwargs.get("cache_implementation", getattr(gc, "cache_implementation", None))
        if gc is None or impl != "static" or kwargs.get("use_cache", gc.use_cache) is False:
            return
        ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
        if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or not ids.is_cuda:
            return
        if (kwargs.get("num_beams", gc.num_beams) or 1) > 1 or (kwargs.get("num_return_sequences", gc.num_return_sequences) or 1) > 1:
            return
        new = kwargs.get("max_new_tokens", gc.max_new_tokens)
        need = ids.shape[1] + new if new is not None else kwargs.get("max_length", gc.max_length)
        if not need:
            return
        batch = ids.shape[0]
        size, cache = self.caches.get(batch, (0, None))
        if cache is None or size < need:
            size = max(-(-need // 256) * 256, size)
            cache = StaticCache(config=self.model.config, max_cache_len=size)
            self.caches[batch] = (size, cache)
        else:
            cache.reset()
        kwargs[name] = cache
        kwargs["cache_implementation"] = None  # HF refuses a cache object together with one

    def drop(self) -> None:
        """Forgets every captured graph (after the GPU has finished with them)."""
        if self.graphs and torch.cuda.is_available():
            torch.cuda.synchronize()
        self.graphs.clear()
        # A pool whose graphs are all gone cannot take a new capture (torch asserts).
        self.pool = None
        self.failed = None


def _detached_output(out):
    """A copy of the captured output whose logits the next replay does not overwrite."""
    fields = dict(out.items())
    if isinstance(fields.get("logits"), torch.Tensor):
        fields["logits"] = fields["logits"].clone()
    return type(out)(**fields)


def _raise_stage_errors(model: nn.Module, synchronize: bool) -> None:
    if synchronize and torch.cuda.is_available():
        torch.cuda.synchronize()
    for m in _ktrs_experts(model):
        for stage in _stages(m).values():
            err = stage.native.take_error()
            if err:
                raise _native.KtrsError(f"ktrs: routed experts of {m.where} failed in a decode step: {err}")


def enable(model: nn.Module, static_cache: bool = True) -> nn.Module:
    """Makes ``model.generate`` decode with CUDA graphs (idempotent).

    With ``static_cache`` (default) the model's generation config asks for HF's static
    KV cache, which graphs need, and HF's own auto-compile is switched off (ktrs's graphs
    replace it). Models not on CUDA are left alone.
    """
    existing: Optional[DecodeGraphs] = getattr(model, "_ktrs_decode", None)
    if existing is not None:
        existing.enabled = True
        return model
    device = getattr(model, "_ktrs_device", None)
    if device is None or torch.device(device).type != "cuda":
        return model
    graphs = DecodeGraphs(model)
    model._ktrs_decode = graphs

    # Plain functions carrying the originals' signatures (HF inspects forward's).
    def forward(*args, **kwargs):
        return graphs.run_forward(*args, **kwargs)

    def generate(*args, **kwargs):
        return graphs.run_generate(*args, **kwargs)

    model.forward = functools.update_wrapper(forward, graphs.forward)
    model.generate = functools.update_wrapper(generate, graphs.generate)
    gc = getattr(model, "generation_config", None)
    if gc is not None and static_cache:
        if getattr(gc, "cache_implementation", None) in (None, "dynamic"):
            gc.cache_implementation = "static"
        gc.disable_compile = True
    return model


def disable(model: nn.Module) -> None:
    """Turns decode graphs off for `model` (generate runs eagerly) and frees them."""
    graphs: Optional[DecodeGraphs] = getattr(model, "_ktrs_decode", None)
    if graphs is not None:
        graphs.enabled = False
        graphs.drop()


def stats(model: nn.Module) -> Dict[str, Any]:
    """Decode-graph counters of `model` and the CPU time its expert host nodes took."""
    graphs: Optional[DecodeGraphs] = getattr(model, "_ktrs_decode", None)
    busy = runs = 0.0
    for m in _ktrs_experts(model):
        for stage in _stages(m).values():
            busy += stage.native.busy_seconds
            runs += stage.native.runs
    res: Dict[str, Any] = {"enabled": bool(graphs and graphs.enabled), "graphs": len(graphs.graphs) if graphs else 0,
                           "host_node_runs": int(runs), "host_node_seconds": busy}
    if graphs is not None:
        res.update(graphs.counts)
        res["failed"] = graphs.failed
        if graphs.events:
            torch.cuda.synchronize()
            res["replay_gpu_seconds"] = sum(a.elapsed_time(b) for a, b in graphs.events) / 1e3
    return res


def reset_stats(model: nn.Module) -> None:
    """Zeroes the counters and replay timings of `stats` (host-node totals keep running)."""
    graphs: Optional[DecodeGraphs] = getattr(model, "_ktrs_decode", None)
    if graphs is not None:
        graphs.counts = dict.fromkeys(graphs.counts, 0)
        graphs.events.clear()
