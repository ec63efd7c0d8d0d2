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

import itertools
import os
import warnings
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._native import KtrsValueError
from .experts import LORA_NAMES, MoeExperts, background

#: Rows per expert (on average) from which a CUDA inference call considers the GPU.
ROWS_DEFAULT = 16
#: Bytes of packed weights per copy chunk (two chunks in flight, plus one unpacked).
CHUNK_BYTES = 256 << 20
#: The cost model that splits a call's experts between the GPU and the CPU, from the
#: reference machine (H200 + 16-core Xeon, 2026-12-02): page-locked host-to-device copies
#: 55 GB/s; the CPU experts stream weights at ~100 GB/s and multiply at ~5 TFLOPS (the
#: layer's GEMM phases at T=2048). ``KTRS_GPU_PREFILL_MODEL="pcie_gbps,cpu_gbps,cpu_tflops"``
#: overrides it.
MODEL_DEFAULT = (50.0, 100.0, 5.0)


def rows_threshold() -> int:
    """Rows per expert (tokens × top-k / experts) from which CUDA inference calls may run
    experts on the GPU; ``KTRS_GPU_PREFILL_ROWS`` overrides it, ``0`` turns the path off."""
    v = os.environ.get("KTRS_GPU_PREFILL_ROWS")
    if v is None or v.strip() == "":
        return ROWS_DEFAULT
    try:
        rows = int(v)
    except ValueError:
        rows = -1
    if rows < 0:
        raise KtrsValueError(f"KTRS_GPU_PREFILL_ROWS: expected a whole number >= 0 (0 = off), got {v!r}")
    return rows


def cost_model() -> Tuple[float, float, float]:
    v = os.environ.get("KTRS_GPU_PREFILL_MODEL")
    if not v:
        return MODEL_DEFAULT
    try:
        parts = tuple(float(x) for x in v.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) <= 0:
        raise KtrsValueError(f"KTRS_GPU_PREFILL_MODEL: expected three positive numbers 'pcie_gbps,cpu_gbps,cpu_tflops', got {v!r}")
    return parts  # type: ignore[return-value]


def wanted(experts: MoeExperts, hidden: torch.Tensor, topk_ids: torch.Tensor) -> bool:
    """Whether this call may stream weights: CUDA input, no autograd, and enough rows per
    expert (:func:`rows_threshold`); :func:`split` then decides which experts go."""
    limit = rows_threshold()
    if limit <= 0 or not hidden.is_cuda or torch.is_grad_enabled():
        return False
    return topk_ids.numel() >= limit * experts.num_experts


def split(counts: Sequence[int], expert_bytes: int, flops_per_row: float) -> List[int]:
    """The experts to run on the GPU so that the copy and the CPU's share end together.

    An expert costs the GPU its weights' copy, whatever its rows; the CPU its weights'
    read plus its rows' products (this sum fits the layer's measured forward times
    within 10% at 512 and 2048 tokens). The copy reads the same DRAM, so no split beats
    reading every active expert once at the DRAM rate. The experts with the most rows
    move first, for as long as moving one shortens the call.
    """
    pcie, dram, tflops = cost_model()
    gpu_cost = expert_bytes / (pcie * 1e9)
    cpu_cost = [expert_bytes / (dram * 1e9) + c * flops_per_row / (tflops * 1e12) if c else 0.0 for c in counts]
    floor = sum(1 for c in counts if c) * expert_bytes / (dram * 1e9)
    cpu, gpu = sum(cpu_cost), 0.0
    chosen: List[int] = []
    for e in sorted((e for e, c in enumerate(counts) if c), key=lambda e: -counts[e]):
        if max(gpu + gpu_cost, cpu - cpu_cost[e], floor) >= max(gpu, cpu, floor):
            break
        gpu += gpu_cost
        cpu -= cpu_cost[e]
        chosen.append(e)
    return chosen


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
    def _register(self) -> bool:
        """Page-locks the packed weights once; False if the driver refused (a locked-memory
        limit, say): copies from pageable memory run at a sixth of the rate (9 vs 55 GB/s
        on the reference machine), too slow to beat the CPU, so the caller stays there."""
        if self._registered is None:
            cudart = torch.cuda.cudart()
            ptrs = []
            for t in (self.gate_up, self.down):
                # Portable (flag 1): locked for every CUDA context, whichever GPU the
                # model is on.
                if int(cudart.cudaHostRegister(t.data_ptr(), t.numel() * t.element_size(), 1)) == 0:
                    ptrs.append(t.data_ptr())
            self._registered = len(ptrs) == 2
            weakref.finalize(self, _unregister, ptrs, (self.gate_up, self.down))
            if not self._registered:
                warnings.warn(
                    "ktrs: could not page-lock the expert weights for the GPU prefill "
                    "(cudaHostRegister refused; see `ulimit -l`); long prompts stay on the CPU",
                    stacklevel=3,
                )
        return self._registered

    # -- the computation ---------------------------------------------------------------
    @staticmethod
    def _unpack(packed: torch.Tensor) -> torch.Tensor:
        """``[n, P, K/2, 16, 2]`` panels → ``[n, 16·P, K]`` row-major weights."""
        n, p, kh, lanes, two = packed.shape
        return packed.permute(0, 1, 3, 2, 4).reshape(n, p * lanes, kh * two)

    def __call__(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        lora: Optional[Sequence[torch.Tensor]] = None,
        scaling: float = 1.0,
    ) -> Optional[torch.Tensor]:
        """The whole call with the experts :func:`split` between the devices: the GPU's
        share streamed here while the CPU runs the rest (its kernels release the GIL).
        None when the split gives the GPU nothing (the caller runs the CPU path)."""
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        if hidden.is_cuda and not self._register():
            return None
        counts = self._counts(topk_ids)
        chosen = split(counts, self.expert_bytes, 2.0 * 3 * H * I)
        if not chosen:
            return None
        dev = hidden.device
        on_gpu = torch.zeros(E, dtype=torch.bool, device=dev)
        on_gpu[chosen] = True
        ids = topk_ids.to(torch.int64)
        mask = on_gpu[ids]
        no = torch.full_like(ids, -1)
        cpu_job = None
        if len(chosen) < sum(1 for c in counts if c):
            x = hidden.to("cpu", torch.bfloat16).contiguous()
            i = torch.where(mask, no, ids).cpu()
            w = topk_weights.to("cpu", torch.float32).contiguous()
            cpu_job = background().submit(self.experts.forward, x, i, w, use_lora=bool(lora))
        try:
            # The GPU's rows per expert are known: no second pass over the ids.
            gpu = set(chosen)
            gpu_counts = [c if e in gpu else 0 for e, c in enumerate(counts)]
            out = self._forward(hidden, torch.where(mask, ids, no), topk_weights, lora, scaling, torch.float32, gpu_counts)
        finally:
            cpu_out = cpu_job.result()[0] if cpu_job is not None else None
        if cpu_out is not None:
            out += cpu_out.to(dev).float()
        return out.to(hidden.dtype)

    @property
    def expert_bytes(self) -> int:
        return (self.gate_up[0].numel() + self.down[0].numel()) * 2

    def _counts(self, topk_ids: torch.Tensor, skips_ok: bool = False) -> List[int]:
        """Rows per expert; refuses ids outside ``[0, E)`` (and -1, "no expert", unless
        ``skips_ok``)."""
        E = self.num_experts
        flat = topk_ids.reshape(-1)
        if flat.numel():
            lo, hi = (int(v) for v in flat.aminmax())
            if lo < (-1 if skips_ok else 0) or hi >= E:
                raise KtrsValueError(f"topk_ids: expert ids must be in [0, {E}), got {hi if hi >= E else lo}")
        return torch.bincount(flat[flat >= 0], minlength=E).tolist()

    def forward(
        self,
        hidden: torch.Tensor,
        topk_ids: torch.Tensor,
        topk_weights: torch.Tensor,
        lora: Optional[Sequence[torch.Tensor]] = None,
        scaling: float = 1.0,
        out_dtype: Optional[torch.dtype] = None,
    ) -> torch.Tensor:
        """``sum_j w[t, j] · expert_{ids[t, j]}(x[t])`` on ``hidden``'s device, all
        experts here; ``-1`` ids add nothing. In ``out_dtype`` (default: ``hidden``'s).

        ``lora``: the six expert LoRA matrices (:data:`ktrs.experts.LORA_NAMES` order, f32,
        any device) or None.
        """
        counts = self._counts(topk_ids, skips_ok=True)
        return self._forward(hidden, topk_ids, topk_weights, lora, scaling, out_dtype, counts)

    def _forward(self, hidden, topk_ids, topk_weights, lora, scaling, out_dtype, counts: List[int]) -> torch.Tensor:
        """:meth:`forward` with ``counts``, the checked rows per expert of ``topk_ids``."""
        dev = hidden.device
        if dev.type != "cuda":
            return self._compute(hidden, topk_ids, topk_weights, lora, scaling, out_dtype, counts)
        self._register()  # refused: pageable copies, correct but slow
        with torch.cuda.device(dev):  # streams and events on the input's GPU
            return self._compute(hidden, topk_ids, topk_weights, lora, scaling, out_dtype, counts)

    def _compute(self, hidden, topk_ids, topk_weights, lora, scaling, out_dtype, counts: List[int]) -> torch.Tensor:
        dev = hidden.device
        E, H, I = self.num_experts, self.hidden_size, self.intermediate_size
        T, k = topk_ids.shape
        cuda = dev.type == "cuda"
        # -1 (skipped) sorts last as E; only the first sum(counts) pairs are computed.
        flat = topk_ids.reshape(-1)
        flat = torch.where(flat < 0, torch.full_like(flat, E), flat)
        order = torch.argsort(flat, stable=True)[: sum(counts)]
        tok = order // k
        xs = hidden.to(torch.bfloat16)[tok]
        ys = torch.empty(order.numel(), H, dtype=torch.float32, device=dev)
        active = [e for e in range(E) if counts[e]]
        starts = [0, *itertools.accumulate(counts)]
        L: Dict[str, torch.Tensor] = {}
        if lora:
            idx = torch.tensor(active, dtype=torch.long)
            L = {n: t.detach()[idx].to(dev, torch.float32, non_blocking=True) for n, t in zip(LORA_NAMES, lora)}
            slot_of = {e: j for j, e in enumerate(active)}
        chunk = max(1, min(len(active), CHUNK_BYTES // self.expert_bytes))
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
        wts = topk_weights.reshape(-1).to(dev, torch.float32)[order]
        out = torch.zeros(T, H, dtype=torch.float32, device=dev)
        out.index_add_(0, tok, ys * wts[:, None])
        return out.to(out_dtype or hidden.dtype)

