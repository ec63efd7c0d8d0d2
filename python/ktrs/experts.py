"""The low-level experts object: one MoE layer's routed experts held by Rust."""

from __future__ import annotations

import functools
import threading
from typing import Callable, Dict, List, Optional, Sequence, Tuple, TypeVar

import torch

from ._native import KtrsTypeError, KtrsValueError
from . import _native

ForwardHandle = _native.ForwardHandle

LORA_NAMES: Tuple[str, ...] = tuple(_native.Experts.lora_names())


_F = TypeVar("_F", bound=Callable)

_BACKGROUND = None


def background():
    """The one worker thread that runs expert calls while the caller goes on (overlap
    with GPU work); one is enough: the Rust pool runs one job at a time."""
    global _BACKGROUND
    if _BACKGROUND is None:
        from concurrent.futures import ThreadPoolExecutor

        _BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="ktrs-submit")
    return _BACKGROUND


def check_call(hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, hidden_size: int) -> None:
    """The arguments of an expert call, checked before any path touches them: what the
    Rust layer checks on the CPU path, for the paths where a torch op would otherwise
    fail with a bare error or, worse, broadcast or cast without one (stream work, the
    GPU's share)."""
    for name, t in (("hidden_states", hidden), ("topk_ids", topk_ids), ("topk_weights", topk_weights)):
        if not isinstance(t, torch.Tensor):
            raise KtrsTypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size:
        raise KtrsValueError(f"`hidden_states` must have shape [*, {hidden_size}], got {list(hidden.shape)}")
    if not hidden.is_floating_point():
        raise KtrsTypeError(f"`hidden_states` must be floating point, got {hidden.dtype}")
    if topk_ids.dim() != 2 or topk_ids.shape[0] != hidden.shape[0]:
        raise KtrsValueError(f"`topk_ids` must have shape [{hidden.shape[0]}, k] (one row per token), got {list(topk_ids.shape)}")
    if topk_ids.is_floating_point() or topk_ids.is_complex() or topk_ids.dtype == torch.bool:
        raise KtrsTypeError(f"`topk_ids` must be an integer tensor, got {topk_ids.dtype}")
    if topk_weights.shape != topk_ids.shape:
        raise KtrsValueError(f"`topk_weights` must have the shape of topk_ids {list(topk_ids.shape)}, got {list(topk_weights.shape)}")
    if not topk_weights.is_floating_point():
        raise KtrsTypeError(f"`topk_weights` must be floating point, got {topk_weights.dtype}")


def _locked(fn: _F) -> _F:
    """Runs the method under the layer's lock. The Rust layer may not be changed
    (set_lora, set_expert, threads, isa) while a call of another thread uses it (a
    forward submitted from a worker thread, say): PyO3 would refuse with a bare
    "Already borrowed" RuntimeError. The lock makes such calls wait instead; waiting on
    it releases the GIL, and the kernels run without the GIL, so nothing deadlocks."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        with self._lock:
            return fn(self, *args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _as_bf16_cpu(name: str, t: torch.Tensor) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise KtrsTypeError(f"`{name}` must be a torch.Tensor, got {type(t).__name__}")
    return t.detach().to(device="cpu", dtype=torch.bfloat16).contiguous()


class MoeExperts:
    """The routed experts (SwiGLU) of one MoE layer, with optional LoRA, in Rust memory.

    Weights are copied from ``gate [E, I, H]``, ``up [E, I, H]`` and ``down [E, H, I]``
    (any dtype or device; packed as bf16) and never read from Python again.

    ``forward`` and ``backward`` are strict: ``hidden`` must be a contiguous CPU bf16
    ``[T, H]`` tensor, ``topk_ids`` int64 ``[T, k]``, ``topk_weights`` float32 ``[T, k]``;
    anything else raises an exception naming the argument. For autograd and automatic
    dtype/device handling use :class:`ktrs.KtrsExperts`.
    """

    def __init__(
        self,
        gate: torch.Tensor,
        up: torch.Tensor,
        down: torch.Tensor,
        *,
        lora_rank: int = 0,
        lora_alpha: Optional[float] = None,
        use_rslora: bool = False,
        isa: Optional[str] = None,
        threads: Optional[int] = None,
        seed: int = 0,
    ) -> None:
        self._native = _native.Experts(
            _as_bf16_cpu("gate", gate),
            _as_bf16_cpu("up", up),
            _as_bf16_cpu("down", down),
            lora_rank=lora_rank,
            lora_alpha=lora_alpha,
            use_rslora=use_rslora,
            isa=isa,
            threads=threads,
            seed=seed,
        )
        self._views: Dict[str, torch.Tensor] = {}
        self._grad_views: Dict[str, torch.Tensor] = {}
        self._lock = threading.RLock()
        self._state_version = 0
        self._weights_version = 0

    @classmethod
    def empty(
        cls,
        num_experts: int,
        hidden_size: int,
        intermediate_size: int,
        **kwargs,
    ) -> "MoeExperts":
        """A layer with zero weights, filled later with :meth:`set_expert`."""
        self = cls.__new__(cls)
        self._native = _native.Experts.empty(num_experts, hidden_size, intermediate_size, **kwargs)
        self._views = {}
        self._grad_views = {}
        self._lock = threading.RLock()
        self._state_version = 0
        self._weights_version = 0
        return self

    # -- weights -------------------------------------------------------------------------
    @_locked
    def set_expert(self, expert: int, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
        """Packs one expert's weights (gate, up ``[I, H]``, down ``[H, I]``)."""
        self._state_version += 1
        self._weights_version += 1
        self._native.set_expert(expert, _as_bf16_cpu("gate", gate), _as_bf16_cpu("up", up), _as_bf16_cpu("down", down))

    @_locked
    def get_expert(self, expert: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Copies of one expert's weights in HF layout (bf16)."""
        i, h = self.intermediate_size, self.hidden_size
        g = torch.empty(i, h, dtype=torch.bfloat16)
        u = torch.empty(i, h, dtype=torch.bfloat16)
        d = torch.empty(h, i, dtype=torch.bfloat16)
        self._native.get_expert(expert, g, u, d)
        return g, u, d

    # -- compute -------------------------------------------------------------------------
    @_locked
    def forward(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        *,
        save_for_backward: bool = False,
        out: Optional[torch.Tensor] = None,
        use_lora: bool = True,
    ) -> Tuple[torch.Tensor, Optional[ForwardHandle]]:
        """Returns ``(out [T, H] bf16, handle)``; ``handle`` is None unless saving.

        ``topk_ids`` are in ``[0, E)``, or ``-1`` for "no expert": that slot adds nothing
        and its weight gets a zero gradient (the GPU prefill passes -1 for the slots
        whose experts it runs on the GPU).

        ``use_lora=False`` computes the base experts although the layer has LoRA (what
        PEFT's ``disable_adapter`` asks for); that handle's backward gives no LoRA
        gradients. A handle is tied to the layer's LoRA setup: after :meth:`set_lora`,
        :meth:`backward` refuses it with :class:`ktrs.StaleHandleError`.
        """
        if out is None:
            if not isinstance(hidden, torch.Tensor):
                raise KtrsTypeError(f"`hidden_states` must be a torch.Tensor, got {type(hidden).__name__}")
            out = torch.empty(hidden.shape, dtype=torch.bfloat16)
        handle = self._native.forward(hidden, topk_ids, topk_weights, out, save_for_backward=save_for_backward, use_lora=use_lora)
        return out, handle

    __call__ = forward

    @_locked
    def backward(
        self,
        handle: ForwardHandle,
        grad_output: torch.Tensor,
        *,
        lora_grads: Optional[Sequence[torch.Tensor]] = None,
        accumulate: bool = False,
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """Returns ``(grad_hidden [T, H] bf16, grad_topk_weights [T, k] f32)``.

        LoRA gradients are added to the layer's own buffers (:meth:`lora_grad`) unless
        ``lora_grads`` (six f32 tensors, :data:`LORA_NAMES` order) is given; those are
        overwritten, or added to with ``accumulate=True``.
        """
        if not isinstance(handle, ForwardHandle):
            raise KtrsTypeError(f"`handle` must be the ForwardHandle of a forward with save_for_backward=True, got {type(handle).__name__}")
        grad_hidden = torch.empty(handle.tokens, self.hidden_size, dtype=torch.bfloat16)
        grad_weights = torch.empty(handle.tokens, handle.top_k, dtype=torch.float32)
        self._native.backward(
            handle,
            grad_output,
            grad_hidden,
            grad_weights,
            lora_grads=list(lora_grads) if lora_grads is not None else None,
            accumulate=accumulate,
        )
        return grad_hidden, grad_weights

    # -- LoRA ----------------------------------------------------------------------------
    def packed_weights(self, name: str) -> torch.Tensor:
        """Zero-copy bf16 view of the packed weights of ``"gate_up"`` or ``"down"``:
        ``[E, panels, k_pad / 2, 16, 2]``, element ``[e, p, j, l, b]`` = ``W_e[16p + l,
        2j + b]``; gate_up interleaves 16-row panels of gate and up. Read-only by
        contract: the kernels read this memory (the GPU prefill copies it as is)."""
        return torch.from_dlpack(self._native.packed_weights(name))

    @_locked
    def lora_weight(self, name: str) -> torch.Tensor:
        """Zero-copy f32 view ``[E, rows, cols]`` of LoRA matrix ``name`` (Rust memory)."""
        if name not in self._views:
            self._views[name] = torch.from_dlpack(self._native.lora_weight(name))
        return self._views[name]

    @_locked
    def lora_grad(self, name: str) -> torch.Tensor:
        """Zero-copy view of the layer-owned gradient of LoRA matrix ``name``."""
        if name not in self._grad_views:
            self._grad_views[name] = torch.from_dlpack(self._native.lora_grad(name))
        return self._grad_views[name]

    def lora_weights(self) -> Dict[str, torch.Tensor]:
        """All six LoRA matrices (zero-copy views), by name."""
        return {n: self.lora_weight(n) for n in LORA_NAMES}

    @_locked
    def set_lora_weight(self, name: str, value: torch.Tensor) -> None:
        """Copies ``value`` (any dtype/device, shape ``lora_shape(name)``) into Rust memory."""
        if not isinstance(value, torch.Tensor):
            raise KtrsTypeError(f"`value` must be a torch.Tensor, got {type(value).__name__}")
        self._state_version += 1
        self._native.set_lora_weight(name, value.detach().to("cpu", torch.float32).contiguous())

    def lora_shape(self, name: str) -> List[int]:
        """Shape ``[E, rows, cols]`` of LoRA matrix ``name``."""
        return list(self._native.lora_shape(name))

    @_locked
    def set_lora(self, lora_rank: int, lora_alpha: Optional[float] = None, use_rslora: bool = False, seed: int = 0) -> None:
        """Gives the experts fresh LoRA of this rank (PEFT init: A Kaiming-uniform, B zero),
        or removes it with ``lora_rank=0``. Forward handles made before are stale from now
        on (:meth:`backward` raises :class:`ktrs.StaleHandleError`)."""
        self._state_version += 1
        self._native.set_lora(lora_rank, lora_alpha=lora_alpha, use_rslora=use_rslora, seed=seed)
        self._views.clear()
        self._grad_views.clear()

    @_locked
    def zero_lora_grads(self) -> None:
        """Zeroes the layer-owned LoRA gradients (:meth:`lora_grad`)."""
        self._native.zero_lora_grads()

    # -- properties ----------------------------------------------------------------------
    @property
    def isa(self) -> str:
        return self._native.isa

    @isa.setter
    @_locked
    def isa(self, value: str) -> None:
        self._state_version += 1
        self._native.isa = value

    @property
    def threads(self) -> int:
        """Threads of the kernels' pool (1 to :data:`ktrs.MAX_THREADS`; setting None picks
        ``KTRS_THREADS`` or one per physical core, as the constructor does)."""
        return self._native.threads

    @threads.setter
    @_locked
    def threads(self, value: Optional[int]) -> None:
        self._native.threads = value

    @property
    def state_version(self) -> int:
        """Changes whenever this object replaces expert weights, LoRA values or LoRA setup,
        or the ISA (what a forward's result depends on besides its inputs; in-place writes
        to the LoRA parameters show in their torch version counters instead)."""
        return self._state_version

    @property
    def weights_version(self) -> int:
        """Changes whenever :meth:`set_expert` replaces expert weights (copies of them made
        elsewhere, such as GPU-resident experts, are stale then)."""
        return self._weights_version

    @property
    def lora_generation(self) -> int:
        """Changes with every :meth:`set_lora`; forward handles record it."""
        return self._native.lora_generation

    num_experts = property(lambda self: self._native.num_experts)
    hidden_size = property(lambda self: self._native.hidden_size)
    intermediate_size = property(lambda self: self._native.intermediate_size)
    lora_rank = property(lambda self: self._native.lora_rank)
    lora_alpha = property(lambda self: self._native.lora_alpha)
    lora_scaling = property(lambda self: self._native.lora_scaling)
    use_rslora = property(lambda self: self._native.use_rslora)
    weight_bytes = property(lambda self: self._native.weight_bytes)

    @property
    def transposed_cache_bytes(self) -> int:
        """Bytes of transposed expert weights the backward keeps across calls (budget:
        ``KTRS_TRANSPOSED_CACHE_MB``, default a quarter of RAM; see docs/architecture.md)."""
        return self._native.transposed_cache_bytes

    @_locked
    def clear_transposed_cache(self) -> None:
        """Frees the transposed weights kept for the backward (the next backward rebuilds
        what it needs)."""
        self._native.clear_transposed_cache()

    def __repr__(self) -> str:
        return repr(self._native).replace("Experts(", "MoeExperts(", 1)
