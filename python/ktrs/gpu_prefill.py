"""Long prefills on the GPU: the routed experts' packed weights streamed over PCIe.

With many tokens per expert the CPU's tile unit is what a prefill waits for (DeepSeek-V2-Lite,
2048 tokens: ~50 ms per layer) while the GPU idles; copying the layer's weights to the GPU
costs their bytes over the PCIe rate (1.1 GB) and the GPU's GEMMs are nearly free. Past
:func:`rows_threshold` rows per expert (tokens × top-k / experts) the copy wins, so
inference calls (no autograd) on CUDA inputs take this path; training, decode and short
prompts stay on the CPU. (llama.cpp's "op offload" makes the same trade for batches ≥ 32.)

Memory: the weights stay Rust-owned. The copy reads them through a read-only view of the
packed buffers (which keeps the layer alive), page-locked once per layer with
``cudaHostRegister`` so the copy engines read them at full rate (unregistered before the
view is dropped). On the GPU nothing outlives a call but torch's cached blocks: experts are
copied in chunks of at most :data:`CHUNK_BYTES`, two in flight, while the previous chunk's
GEMMs run. The math is the CPU kernels': gate/up and down in bf16 with f32 accumulation,
LoRA in f32, the routing-weighted sum in f32; like the stock HF model, gate and up are
rounded to bf16 before the SiLU.
"""

from __future__ import annotations

import os
import weakref
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F

from ._native import KtrsValueError
from .experts import LORA_NAMES, MoeExperts

#: Rows per expert from which a CUDA inference call streams the weights to the GPU.
ROWS_DEFAULT = 128
#: Bytes of packed weights per copy chunk (two chunks in flight, plus one unpacked).
CHUNK_BYTES = 256 << 20


def rows_threshold() -> int:
    """Rows per expert (tokens × top-k / experts) from which CUDA inference calls run the
    experts on the GPU; ``KTRS_GPU_PREFILL_ROWS`` overrides it, ``0`` turns the path off."""
    v = os.environ.get("KTRS_GPU_PREFILL_ROWS")
    return ROWS_DEFAULT if v is None or v == "" else int(v)


def wanted(experts: MoeExperts, hidden: torch.Tensor, topk_ids: torch.Tensor) -> bool:
    """Whether this call should stream the weights: CUDA input, no autograd, and enough
    rows per expert that the copy costs less than the CPU's GEMMs."""
    limit = rows_threshold()
    if limit <= 0 or not hidden.is_cuda or torch.is_grad_enabled():
        return False
    return topk_ids.numel() >= limit * experts.num_experts


def _unregister(ptrs: List[int], _views) -> None:
    try:
        cudart = torch.cuda.cudart()
        for p in ptrs:
            cudart.cudaHostUnregister(p)
    except Exception:  # interpreter shutdown: the driver may be gone already
        pass


class StreamedExperts:
    """One layer's routed experts computed on a torch device from the packed weights.

    ``forward`` takes tensors on any device (the tests run it on the CPU); on CUDA the
    weights are page-locked on first use and copied chunk by chunk on a side stream.
    """

    def __init__(self, experts: MoeExperts) -> None:
        self.experts = experts
        self.gate_up = experts.packed_weights("gate_up")  # [E, P_gu, H_pad/2, 16, 2]
        self.down = experts.packed_weights("down")  # [E, P_d, I_pad/2, 16, 2]
        self.num_experts = experts.num_experts
        self.hidden_size = experts.hidden_size
        self.intermediate_size = experts.intermediate_size
        self._registered: Optional[bool] = None

    # -- host memory --------------------------------------------------------------------
    def _register(self) -> None:
        """Page-locks the packed weights once (a failure leaves pageable copies, slower)."""
        if self._registered is not None:
            return
        cudart = torch.cuda.cudart()
        ptrs = []
        for t in (self.gate_up, self.down):
            if int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 0)) == 0:
                ptrs.append(t.data_ptr())
        self._registered = len(ptrs) == 2
        weakref.finalize(self, _unregister, ptrs, (self.gate_up, self.down))

    # -- the computation ---------------------------------------------------------------
    @staticmethod
    def _unpack(packed: torch.Tensor) -> torch.Tensor:
        """``[n, P, K/2, 16, 2]`` panels → ``[n, 16·P, K]`` row-major weights."""
        n, p, kh, lanes, two = packed.shape
        return packed.permute(0, 1, 3, 2, 4).reshape(n, p * lanes, kh * two)

    def forward(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        lora: Optional[Sequence[torch.Tensor]] = None,
        scaling: float = 1.0,
    ) -> torch.Tensor:
        """``sum_j w[t, j] · expert_{ids[t, j]}(x[t])`` on ``hidden``'s device, in its dtype.

        ``lora``: the six expert LoRA matrices (:data:`ktrs.experts.LORA_NAMES` order, f32,
        any device) or None.
        """
        dev = hidden.device
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        T, k = topk_ids.shape
        cuda = dev.type == "cuda"
        if cuda:
            self._register()
        flat = topk_ids.reshape(-1)
        if flat.numel() == 0:
            return torch.zeros(T, H, dtype=hidden.dtype, device=dev)
        lo, hi = flat.aminmax()
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= E:
            raise KtrsValueError(f"topk_ids: expert ids must be in [0, {E}), got {lo if lo < 0 else hi}")
        order = torch.argsort(flat, stable=True)
        counts = torch.bincount(flat, minlength=E).tolist()
        tok = order // k
        xs = hidden.to(torch.bfloat16)[tok]
        ys = torch.empty(T * k, H, dtype=torch.float32, device=dev)
        active = [e for e in range(E) if counts[e]]
        starts = {}
        s = 0
        for e in range(E):
            starts[e] = s
            s += counts[e]
        L: Dict[str, torch.Tensor] = {}
        if lora:
            idx = torch.tensor(active, dtype=torch.long)
            L = {n: t.detach()[idx].to(dev, torch.float32, non_blocking=True) for n, t in zip(LORA_NAMES, lora)}
            slot_of = {e: j for j, e in enumerate(active)}
        per_expert = (self.gate_up[0].numel() + self.down[0].numel()) * 2
        chunk = max(1, min(len(active), CHUNK_BYTES // per_expert))
        groups = [active[i:i + chunk] for i in range(0, len(active), chunk)]
        i_pad = self.gate_up.shape[1] * 8  # gate_up rows = 2·I_pad, 16 per panel
        copy_stream = torch.cuda.Stream(dev) if cuda else None
        compute = torch.cuda.current_stream(dev) if cuda else None
        slots: List[Optional[tuple]] = [None, None]
        freed: List[Optional[torch.cuda.Event]] = [None, None]

        def fetch(gi: int):
            """Starts copying group ``gi`` into its slot; returns (gate_up, down, ready)."""
            group, b = groups[gi], gi % 2
            if slots[b] is None or slots[b][0].shape[0] < len(group):
                slots[b] = (
                    torch.empty((len(group),) + tuple(self.gate_up.shape[1:]), dtype=torch.bfloat16, device=dev),
                    torch.empty((len(group),) + tuple(self.down.shape[1:]), dtype=torch.bfloat16, device=dev),
                )
            gu, dn = slots[b]
            if not cuda:
                for j, e in enumerate(group):
                    gu[j].copy_(self.gate_up[e])
                    dn[j].copy_(self.down[e])
                return gu, dn, None
            with torch.cuda.stream(copy_stream):
                if freed[b] is not None:
                    copy_stream.wait_event(freed[b])
                else:
                    copy_stream.wait_stream(compute)  # the slot was allocated on compute
                for j, e in enumerate(group):
                    gu[j].copy_(self.gate_up[e], non_blocking=True)
                    dn[j].copy_(self.down[e], non_blocking=True)
                ready = torch.cuda.Event()
                ready.record(copy_stream)
            return gu, dn, ready

        pending = fetch(0) if groups else None
        for gi, group in enumerate(groups):
            gu, dn, ready = pending
            if gi + 1 < len(groups):
                pending = fetch(gi + 1)
            if ready is not None:
                compute.wait_event(ready)
            w_gu = self._unpack(gu[: len(group)])  # [n, 2·I_pad, H_pad]
            w_dn = self._unpack(dn[: len(group)])  # [n, H_pad, I_pad]
            if cuda:
                done = torch.cuda.Event()
            for j, e in enumerate(group):
                a0, a1 = starts[e], starts[e] + counts[e]
                x = xs[a0:a1]
                h = (x @ w_gu[j, :, :H].T).view(-1, i_pad // 16, 2, 16)
                g = h[:, :, 0].reshape(-1, i_pad)[:, :I].float()
                u = h[:, :, 1].reshape(-1, i_pad)[:, :I].float()
                if L:
                    q, xf = slot_of[e], x.float()
                    g = g + scaling * ((xf @ L["gate_A"][q].T) @ L["gate_B"][q].T)
                    u = u + scaling * ((xf @ L["up_A"][q].T) @ L["up_B"][q].T)
                act = (F.silu(g) * u).to(torch.bfloat16)
                y = (act @ w_dn[j, :H, :I].T).float()
                if L:
                    y = y + scaling * ((act.float() @ L["down_A"][q].T) @ L["down_B"][q].T)
                ys[a0:a1] = y
            if cuda:
                done.record(compute)
                freed[gi % 2] = done
        wts = topk_weights.reshape(-1)[order].to(dev, torch.float32)
        out = torch.zeros(T, H, dtype=torch.float32, device=dev)
        out.index_add_(0, tok, ys * wts[:, None])
        return out.to(hidden.dtype)
