"""Routed experts kept on the GPU: spare GPU memory spent on the experts the router picks most.

ktrs runs routed experts on the CPU because the GPU cannot hold them all; a GPU that can
hold *some* of them (DeepSeek-V2-Lite's 26.8 GB of experts beside a 24 GB card's free
memory, say) should. :func:`place_experts_on_gpu` copies chosen experts of each layer to
the GPU once, in the row-major layout the GPU's math reads (unpacked from the Rust
panels; the Rust copy stays: it is what the CPU kernels and adapters use). Every call
then runs the resident experts' rows on the GPU while the CPU runs the rest at the same
time: decode graphs (a static-shape part inside the captured step, see
:meth:`ResidentExperts.decode_forward`), prompts and training calls (through
:class:`ktrs.gpu_experts.StreamedExperts`, which also streams further experts of long
calls; resident ones cost it no copy).

Which experts: the ones routed to most, counted while :func:`count_routing` is on (a
calibration prompt or a few training steps), else the lowest ids of every layer in turn
(random routing makes them all alike). kt-kernel's ``num_gpu_experts`` takes the first
ids of each layer; here a memory budget is spread over layers by use.

Memory rule: the GPU copies are torch buffers of the layer's :class:`KtrsExperts`
(non-persistent: never in a ``state_dict``), read by torch math only; the Rust kernels
never read them. Expert LoRA stays in Rust memory: calls copy the resident experts' slices
to the GPU (their gradients go back into the Rust buffers), and decode graphs read a GPU
mirror refreshed at each ``generate`` call.
"""

from __future__ import annotations

import contextlib
import re
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from ._native import KtrsTypeError, KtrsValueError
from .experts import LORA_NAMES, MoeExperts

__all__ = ["ResidentExperts", "place_experts_on_gpu", "count_routing", "parse_bytes"]


class ResidentExperts(nn.Module):
    """One layer's experts held on a torch device: weights ``gate_up [R, 2·I_pad, H_pad]``
    (gate and up interleaved per 16 rows, as the packed panels are) and ``down [R, H_pad,
    I_pad]``, bf16; ``slot_of [E]`` maps an expert id to its row in them, or -1."""

    def __init__(self, experts: MoeExperts, ids: Sequence[int], device: Union[str, torch.device]) -> None:
        super().__init__()
        E = experts.num_experts
        ids = sorted({int(e) for e in ids})
        if ids and (ids[0] < 0 or ids[-1] >= E):
            raise KtrsValueError(f"experts: ids must be in [0, {E}), got {ids[0] if ids[0] < 0 else ids[-1]}")
        self.ids: List[int] = ids
        self.device = normalized(device)
        self.num_experts = E
        self.weights_version = experts.weights_version
        self.hidden_size, self.intermediate_size = experts.hidden_size, experts.intermediate_size
        gu_packed, dn_packed = experts.packed_weights("gate_up"), experts.packed_weights("down")
        gu = torch.empty((len(ids), gu_packed.shape[1] * 16, gu_packed.shape[2] * 2), dtype=torch.bfloat16, device=self.device)
        dn = torch.empty((len(ids), dn_packed.shape[1] * 16, dn_packed.shape[2] * 2), dtype=torch.bfloat16, device=self.device)
        for j, e in enumerate(ids):  # one expert at a time: no second host copy of the layer
            gu[j].copy_(unpack(gu_packed[e : e + 1])[0])
            dn[j].copy_(unpack(dn_packed[e : e + 1])[0])
        slot = torch.full((E,), -1, dtype=torch.int64)
        slot[ids] = torch.arange(len(ids))
        self.slots: Dict[int, int] = {e: j for j, e in enumerate(ids)}
        self.register_buffer("gate_up", gu, persistent=False)
        self.register_buffer("down", dn, persistent=False)
        self.register_buffer("slot_of", slot.to(self.device), persistent=False)
        #: The decode graphs' copy of the resident experts' LoRA (see :meth:`refresh_lora`).
        self.lora_mirror: Dict[str, torch.Tensor] = {}

    @property
    def count(self) -> int:
        return len(self.ids)

    def serves(self, device: torch.device) -> bool:
        """Whether calls on `device` run some experts here."""
        return bool(self.ids) and self.device == device

    @property
    def nbytes(self) -> int:
        return (self.gate_up.numel() + self.down.numel()) * 2

    def _apply(self, fn, recurse: bool = True):
        # Placed on purpose: model.to()/.half() must not move or cast them.
        return self

    def extra_repr(self) -> str:
        return f"experts={self.count}/{self.num_experts}, device={self.device}, {self.nbytes / 2**30:.2f} GiB"

    # -- decode graphs --------------------------------------------------------------------
    def refresh_lora(self, lora: Sequence[torch.Tensor]) -> None:
        """Copies the resident experts' slices of the layer's LoRA (Rust memory) into the
        GPU mirror, in place while the shapes hold (captured graphs read those addresses)."""
        if not lora:
            self.lora_mirror = {}
            return
        idx = torch.tensor(self.ids, dtype=torch.long)
        for name, t in zip(LORA_NAMES, lora):
            src = t.detach()[idx]
            dst = self.lora_mirror.get(name)
            if dst is None or dst.shape != src.shape:
                self.lora_mirror[name] = src.to(self.device, torch.float32)
            else:
                dst.copy_(src)

    def cpu_ids(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """``topk_ids`` with the resident experts' slots -1 (the CPU skips them)."""
        ids = topk_ids.to(torch.int64)
        return torch.where(self.slot_of[ids] >= 0, torch.full_like(ids, -1), ids)

    def decode_forward(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, use_lora: bool, scaling: float) -> torch.Tensor:
        """The resident experts' share ``[T, H]`` f32 of a call, in fixed shapes and with no
        host reads (it is captured into decode graphs): with few pairs, each pair's
        expert weights gathered (a gather moves them twice more: worth it while
        3·pairs ≤ resident experts); otherwise every resident expert on all rows,
        weighted by a routing matrix (zero where not routed)."""
        from .gpu_experts import expert_math

        T, k = topk_ids.shape
        slot = self.slot_of[topk_ids.to(torch.int64)]  # [T, k]
        w = topk_weights.to(torch.float32) * (slot >= 0)
        x = hidden.to(torch.bfloat16)
        L = self.lora_mirror if use_lora else {}
        if 3 * T * k <= self.count:
            s = slot.clamp(min=0).reshape(-1)
            y = expert_math(x.repeat_interleave(k, 0)[:, None, :], self.gate_up[s], self.down[s], {n: t[s] for n, t in L.items()},
                            scaling, self.hidden_size, self.intermediate_size)
            return (y.view(T, k, -1) * w[..., None]).sum(1)
        y = expert_math(x[None].expand(self.count, T, x.shape[1]), self.gate_up, self.down, L, scaling, self.hidden_size, self.intermediate_size)
        route = torch.zeros(T, self.count + 1, dtype=torch.float32, device=x.device)
        route.scatter_add_(1, slot + 1, w)  # column 0 collects the non-resident slots (weight 0)
        return torch.einsum("rt,rth->th", route[:, 1:].t(), y)


def normalized(device: Union[str, torch.device]) -> torch.device:
    """``cuda`` → ``cuda:<current>``: tensors report the indexed form, and calls compare it."""
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """``[n, P, K/2, 16, 2]`` panels → ``[n, 16·P, K]`` row-major weights."""
    n, p, kh, lanes, two = packed.shape
    return packed.permute(0, 1, 3, 2, 4).reshape(n, p * lanes, kh * two)


_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9, "t": 1e12, "tb": 1e12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(memory: Union[int, float, str]) -> int:
    """``12 * 2**30``, ``"12GiB"``, ``"12 GB"``, ``"500MB"`` → bytes."""
    if isinstance(memory, bool) or not isinstance(memory, (int, float, str)):
        raise KtrsTypeError(f"memory: expected bytes (int) or a size such as '12GiB', got {type(memory).__name__}")
    if isinstance(memory, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", memory)
        if not m or m.group(2).lower() not in _UNITS:
            raise KtrsValueError(f"memory: expected a size such as '12GiB', '12GB' or '500MB', got {memory!r}")
        memory = float(m.group(1)) * _UNITS[m.group(2).lower()]
    if not memory >= 0:
        raise KtrsValueError(f"memory: expected a size >= 0, got {memory!r}")
    return int(memory)


def _layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    from .module import KtrsExperts

    return [(n, m) for n, m in model.named_modules() if isinstance(m, KtrsExperts)]


@contextlib.contextmanager
def count_routing(model: nn.Module) -> Iterator[None]:
    """Counts, per layer, the rows routed to each expert while the block is open (adding to
    earlier counts); :func:`place_experts_on_gpu` then keeps the busiest experts. Run a
    few representative prompts or training steps inside it."""
    layers = _layers(model)
    for _, m in layers:
        if m.routing_counts is None:
            m.routing_counts = torch.zeros(m.num_experts, dtype=torch.int64)
        m.counting = True
    try:
        yield
    finally:
        for _, m in layers:
            m.counting = False


def place_experts_on_gpu(
    model: nn.Module,
    memory: Union[int, float, str, None] = None,
    *,
    per_layer: Optional[int] = None,
    experts: Optional[Dict[str, Sequence[int]]] = None,
    device: Union[str, torch.device, None] = None,
) -> Dict[str, List[int]]:
    """Keeps some routed experts of a patched model on the GPU (replacing any earlier
    placement); returns ``{layer name: expert ids}``.

    Give one of: ``memory`` (bytes, or a size such as ``"12GiB"``; spread over the layers,
    busiest experts first, see :func:`count_routing`), ``per_layer`` (that many experts of
    every layer, busiest first) or ``experts`` (``{layer name: ids}``, layer names as in
    ``model.named_modules()``). ``0`` / ``{}`` puts every expert back on the CPU only.
    ``device``: a CUDA device (default: the one the model runs on). A budget larger than
    the device's free memory is refused. Outputs stay those of the CPU kernels within
    bf16 rounding: the GPU runs the same math (bf16 products, f32 accumulation and LoRA).
    """
    layers = _layers(model)
    if not layers:
        raise KtrsValueError(f"{type(model).__name__} has no ktrs experts: call ktrs.patch_model or ktrs.from_pretrained first")
    if sum(x is not None for x in (memory, per_layer, experts)) != 1:
        raise KtrsValueError("place_experts_on_gpu: give exactly one of memory, per_layer or experts")
    dev = torch.device(device if device is not None else getattr(model, "_ktrs_device", "cuda"))
    from . import gpu_experts

    if dev.type != "cuda" and not gpu_experts.ON_CPU:
        raise KtrsValueError(f"device: expected a CUDA device for resident experts, got {dev}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise KtrsValueError("device: CUDA is not available; resident experts need a GPU")
    dev = normalized(dev)
    names = {n for n, _ in layers}
    per_expert = {n: expert_bytes(m.experts) for n, m in layers}
    if experts is not None:
        unknown = sorted(set(experts) - names)
        if unknown:
            raise KtrsValueError(f"experts: no ktrs layer named {unknown[0]!r} (layers look like {layers[0][0]!r})")
        chosen = {n: list(experts.get(n, ())) for n, _ in layers}
    elif per_layer is not None:
        if isinstance(per_layer, bool) or not isinstance(per_layer, int) or per_layer < 0:
            raise KtrsValueError(f"per_layer: expected a whole number >= 0, got {per_layer!r}")
        chosen = {n: _busiest(m)[:per_layer] for n, m in layers}
    else:
        budget = parse_bytes(memory)  # type: ignore[arg-type]
        ranked = sorted(((-c, rank, i, e) for i, (n, m) in enumerate(layers) for rank, (e, c) in enumerate(_busiest(m, with_counts=True))))
        chosen = {n: [] for n, _ in layers}
        used = 0
        for _, _, i, e in ranked:
            n = layers[i][0]
            if used + per_expert[n] > budget:
                continue
            chosen[n].append(e)
            used += per_expert[n]
    need = sum(len(set(ids)) * per_expert[n] for n, ids in chosen.items())
    # Free the earlier placement first: its memory counts as free for the new one.
    for _, m in layers:
        m.set_resident(None)
    if dev.type == "cuda" and need:
        free, _ = torch.cuda.mem_get_info(dev)
        if need > free:
            raise KtrsValueError(f"memory: the placement needs {need / 2**30:.2f} GiB on {dev} but only {free / 2**30:.2f} GiB are free")
    out: Dict[str, List[int]] = {}
    for n, m in layers:
        ids = chosen[n]
        m.set_resident(ResidentExperts(m.experts, ids, dev) if ids else None)
        out[n] = sorted(set(int(e) for e in ids))
    return out


def expert_bytes(experts: MoeExperts) -> int:
    """GPU bytes of one resident expert (padded, as the packed panels are)."""
    gu, dn = experts.packed_weights("gate_up"), experts.packed_weights("down")
    return (gu[0].numel() + dn[0].numel()) * 2


def _busiest(m: nn.Module, with_counts: bool = False):
    """The layer's expert ids, most routed first (ties: lower id first)."""
    counts = m.routing_counts.tolist() if m.routing_counts is not None else [0] * m.num_experts
    order = sorted(range(m.num_experts), key=lambda e: (-counts[e], e))
    return [(e, counts[e]) for e in order] if with_counts else order
