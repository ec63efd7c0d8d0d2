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
import time
import traceback
import warnings
from collections import OrderedDict
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import nn

from . import _native, fused_lora, fused_norm

__all__ = ["enable", "disable", "stats", "reset_stats", "experts_on_stream", "submit_on_stream", "host_node_mode"]

#: Graphs kept per model (each holds its static inputs and a share of one memory pool).
MAX_GRAPHS = 8
#: Static caches kept per batch size (each of its own capacity).
CACHES_PER_BATCH = 2


def _flat(key: Any) -> List[Any]:
    """The scalars of a nested graph key."""
    if isinstance(key, tuple):
        return [x for part in key for x in _flat(part)]
    return [key]

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

    def __init__(self, experts_native: Any, tokens: int, top_k: int, channel: Optional[Any], use_lora: bool) -> None:
        self.native = _native.HostStage(experts_native, tokens, top_k, channel, use_lora)
        self.x, self.ids, self.w, self.out = (torch.from_dlpack(c) for c in self.native.tensors())


def _stages(module: nn.Module) -> Dict[Tuple[int, int, int, bool], _Stage]:
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
    # Whether the expert LoRA applies (PEFT's adapter controls) is fixed per stage; a
    # change of it changes the fingerprint, so graphs are captured anew with other stages.
    use_lora = bool(getattr(module, "lora_active", True))
    key = (tokens, top_k, id(channel), use_lora)
    stage = _stages(module).get(key)
    if stage is None:
        if torch.cuda.is_current_stream_capturing():
            raise _native.KtrsInternalError("ktrs: expert staging must be made before graph capture (warm-up run missing)")
        torch.cuda.synchronize()  # pinning needs this thread's CUDA context current
        stage = _stages(module)[key] = _Stage(module.experts._native, tokens, top_k, channel, use_lora)
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
        if hasattr(m, "lora_active"):  # a KtrsExperts: PEFT's controls of the expert LoRA
            flags.append((name, bool(m.lora_active), getattr(m, "expert_adapter", None)))
            res = getattr(m, "resident", None)
            if res is not None:  # the graphs read its LoRA mirror's addresses
                flags.append((name, tuple(t.data_ptr() for t in res.lora_mirror.values())))
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
        self.counts = {"captures": 0, "replays": 0, "replayed_steps": 0, "eager_steps": 0}
        self.wait_blocking = os.environ.get("KTRS_DECODE_BLOCKING_WAIT", "1") != "0"
        #: The hand-off thread (a `_native.StreamChannel`); None until the first capture,
        #: False where unavailable (host nodes are used then).
        self.channel: Any = None
        #: Worker-pool spin (µs) while a decode runs: its layers come a few hundred µs
        #: apart, and a sleeping pool costs a wake-up per layer.
        self.spin_us = int(os.environ.get("KTRS_DECODE_SPIN_US", "5000"))
        #: Static KV caches owned here, by (batch size, capacity), reused (reset) across
        #: calls: HF would make a new one per call, and every new cache means new graphs.
        #: At most CACHES_PER_BATCH per batch size, least recently used out first.
        self.caches: "OrderedDict[Tuple[int, int], Any]" = OrderedDict()
        #: Simple calls (greedy or sampling) run their whole decode loop in the graph.
        self.in_graph_loop = os.environ.get("KTRS_DECODE_LOOP", "1") != "0"
        #: Decode steps per graph launch of that loop (one wake-up and Python pass each).
        self.chunk = max(1, int(os.environ.get("KTRS_DECODE_CHUNK", "1")))
        self.done = torch.cuda.Event(blocking=True)
        #: With `profile`, each replay is timed on the GPU (events; read by `stats`).
        self.profile = False
        self.events: List[Tuple[Any, Any]] = []
        #: With `profile`, the wall clock after each in-graph-loop step's wait: the step's
        #: time measured directly (not derived from two calls).
        self.walls: List[float] = []

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
        self.replay(entry.graph)
        if self.wait_blocking:
            self.wait()
        return _detached_output(entry.output)

    def wait(self) -> None:
        """Until the current stream is idle. By default sleeping on a blocking event rather
        than CUDA's spinning sync: a spinning Python thread takes a core from the experts'
        worker pool (measured: 15 vs 24 tok/s)."""
        if self.wait_blocking:
            self.done.record()
            self.done.synchronize()
        else:
            torch.cuda.current_stream().synchronize()

    def replay(self, graph: "torch.cuda.CUDAGraph", steps: int = 1) -> None:
        if self.profile:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            graph.replay()
            end.record()
            self.events.append((start, end))
        else:
            graph.replay()
        self.counts["replays"] += 1
        self.counts["replayed_steps"] += steps

    def channel_or_none(self) -> Optional[Any]:
        """The model's stream channel, made on first use; None where host nodes are used."""
        if self.channel is None:
            self.channel = new_channel() or False
            if self.channel:
                self.channel.set_active(True)
        return self.channel or None

    def capture_step(self, step: Callable[[], None]) -> Optional["torch.cuda.CUDAGraph"]:
        """Runs `step` once for real on a side stream (its warm-up, which also makes the
        staging memory), then captures it; None (and eager from then on) if capture fails."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()
        torch.cuda.current_stream().wait_stream(side)
        _raise_stage_errors(self.model, synchronize=True)
        try:
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self.pool):
                step()
        except Exception as exc:  # noqa: BLE001 - any capture failure falls back to eager
            where = traceback.extract_tb(exc.__traceback__)[-1]
            self.failed = f"{type(exc).__name__}: {exc} (at {where.filename}:{where.lineno})"
            warnings.warn(f"ktrs: decode graph capture failed, decoding eagerly from now on ({self.failed})", RuntimeWarning, stacklevel=3)
            return None
        self.counts["captures"] += 1
        return graph

    def _capture(self, key: Tuple, kwargs: Dict[str, Any]):
        static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
        channel = self.channel_or_none()
        result: List[Any] = []

        def step() -> None:
            with _host_nodes(channel):
                result.append(self.forward(**static))

        graph = self.capture_step(step)
        if graph is not None:
            self.graphs[key] = _Captured(graph, static, result[1])
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        return result[0]  # the warm-up ran this step for real

    def run_generate(self, *args, **kwargs):
        if not self.enabled or self.active:
            return self.generate(*args, **kwargs)
        for m in _ktrs_experts(self.model):
            m._ensure_views()  # restored LoRA views, refreshed resident experts
            if m.resident is not None:
                m.resident.refresh_lora(m.lora_params())  # the graphs read this GPU mirror
        fp = _fingerprint(self.model)
        if fp != self.fingerprint:
            self.drop()
            self.fingerprint = fp
            fused_lora.install(self.model)  # before capture: PEFT's LoRA as one kernel each
            fused_norm.install(self.model)  # and each RMSNorm
        _raise_stage_errors(self.model, synchronize=False)
        plan = _loop_plan(self.model, args, kwargs) if self.in_graph_loop else None
        if plan is not None and not plan.ids.is_cuda:
            plan = None
        if plan is None:
            self._provide_cache(args, kwargs)
        from .info import set_tuning, tuning

        spin = tuning().get("KTRS_SPIN_US")
        set_tuning("KTRS_SPIN_US", max(self.spin_us, spin or 0))
        if self.channel:
            self.channel.set_active(True)
        self.active += 1
        try:
            result = generate_in_graph(self, plan) if plan is not None else self.generate(*args, **kwargs)
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
        per prompt), of a capacity that follows the call (`cache_for`)."""
        if self._cache_of(kwargs) is not None:
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
        kwargs[_cache_kwarg(self.model)] = self.cache_for(ids.shape[0], need)[0]
        kwargs["cache_implementation"] = None  # HF refuses a cache object together with one

    def cache_for(self, batch: int, need: int) -> Tuple[Any, int]:
        """(the persistent static cache for `batch` sequences with room for `need`
        positions, reset; its capacity). Capacities come in steps of 256 positions, or
        1/16 to 1/8 of the need above 4096: attention reads the whole static cache at
        every step, so a short chat after a long one must not keep decoding over the long
        one's capacity."""
        from transformers import StaticCache

        step = max(256, 1 << max(0, need.bit_length() - 4))
        size = -(-need // step) * step
        cache = self.caches.get((batch, size))
        if cache is None:
            cache = StaticCache(config=self.model.config, max_cache_len=size)
            self.caches[(batch, size)] = cache
            mine = [key for key in self.caches if key[0] == batch]
            for key in mine[: max(0, len(mine) - CACHES_PER_BATCH)]:
                self._forget(self.caches.pop(key))
        else:
            self.caches.move_to_end((batch, size))
            cache.reset()
        return cache, size

    def _forget(self, cache: Any) -> None:
        """Drops the graphs that write into `cache` (its memory goes with them)."""
        cid = id(cache)
        stale = [key for key in self.graphs if cid in _flat(key)]
        if stale and torch.cuda.is_available():
            torch.cuda.synchronize()
        for key in stale:
            del self.graphs[key]
        if not self.graphs:
            self.pool = None  # a pool whose graphs are all gone takes no new capture

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
        steps = sorted(b - a for a, b in zip(graphs.walls, graphs.walls[1:]))
        if steps:
            res["step_wall_median_seconds"] = steps[len(steps) // 2]
            res["step_wall_max_seconds"] = steps[-1]
    return res


def reset_stats(model: nn.Module) -> None:
    """Zeroes the counters and replay timings of `stats` (host-node totals keep running)."""
    graphs: Optional[DecodeGraphs] = getattr(model, "_ktrs_decode", None)
    if graphs is not None:
        graphs.counts = dict.fromkeys(graphs.counts, 0)
        graphs.events.clear()
        graphs.walls.clear()


# -- the decode loop itself in the graph ---------------------------------------------------
#
# HF's `generate` spends a few ms of Python per token between two graph replays (input
# preparation, a 4-D mask, logits processors, stopping criteria): 10-15% of a step at batch
# 1. For the common calls (greedy or sampling with temperature / top-k / top-p, EOS, min
# lengths, a streamer) the whole step — forward, token choice, stopping state, the next
# step's inputs — is one graph, and Python only replays it and reads a pinned flag. Every
# other call goes through HF's loop (with per-step graphs as above).

#: generation-config fields the in-graph loop implements; others must be at HF's defaults.
_UNSUPPORTED_DEFAULTS = {
    "num_beams": (1,), "num_return_sequences": (1,), "repetition_penalty": (1.0,), "encoder_repetition_penalty": (1.0,),
    "no_repeat_ngram_size": (0,), "typical_p": (1.0,), "epsilon_cutoff": (0.0,), "eta_cutoff": (0.0,), "min_p": (),
    "top_h": (), "bad_words_ids": (), "force_words_ids": (), "sequence_bias": (), "suppress_tokens": (),
    "begin_suppress_tokens": (), "forced_bos_token_id": (), "forced_eos_token_id": (), "guidance_scale": (1.0,),
    "output_scores": (False,), "output_logits": (False,), "output_attentions": (False,), "output_hidden_states": (False,),
    "return_dict_in_generate": (False,), "renormalize_logits": (False,), "max_time": (), "stop_strings": (),
    "exponential_decay_length_penalty": (), "watermarking_config": (), "prompt_lookup_num_tokens": (),
    "assistant_early_exit": (), "num_assistant_tokens": None, "diversity_penalty": (0.0,), "num_beam_groups": (1,),
    "low_memory": (False,), "use_cache": (True,), "prefill_chunk_size": (),
}


class _LoopPlan:
    """What one simple `generate` call asks for, resolved the way HF resolves it."""

    def __init__(self, ids: torch.Tensor, gc: Any, streamer: Any) -> None:
        self.ids, self.streamer = ids, streamer
        prompt = ids.shape[1]
        self.max_new = gc.max_new_tokens if gc.max_new_tokens is not None else gc.max_length - prompt
        eos = gc.eos_token_id
        self.eos: Tuple[int, ...] = tuple(eos) if isinstance(eos, (list, tuple)) else (() if eos is None else (int(eos),))
        self.pad = gc.pad_token_id if gc.pad_token_id is not None else (self.eos[0] if self.eos else None)
        # EOS is blocked while fewer than min_new_tokens are new or min_length is not reached.
        self.eos_block = max(gc.min_new_tokens or 0, (gc.min_length or 0) - prompt, 0)
        self.do_sample = bool(gc.do_sample)
        self.temperature = float(gc.temperature) if self.do_sample and gc.temperature not in (None, 1.0) else None
        self.top_k = int(gc.top_k) if self.do_sample and gc.top_k not in (None, 0) else None
        self.top_p = float(gc.top_p) if self.do_sample and gc.top_p is not None and gc.top_p < 1.0 else None

    def key(self) -> Tuple:
        return ("loop", self.ids.shape[0], self.eos, self.pad, self.do_sample, self.temperature, self.top_k, self.top_p)


def _loop_plan(model: nn.Module, args: tuple, kwargs: Dict[str, Any]) -> Optional[_LoopPlan]:
    """A plan when `generate(*args, **kwargs)` is a call the in-graph loop does exactly as
    HF's loop would, else None."""
    kw = dict(kwargs)
    ids = kw.pop("input_ids", None)
    if ids is None:
        ids = kw.pop("inputs", args[0] if args else None)
    elif args:
        return None
    if len(args) > 1 or not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype != torch.long or ids.shape[1] == 0:
        return None
    streamer = kw.pop("streamer", None)
    mask = kw.pop("attention_mask", None)
    for name in ("logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "assistant_model", "negative_prompt_ids"):
        if kw.pop(name, None) is not None:
            return None
    try:
        gc, rest = model._prepare_generation_config(kw.pop("generation_config", None), **kw)
    except Exception:  # noqa: BLE001 - whatever HF makes of it, its own generate says so
        return None
    if set(rest) - {"use_cache"}:
        return None
    for field, allowed in _UNSUPPORTED_DEFAULTS.items():
        value = getattr(gc, field, None)
        if value is not None and allowed is not None and value not in allowed:
            return None
    if mask is not None and (mask.shape != ids.shape or not bool(mask.all())):
        return None  # padding: HF's loop
    if mask is None and gc.pad_token_id is not None:
        # HF infers a mask from pad tokens in the prompt (unless pad is also EOS).
        eos = gc.eos_token_id if isinstance(gc.eos_token_id, (list, tuple)) else [gc.eos_token_id]
        if gc.pad_token_id not in eos and bool((ids == gc.pad_token_id).any()):
            return None
    plan = _LoopPlan(ids, gc, streamer)
    if plan.max_new is None or plan.max_new < 1 or (plan.top_k is not None and plan.top_k < 0):
        return None
    if getattr(model.config, "_attn_implementation", None) not in ("sdpa", "eager"):
        return None  # the loop builds 4-D masks, which these two take
    return plan


class _Loop:
    """Static state of the in-graph loop for one batch size and sampling setup."""

    def __init__(self, plan: _LoopPlan, capacity: int, vocab: int, device: torch.device, mask_dtype: torch.dtype,
                 chunk: int = 1) -> None:
        b = plan.ids.shape[0]
        self.plan = plan
        long = dict(dtype=torch.long, device=device)
        self.tok = torch.zeros(b, 1, **long)
        self.pos = torch.zeros(b, 1, **long)
        self.count = torch.zeros(1, **long)  # tokens generated so far
        self.finished_at = torch.zeros(1, **long)  # count when all sequences had finished (0: not yet)
        self.eos_block = torch.zeros(1, **long)
        self.unfinished = torch.ones(b, dtype=torch.bool, device=device)
        self.gen = torch.zeros(b, capacity, **long)
        self.eos = torch.tensor(plan.eos, **long) if plan.eos else None
        self.eos_mask = torch.zeros(vocab, dtype=torch.bool, device=device)
        if plan.eos:
            self.eos_mask[list(plan.eos)] = True
        # A 4-D mask made here rather than by HF inside the forward: HF's eager-attention
        # mask makes a tensor from a Python number, a host-to-device copy, which graph
        # capture forbids. Bool for SDPA (True = attend), additive for eager.
        self.kv_pos = torch.arange(capacity, **long)
        self.mask_bool = mask_dtype == torch.bool
        self.mask = torch.zeros(b, 1, 1, capacity, dtype=mask_dtype, device=device)
        self.mask_min = torch.full((), torch.finfo(mask_dtype).min if not self.mask_bool else 0, dtype=mask_dtype, device=device)
        self.mask_zero = torch.zeros((), dtype=mask_dtype, device=device)
        pin = device.type == "cuda"
        # the tokens of the last launch's steps (row j: its step j), "all finished", and when
        self.host_tok = torch.zeros(chunk, b, dtype=torch.long, pin_memory=pin)
        self.host_done = torch.zeros(1, dtype=torch.bool, pin_memory=pin)
        self.host_finished = torch.zeros(1, dtype=torch.long, pin_memory=pin)
        self.graph: Optional["torch.cuda.CUDAGraph"] = None  # one step
        self.graph_chunk: Optional["torch.cuda.CUDAGraph"] = None  # `chunk` steps

    def start(self, plan: _LoopPlan) -> None:
        prompt = plan.ids.shape[1]
        self.pos.fill_(prompt)
        self.count.zero_()
        self.finished_at.zero_()
        self.eos_block.fill_(plan.eos_block)
        self.unfinished.fill_(True)
        self.plan = plan

    def masks(self, positions: torch.Tensor) -> torch.Tensor:
        """The causal mask of queries at `positions` [B, q] against the whole cache."""
        allowed = self.kv_pos[None, None, None, :] <= positions[:, None, :, None]
        return allowed if self.mask_bool else torch.where(allowed, self.mask_zero, self.mask_min)

    def update_mask(self) -> None:
        """The next step's mask, in place (a static input of the graph)."""
        self.mask.copy_(self.masks(self.pos))

    def advance(self, logits: torch.Tensor, j: int = 0) -> None:
        """Chooses each sequence's next token from the last position's logits as HF's
        processors and samplers would, records it and prepares the next step's inputs
        (`j`: the step's place in its launch, for the pinned token rows)."""
        p = self.plan
        scores = logits[:, -1, :].float()
        if p.eos:
            scores = torch.where(self.eos_mask & (self.count < self.eos_block), float("-inf"), scores)
        if p.do_sample:
            if p.temperature is not None:
                scores = scores / p.temperature
            if p.top_k is not None:
                kth = torch.topk(scores, min(p.top_k, scores.shape[-1]))[0][..., -1, None]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if p.top_p is not None:
                sorted_scores, order = torch.sort(scores, descending=False)
                remove = sorted_scores.softmax(dim=-1).cumsum(dim=-1) <= (1 - p.top_p)
                remove[..., -1:] = False
                scores = scores.masked_fill(remove.scatter(1, order, remove), float("-inf"))
            nxt = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            nxt = torch.argmax(scores, dim=-1)
        if p.pad is not None and p.eos:
            nxt = torch.where(self.unfinished, nxt, torch.full_like(nxt, p.pad))
        self.gen.index_copy_(1, self.count, nxt[:, None])
        if self.eos is not None:
            # Not torch.isin: for many EOS ids it sorts through a sync, which capture forbids.
            self.unfinished &= ~(nxt[:, None] == self.eos[None, :]).any(dim=1)
        self.tok.copy_(nxt[:, None])
        self.count.add_(1)
        done = ~self.unfinished.any().reshape(1)
        self.finished_at.copy_(torch.where(done & (self.finished_at == 0), self.count, self.finished_at))
        self.host_tok[j].copy_(nxt, non_blocking=True)
        self.host_done.copy_(done, non_blocking=True)
        self.host_finished.copy_(self.finished_at, non_blocking=True)


def _cache_kwarg(model: nn.Module) -> str:
    """The forward's name for the KV cache: `cache` (transformers 5.2x) or `past_key_values`."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def _forward_kwargs(model: nn.Module, cache: Any) -> Dict[str, Any]:
    return {_cache_kwarg(model): cache, "use_cache": True, "logits_to_keep": 1}


@torch.no_grad()  # as HF's generate: no autograd (and the MoE blocks take the stream path)
def generate_in_graph(graphs: "DecodeGraphs", plan: _LoopPlan) -> torch.Tensor:
    """`generate` for a simple call (see `_loop_plan`): prefill eagerly, then every decode
    step one replay of a graph holding forward, token choice and bookkeeping. Also runs
    without CUDA (same code, no graph), which is how the CPU tests check it."""
    model, ids = graphs.model, plan.ids
    batch, prompt = ids.shape
    device = ids.device
    cache, size = graphs.cache_for(batch, prompt + plan.max_new)
    fw = _forward_kwargs(model, cache)
    key = plan.key() + (id(cache), size)
    loop = graphs.graphs.get(key)
    if loop is None:
        mask_dtype = torch.bool if model.config._attn_implementation == "sdpa" else model.dtype
        loop = _Loop(plan, size, model.config.vocab_size, device, mask_dtype, graphs.chunk)
    loop.start(plan)
    if plan.streamer is not None:
        plan.streamer.put(ids.cpu())
    positions = torch.arange(prompt, device=device).expand(batch, prompt)
    prefill = graphs.forward(input_ids=ids, position_ids=positions, attention_mask=loop.masks(positions), **fw)
    loop.advance(prefill.logits)
    del prefill
    loop.update_mask()
    use_graph = device.type == "cuda" and graphs.enabled and not graphs.failed
    channel = graphs.channel_or_none() if use_graph else None

    def steps(k: int) -> None:
        with _host_nodes(channel) if use_graph else contextlib.nullcontext():
            for j in range(k):
                out = graphs.forward(input_ids=loop.tok, position_ids=loop.pos, attention_mask=loop.mask, **fw)
                loop.advance(out.logits, j)
                loop.pos.add_(1)
                loop.update_mask()

    # n: tokens so far; fresh: how many the last launch made. A launch of `chunk` steps
    # (one graph) saves the per-step wake-up and Python; steps after every sequence has
    # finished inside it are dropped (their tokens are pad or past the end).
    n, fresh = 1, 1
    while True:
        if device.type == "cuda":
            graphs.wait()  # the pinned tokens and "all finished" flags are then written
            done = bool(loop.host_done[0])
            if done:
                end = int(loop.host_finished[0])
                fresh -= n - end
                n = end
        else:
            done = not bool(loop.unfinished.any())
        if graphs.profile:
            graphs.walls.append(time.perf_counter())
        if plan.streamer is not None:
            for j in range(fresh):
                plan.streamer.put(loop.host_tok[j].clone() if device.type == "cuda" else loop.tok[:, 0].cpu())
        if done or n >= plan.max_new:
            break
        k = loop.host_tok.shape[0] if use_graph and n + loop.host_tok.shape[0] <= plan.max_new else 1
        attr = "graph" if k == 1 else "graph_chunk"
        if not use_graph:
            steps(1)
        elif getattr(loop, attr) is not None:
            graphs.replay(getattr(loop, attr), k)
        else:
            graph = graphs.capture_step(functools.partial(steps, k))
            setattr(loop, attr, graph)
            if graph is not None:
                graphs.graphs[key] = loop
            else:
                use_graph = False
        n, fresh = n + k, k
    if plan.streamer is not None:
        plan.streamer.end()
    return torch.cat([ids, loop.gen[:, :n]], dim=1)
