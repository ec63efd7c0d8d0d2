"""Long expert calls partly on the GPU: the routed experts' packed weights streamed over PCIe.

With many tokens per expert the CPU's tile unit is what a prefill waits for (DeepSeek-V2-Lite,
2048 tokens: ~50 ms per layer) while the GPU idles; copying the layer's weights to the GPU
costs their bytes over the PCIe rate (1.1 GB) and the GPU's GEMMs are nearly free. Past
:func:`rows_threshold` rows per expert (tokens × top-k / experts) the copy wins for some
experts: :func:`split` picks them. Inference calls (no autograd) on CUDA inputs take
``StreamedExperts.__call__``; training calls on the stream path take
:meth:`StreamedExperts.train` (forward and backward, the weights copied in each pass).
Decode and short prompts stay on the CPU. (llama.cpp's "op offload" makes the same trade
for batches ≥ 32.)

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

import collections
import itertools
import os
import time
import warnings
import weakref
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from ._native import KtrsValueError
from .experts import LORA_NAMES, MoeExperts, background
from .resident import ResidentExperts, unpack

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


#: A CPU backward's time over its forward's (the layer's measured ratio at 512–2048 tokens
#: on the reference machine, V2-Lite and Qwen3-30B-A3B shapes: 1.06–1.16).
BACKWARD_FACTOR = 1.1
#: The CPU's share of a training call runs slower than the model's rates say: its experts
#: are the least busy ones, and the copies of both passes read the same DRAM. Fitted on
#: the reference machine (27-layer V2-Lite, LoRA SFT at 2048 tokens, tok/s as the copy
#: rate in the model varied, i.e. this factor as 50/rate): 35 GB/s 1,045; 50 GB/s 992;
#: 70 GB/s 1,140 and 1,114; 85 GB/s 829; 100 GB/s 975 (2026-12-03, first build). Faster
#: CPU kernels (LoRA terms per block) moved it, one host, sequential runs: factor 1.4
#: 1,051, 1.2 1,298, 1.0 1,154 tok/s; with checkpointing 1.4 817, 1.2 855. It is where
#: training starts; :class:`Balance` (opt-in) corrects it for the machine at hand.
TRAINING_CPU_FACTOR = 1.2
#: Test hook: CPU inputs may take the training split (the tests run it without a GPU).
ON_CPU = False


class Balance:
    """The training split's correction, learnt while training: each split forward outside
    activation checkpointing is timed on both devices (CUDA events on the two streams,
    read once they are done, never waited for; on the CPU, the clock), and ``factor``
    (multiplying the CPU's cost in :func:`split`) moves toward the measured ratio of the
    CPU's share time to the GPU's, a damped step per finished call. Calls under
    checkpointing use it but do not move it: a recompute must split as its first pass
    did.

    Opt-in (``KTRS_GPU_SPLIT_LEARN=1``; never with ``KTRS_GPU_PREFILL_MODEL`` set): on the
    reference machine it settled at 0.89 (a CPU factor of 1.25) and that run gave 968
    tok/s at V2-Lite SFT 2048, against 1,140–1,159 with the fitted 1.4 in two earlier
    runs (other hosts of the same type, which differ by 10–30%). Balancing the forward
    alone seems to stop short of the step's optimum, where the CPU's backward weighs more.
    Timing the backward too is the next step."""

    #: Step per finished call (of the log ratio), and the factor's range.
    GAIN = 0.15
    LIMITS = (0.25, 4.0)

    def __init__(self) -> None:
        self.factor = 1.0
        self.calls = 0
        self._spans: "collections.deque" = collections.deque()

    def add(self, cpu_span, gpu_span) -> None:
        """One call's ``(start, end)`` on each side: CUDA events or ``perf_counter`` values."""
        self._spans.append((cpu_span, gpu_span))
        while len(self._spans) > 256:  # never read (no further split call): bounded
            self._spans.popleft()

    def unused(self) -> None:
        """A call that gave the GPU nothing: no measurement either, so a factor that had
        fallen below the model's (a slow GPU, or a passing hiccup) creeps back toward it,
        and the split is tried, and measured, again."""
        self.factor = min(1.0, self.factor * 2 ** self.GAIN) if self.factor < 1.0 else self.factor

    def update(self) -> None:
        """Folds in the calls whose spans are done."""
        lo, hi = self.LIMITS
        while self._spans:
            cpu, gpu = self._spans[0]
            if isinstance(cpu[1], torch.cuda.Event) and not (cpu[1].query() and gpu[1].query()):
                return
            self._spans.popleft()
            c, g = (_span_ms(cpu), _span_ms(gpu))
            if c > 0 and g > 0:
                ratio = min(max(c / g, 0.5), 2.0)
                self.factor = min(max(self.factor * ratio ** self.GAIN, lo), hi)
                self.calls += 1


def learning() -> bool:
    """Whether training calls learn the split's balance (:class:`Balance`)."""
    return os.environ.get("KTRS_GPU_SPLIT_LEARN", "0") == "1" and not os.environ.get("KTRS_GPU_PREFILL_MODEL")


def _span_ms(span) -> float:
    a, b = span
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1e3


#: The process's training-split correction (all layers share it).
BALANCE = Balance()


def _mark(cuda: bool, stream=None):
    if not cuda:
        return time.perf_counter()
    ev = torch.cuda.Event(enable_timing=True)
    ev.record(stream)
    return ev


def wanted(experts: MoeExperts, hidden: torch.Tensor, topk_ids: torch.Tensor, training: bool = False,
           resident: Optional[ResidentExperts] = None) -> bool:
    """Whether this call may run experts on the GPU: no autograd unless ``training`` (the
    stream path's calls, which split fwd and bwd alike), and either experts resident on
    the input's device or a long call that may stream weights (:func:`streams`);
    :func:`split` then decides which experts go."""
    if torch.is_grad_enabled() and not training:
        return False
    if resident is not None and resident.serves(hidden.device):
        return True
    return streams(experts, hidden, topk_ids, training)


def streams(experts: MoeExperts, hidden: torch.Tensor, topk_ids: torch.Tensor, training: bool = False) -> bool:
    """Whether this call may stream weights to the GPU: CUDA input (or the tests' CPU
    hook for training calls) and enough rows per expert (:func:`rows_threshold`)."""
    limit = rows_threshold()
    if limit <= 0 or not (hidden.is_cuda or (ON_CPU and training)):
        return False
    return topk_ids.numel() >= limit * experts.num_experts


def split(counts: Sequence[int], expert_bytes: int, flops_per_row: float, training: bool = False, checkpointed: bool = False,
          resident: Sequence[int] = (), stream: bool = True) -> List[int]:
    """The experts to run on the GPU so that the copy and the CPU's share end together.

    ``resident`` experts (already on the GPU) with rows always go, first; the rest is
    decided among the others, and only if ``stream`` (a call long enough to copy weights).

    An expert costs the GPU its weights' copy, whatever its rows; the CPU its weights'
    read plus its rows' products (this sum fits the layer's measured forward times
    within 10% at 512 and 2048 tokens). The copy reads the same DRAM, so no split beats
    reading every active expert once at the DRAM rate. The experts with the most rows
    move first, for as long as moving one shortens the call. ``training``: the split
    holds for forward and backward, each of which copies the GPU's weights again; the
    CPU's backward costs :data:`BACKWARD_FACTOR` forwards; ``checkpointed``: activation
    checkpointing's recompute copies them a third time (the CPU's recompute reuses its
    first pass).
    """
    on_gpu = [e for e in resident if counts[e]]
    if not stream:
        return on_gpu
    if on_gpu:
        counts = list(counts)
        for e in on_gpu:
            counts[e] = 0
    pcie, dram, tflops = cost_model()
    learnt = BALANCE.factor if learning() else 1.0
    copies, cpu_passes, slower = (3 if checkpointed else 2, 1 + BACKWARD_FACTOR, TRAINING_CPU_FACTOR * learnt) if training else (1, 1, 1.0)
    gpu_cost = copies * expert_bytes / (pcie * 1e9)
    cpu_cost = [slower * cpu_passes * (expert_bytes / (dram * 1e9) + c * flops_per_row / (tflops * 1e12)) if c else 0.0 for c in counts]
    floor = copies * sum(1 for c in counts if c) * expert_bytes / (dram * 1e9)
    cpu, gpu = sum(cpu_cost), 0.0
    chosen: List[int] = on_gpu
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
        #: Experts kept on a GPU (``ktrs.place_experts_on_gpu``): never copied, always there.
        self.resident: Optional[ResidentExperts] = None
        #: (LoRA buffer addresses, whether locked, their finalizer): see `_lora_locked`.
        self._lora_lock: Optional[tuple] = None
        #: The stream the CPU's share of a training call is queued on.
        self._side: Optional[torch.cuda.Stream] = None

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
    _unpack = staticmethod(unpack)

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
        args = self._prepare(hidden, topk_ids, topk_weights)
        if args is None:
            return None
        topk_ids, topk_weights, counts, stream = args
        chosen = split(counts, self.expert_bytes, self.flops_per_row, resident=self._resident_ids(hidden.device), stream=stream)
        if not chosen:
            return None
        cpu_ids, gpu_ids, gpu_counts = self._divide(topk_ids, counts, chosen)
        cpu_job = None
        if len(chosen) < sum(1 for c in counts if c):
            x = hidden.to("cpu", torch.bfloat16).contiguous()
            w = topk_weights.to("cpu", torch.float32).contiguous()
            cpu_job = background().submit(self.experts.forward, x, cpu_ids.cpu(), w, use_lora=bool(lora))
        try:
            # The GPU's rows per expert are known: no second pass over the ids.
            out = self._forward(hidden, gpu_ids, topk_weights, lora, scaling, torch.float32, gpu_counts)
        finally:
            cpu_out = cpu_job.result()[0] if cpu_job is not None else None
        if cpu_out is not None:
            out += cpu_out.to(hidden.device).float()
        return out.to(hidden.dtype)

    def train(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, lora: Sequence[torch.Tensor], scaling: float,
              cpu_call: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor], sink: Callable, guard: bool,
              checkpointed: bool = False) -> Optional[torch.Tensor]:
        """A training call (autograd on) with the experts :func:`split` between the
        devices for forward and backward, or None when the split gives the GPU nothing.

        ``cpu_call(hidden, ids, weights)`` runs the CPU's share (the GPU's experts' ids
        set to -1) as differentiable stream work; on CUDA it is queued on a side stream,
        so its host functions do not hold up the GPU's share on the current one, and
        autograd runs its backward on that stream too. The GPU's backward copies its
        weights again (nothing of them stays on the GPU between the passes) and hands
        its expert-LoRA gradients to ``sink(active, grads, bad)`` (``grads``: None or
        ``{name: [len(active), ...]}`` on the GPU; ``bad``: None, or a GPU flag of a
        non-finite output or gradient when ``guard``), since the stream path's LoRA
        gradients live in the layer's buffers, written by host functions.
        ``checkpointed``: a pass of activation checkpointing (first or recompute; both
        must say so, the split of both must be the same for the recompute to find the
        CPU's first pass).
        """
        args = self._prepare(hidden, topk_ids, topk_weights, training=True)  # waits for the router
        if args is None:
            return None
        topk_ids, topk_weights, counts, stream = args
        learn = stream and not checkpointed and learning()
        if learn:
            BALANCE.update()
        chosen = split(counts, self.expert_bytes, self.flops_per_row, training=True, checkpointed=checkpointed,
                       resident=self._resident_ids(hidden.device), stream=stream)
        if not chosen:
            if learn:
                BALANCE.unused()
            return None
        dev = hidden.device
        cpu_ids, gpu_ids, gpu_counts = self._divide(topk_ids, counts, chosen)
        plan = self._plan(gpu_ids, gpu_counts)
        args = (self, plan, tuple(lora), scaling, sink, guard, hidden, topk_weights)
        cuda = hidden.is_cuda
        if not cuda:
            c0 = _mark(False)
            cpu_out = cpu_call(hidden, cpu_ids, topk_weights)
            c1 = g0 = _mark(False)
            gpu_out = _GpuShareFunction.apply(*args)
            g1 = _mark(False)
        else:
            with torch.cuda.device(dev):
                main = torch.cuda.current_stream()
                if self._side is None:
                    self._side = torch.cuda.Stream(dev)
                side = self._side
                side.wait_stream(main)
                c0 = _mark(True, side)
                with torch.cuda.stream(side):
                    cpu_out = cpu_call(hidden, cpu_ids, topk_weights)
                c1 = _mark(True, side)
                for t in (hidden, cpu_ids, topk_weights):
                    t.record_stream(side)  # made on main, read on side
                g0 = _mark(True, main)
                gpu_out = _GpuShareFunction.apply(*args)
                g1 = _mark(True, main)
                main.wait_stream(side)
                cpu_out.record_stream(main)
        if learn:
            BALANCE.add((c0, c1), (g0, g1))
        return (gpu_out + cpu_out.float()).to(hidden.dtype)

    def _prepare(self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, training: bool = False):
        """``(topk_ids, topk_weights, rows per expert, whether weights may be streamed)`` on
        ``hidden``'s device (the rows are read on the host: this waits for the router), or
        None when nothing can run on the GPU (no resident experts there, and a short call
        or weights that cannot be page-locked). The arguments' shapes and dtypes were
        checked by the caller (``KtrsExperts``, ``experts.check_call``)."""
        # Without resident experts the caller's `wanted` chose this path for streaming.
        stream = streams(self.experts, hidden, topk_ids, training) if self._resident_ids(hidden.device) else True
        if stream and hidden.is_cuda and not self._register():
            stream = False
        if not stream and not self._resident_ids(hidden.device):
            return None
        topk_ids, topk_weights = topk_ids.to(hidden.device), topk_weights.to(hidden.device)
        return topk_ids, topk_weights, self._counts(topk_ids), stream

    def _resident_ids(self, dev: torch.device) -> List[int]:
        """The experts resident on ``dev`` (none where they are on another device)."""
        res = self.resident
        return res.ids if res is not None and res.serves(dev) else []

    def _divide(self, topk_ids: torch.Tensor, counts: List[int], chosen: List[int]) -> Tuple[torch.Tensor, torch.Tensor, List[int]]:
        """The ids of the CPU's and of the GPU's share (the other side's slots -1) and the
        GPU's rows per expert, for the experts ``chosen`` for the GPU."""
        on_gpu = torch.zeros(self.num_experts, dtype=torch.bool, device=topk_ids.device)
        on_gpu[chosen] = True
        ids = topk_ids.to(torch.int64)
        mask = on_gpu[ids]
        no = torch.full_like(ids, -1)
        gpu = set(chosen)
        return torch.where(mask, no, ids), torch.where(mask, ids, no), [c if e in gpu else 0 for e, c in enumerate(counts)]

    @property
    def flops_per_row(self) -> float:
        return 2.0 * 3 * self.hidden_size * self.intermediate_size

    @property
    def expert_bytes(self) -> int:
        return (self.gate_up[0].numel() + self.down[0].numel()) * 2

    def _counts(self, topk_ids: torch.Tensor, skips_ok: bool = False) -> List[int]:
        """Rows per expert; refuses ids outside ``[0, E)`` (and -1, "no expert", unless
        ``skips_ok``)."""
        E = self.num_experts
        flat = topk_ids.reshape(-1)
        if not flat.numel():
            return [0] * E
        # One read on the host (a sync: each training layer pays it) for the range and the
        # rows; slot 0 of the shifted bincount holds the -1s.
        lo_hi = torch.stack(flat.aminmax())
        rows = torch.bincount(flat.clamp(-1, E - 1) + 1, minlength=E + 1)[1:]
        lo, hi, *counts = torch.cat([lo_hi, rows]).tolist()
        if lo < (-1 if skips_ok else 0) or hi >= E:
            raise KtrsValueError(f"topk_ids: expert ids must be in [0, {E}), got {hi if hi >= E else lo}")
        return counts

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
        on = set(self._resident_ids(dev))
        if any(c and e not in on for e, c in enumerate(counts)):
            self._register()  # refused: pageable copies, correct but slow
        with torch.cuda.device(dev):  # streams and events on the input's GPU
            return self._compute(hidden, topk_ids, topk_weights, lora, scaling, out_dtype, counts)

    # -- the computation, shared by inference and training ------------------------------
    def _plan(self, topk_ids: torch.Tensor, counts: List[int]) -> "_Plan":
        """The pairs of ``topk_ids`` whose experts have rows in ``counts``, sorted by
        expert, and the chunks the weights are copied in."""
        E = self.num_experts
        flat = topk_ids.reshape(-1)
        # -1 (skipped) sorts last as E; only the first sum(counts) pairs are computed.
        flat = torch.where(flat < 0, torch.full_like(flat, E), flat)
        order = torch.argsort(flat, stable=True)[: sum(counts)]
        # Resident experts first (no copy to wait for; meanwhile the first copy runs).
        on = set(self._resident_ids(topk_ids.device))
        size = max(1, CHUNK_BYTES // self.expert_bytes)
        active = [e for e in range(E) if counts[e] and e in on]
        streamed = [e for e in range(E) if counts[e] and e not in on]
        groups = _groups(active, size)
        return _Plan(order, topk_ids.shape[1], counts, active + streamed, groups + _groups(streamed, size), len(groups))

    def _chunks(self, plan: "_Plan", dev: torch.device):
        """Yields ``(position of the chunk's first expert in plan.active, gate_up [n, 2·I_pad,
        H_pad], down [n, H_pad, I_pad])`` per chunk: the resident experts' from their GPU
        copy, then the others', each copied while the previous one is used: two slots, a
        slot refilled once the work queued on it before the next chunk was asked for is
        done."""
        cuda = dev.type == "cuda"
        groups = plan.groups[plan.resident_groups:]
        copy_stream = torch.cuda.Stream(dev) if cuda and groups else None
        compute = torch.cuda.current_stream(dev) if cuda else None
        slots: List[Optional[tuple]] = [None, None]
        freed: List[Optional[torch.cuda.Event]] = [None, None]

        def fetch(gi: int):
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
        first = 0
        for group in plan.groups[:plan.resident_groups]:
            res = self.resident
            idx = torch.tensor([res.slots[e] for e in group], dtype=torch.long).to(dev, non_blocking=cuda)
            yield first, res.gate_up.index_select(0, idx), res.down.index_select(0, idx)
            first += len(group)
        for gi, group in enumerate(groups):
            gu, dn, ready = pending
            if gi + 1 < len(groups):
                pending = fetch(gi + 1)
            if ready is not None:
                compute.wait_event(ready)
            n = len(group)
            yield first, self._unpack(gu[:n]), self._unpack(dn[:n])
            first += n
            if cuda:
                done = torch.cuda.Event()
                done.record(compute)
                freed[gi % 2] = done

    def _rows(self, plan: "_Plan", first: int, n: int, dev: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
        """The chunk's pairs padded per expert: ``pairs [n, m]`` (indices into the flat
        ``[T·k]`` slots; a pad row repeats its expert's first pair) and ``valid [n, m]``,
        m the chunk's most rows of one expert."""
        m = max(plan.counts[e] for e in plan.active[first:first + n])
        meta = plan.meta(dev)[:, first:first + n]
        ar = torch.arange(m, device=dev)
        valid = ar[None, :] < meta[1][:, None]
        pos = torch.where(valid, meta[0][:, None] + ar[None, :], meta[0][:, None])
        return plan.order[pos], valid

    def _lora_slices(self, plan: "_Plan", lora, dev: torch.device) -> Dict[str, torch.Tensor]:
        """The active experts' LoRA matrices on ``dev`` in f32 (``plan.active`` order).

        With many active experts on CUDA the whole matrices are copied from page-locked
        Rust memory and gathered on the GPU: the host does no work and never waits.
        Gathering on the host cost a training step's Python thread 6-17 ms per layer on
        the reference machine (a profile of V2-Lite SFT 2048): it runs while the CPU's
        share keeps every core busy, and pageable copies wait for the stream."""
        if not lora:
            return {}
        idx = torch.tensor(plan.active, dtype=torch.long)
        if dev.type == "cuda" and 4 * len(plan.active) >= self.num_experts and self._lora_locked(lora):
            idx = idx.pin_memory().to(dev, non_blocking=True)
            return {n: t.detach().to(dev, non_blocking=True).index_select(0, idx) for n, t in zip(LORA_NAMES, lora)}
        return {n: t.detach()[idx.to(t.device)].to(dev, torch.float32, non_blocking=True) for n, t in zip(LORA_NAMES, lora)}

    def _lora_locked(self, lora: Sequence[torch.Tensor]) -> bool:
        """Page-locks the layer's LoRA matrices (Rust memory, f32) for asynchronous copies,
        once per set of buffers (a new rank or adapter brings new ones: the old are
        unlocked once the GPU is done with them); False where the driver refuses."""
        key = tuple(t.data_ptr() for t in lora)
        if self._lora_lock is not None and self._lora_lock[0] == key:
            return self._lora_lock[1]
        if self._lora_lock is not None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()  # no copy may still read the old buffers
            self._lora_lock[2]()  # unregisters them (once) and lets them go
        cudart = torch.cuda.cudart()
        ptrs, ok = [], True
        for t in lora:
            nbytes = t.numel() * t.element_size()
            # Only whole mappings of their own (Rust maps buffers of >= 1 MiB, page-aligned):
            # a range sharing a page with one registered before is refused by the driver.
            if t.device.type != "cpu" or t.dtype != torch.float32 or not t.is_contiguous() or nbytes < (1 << 20) or t.data_ptr() % 4096:
                ok = False
                break
            if int(cudart.cudaHostRegister(t.data_ptr(), nbytes, 1)) != 0:
                ok = False
                break
            ptrs.append(t.data_ptr())
        views = tuple(t.detach() for t in lora)  # keep the buffers alive while registered
        self._lora_lock = (key, ok, weakref.finalize(self, _unregister, ptrs, views))
        return ok

    def _compute(self, hidden, topk_ids, topk_weights, lora, scaling, out_dtype, counts: List[int]) -> torch.Tensor:
        plan = self._plan(topk_ids, counts)
        out = self._run(plan, hidden, topk_weights, self._lora_slices(plan, lora, hidden.device), scaling)
        return out.to(out_dtype or hidden.dtype)

    def _run(self, plan: "_Plan", hidden: torch.Tensor, topk_weights: torch.Tensor, L: Dict[str, torch.Tensor], scaling: float) -> torch.Tensor:
        """The plan's routing-weighted sum ``[T, H]`` in f32 (no autograd)."""
        dev, k = hidden.device, plan.k
        x = hidden.detach().to(torch.bfloat16)
        wts = topk_weights.detach().reshape(-1).to(dev, torch.float32)
        out = torch.zeros(hidden.shape[0], self.hidden_size, dtype=torch.float32, device=dev)
        with torch.no_grad():
            for first, w_gu, w_dn in self._chunks(plan, dev):
                n = w_gu.shape[0]
                pairs, valid = self._rows(plan, first, n, dev)
                tok = pairs // k
                xs = x[tok] * valid[..., None]  # pad rows zero: their outputs are zero
                y = expert_math(xs, w_gu, w_dn, {a: b[first:first + n] for a, b in L.items()}, scaling, self.hidden_size, self.intermediate_size)
                y *= (wts[pairs] * valid)[..., None]
                out.index_add_(0, tok.reshape(-1), y.reshape(-1, self.hidden_size))
        return out

    def _run_backward(self, plan: "_Plan", hidden, topk_weights, L: Dict[str, torch.Tensor], scaling: float, grad_out, want_lora: bool):
        """Gradients of :meth:`_run`'s output (weights copied again, the forward recomputed
        per chunk): ``(d hidden [T, H] f32, d topk_weights [T·k] f32, d L)`` where
        ``d L`` is None or the LoRA gradients in ``plan.active`` order."""
        dev, k, H = hidden.device, plan.k, self.hidden_size
        x = hidden.detach().to(torch.bfloat16)
        wts = topk_weights.detach().reshape(-1).to(dev, torch.float32)
        gout = grad_out.detach().to(dev, torch.float32)
        gx = torch.zeros(hidden.shape[0], H, dtype=torch.float32, device=dev)
        gw = torch.zeros(wts.shape, dtype=torch.float32, device=dev)
        gL = {a: torch.zeros_like(b) for a, b in L.items()} if want_lora else None
        for first, w_gu, w_dn in self._chunks(plan, dev):
            n = w_gu.shape[0]
            pairs, valid = self._rows(plan, first, n, dev)
            tok = pairs // k
            with torch.no_grad():
                xs = x[tok] * valid[..., None]
                go = gout[tok]
                w = wts[pairs] * valid
                # out[t] += w·y: dy = w·dout, dw = <y, dout> (pad rows: w = 0, y = 0).
                Ls = {a: b[first:first + n] for a, b in L.items()}
                y, dx, dL = expert_math_backward(xs, w_gu, w_dn, Ls, scaling, self.hidden_size, self.intermediate_size, go * w[..., None], want_lora)
                gw.index_add_(0, pairs.reshape(-1), ((y * go).sum(-1) * valid).reshape(-1))
                gx.index_add_(0, tok.reshape(-1), dx.reshape(-1, H))
                if want_lora:
                    for a, g in dL.items():
                        gL[a][first:first + n] = g
        return gx, gw, gL


def expert_math(x: torch.Tensor, w_gu: torch.Tensor, w_dn: torch.Tensor, L: Dict[str, torch.Tensor], scaling: float, H: int, I: int) -> torch.Tensor:
    """``[n, m, H]`` bf16 rows of n experts → their ``[n, m, H]`` f32 outputs, the CPU
    kernels' math (bf16 products, f32 accumulation, LoRA from ``L``'s ``[n, ...]`` f32
    slices when given; like the stock HF model, gate and up are rounded to bf16 before the
    SiLU); differentiable. ``w_gu [n, 2·I_pad, ≥H]`` (gate and up interleaved per 16
    rows), ``w_dn [n, ≥H, ≥I]``."""
    return _expert_forward(x, w_gu, w_dn, L, scaling, H, I)[0]


def _expert_forward(x, w_gu, w_dn, L, s, H, I):
    """:func:`expert_math`'s output and what its hand backward needs: ``(y, (g, u, sg,
    act, xf, xa_g, xa_u, aa_d))`` (the LoRA ones None without ``L``)."""
    n, m, _ = x.shape
    i_pad = w_gu.shape[1] // 2
    h = torch.bmm(x, w_gu[:, :, :H].transpose(1, 2)).view(n, m, i_pad // 16, 2, 16)
    g = h[:, :, :, 0].reshape(n, m, i_pad)[..., :I].float()
    u = h[:, :, :, 1].reshape(n, m, i_pad)[..., :I].float()
    xf = xa_g = xa_u = aa_d = None
    if L:
        xf = x.float()
        xa_g, xa_u = torch.bmm(xf, L["gate_A"].transpose(1, 2)), torch.bmm(xf, L["up_A"].transpose(1, 2))  # [n, m, r]
        g = g + s * torch.bmm(xa_g, L["gate_B"].transpose(1, 2))
        u = u + s * torch.bmm(xa_u, L["up_B"].transpose(1, 2))
    sg = F.silu(g)
    act = (sg * u).to(torch.bfloat16)
    y = torch.bmm(act, w_dn[:, :H, :I].transpose(1, 2)).float()
    if L:
        aa_d = torch.bmm(act.float(), L["down_A"].transpose(1, 2))  # [n, m, r]
        y = y + s * torch.bmm(aa_d, L["down_B"].transpose(1, 2))
    return y, (g, u, sg, act, xf, xa_g, xa_u, aa_d)


def _groups(experts: List[int], size: int) -> List[List[int]]:
    return [experts[i:i + size] for i in range(0, len(experts), size)]


def expert_math_backward(x: torch.Tensor, w_gu: torch.Tensor, w_dn: torch.Tensor, L: Dict[str, torch.Tensor], scaling: float, H: int, I: int,
                         dy: torch.Tensor, want_lora: bool) -> Tuple[torch.Tensor, torch.Tensor, Dict[str, torch.Tensor]]:
    """:func:`expert_math` recomputed and differentiated by hand: ``(y, d x f32, d L)`` for
    the output gradient ``dy [n, m, H]`` f32 (``d L``: the LoRA gradients by name, empty
    unless ``want_lora``). The products of what autograd would do (bf16 GEMMs against the
    weights, f32 LoRA), in about half the launches and with no autograd graph: the GPU
    share's backward runs on the Python thread that drives the GPU."""
    n, m, _ = x.shape
    i_pad = w_gu.shape[1] // 2
    s = scaling
    y, (g, u, sg, act, xf, xa_g, xa_u, aa_d) = _expert_forward(x, w_gu, w_dn, L, s, H, I)
    dL: Dict[str, torch.Tensor] = {}
    d_act = torch.bmm(dy.to(torch.bfloat16), w_dn[:, :H, :I]).float()
    if L:
        dyb = torch.bmm(dy, L["down_B"])  # [n, m, r]
        d_act = d_act + s * torch.bmm(dyb, L["down_A"])
        if want_lora:
            dL["down_B"] = s * torch.bmm(dy.transpose(1, 2), aa_d)
            dL["down_A"] = s * torch.bmm(dyb.transpose(1, 2), act.float())
    sig = torch.sigmoid(g)
    dg = d_act * u * (sig * (1 + g * (1 - sig)))
    du = d_act * sg
    dh = torch.zeros(n, m, i_pad // 16, 2, 16, dtype=torch.bfloat16, device=x.device)
    dh[:, :, :, 0] = F.pad(dg, (0, i_pad - I)).view(n, m, i_pad // 16, 16)
    dh[:, :, :, 1] = F.pad(du, (0, i_pad - I)).view(n, m, i_pad // 16, 16)
    dx = torch.bmm(dh.view(n, m, 2 * i_pad), w_gu[:, :, :H]).float()
    if L:
        dgb, dub = torch.bmm(dg, L["gate_B"]), torch.bmm(du, L["up_B"])  # [n, m, r]
        dx = dx + s * (torch.bmm(dgb, L["gate_A"]) + torch.bmm(dub, L["up_A"]))
        if want_lora:
            dL["gate_B"], dL["up_B"] = s * torch.bmm(dg.transpose(1, 2), xa_g), s * torch.bmm(du.transpose(1, 2), xa_u)
            dL["gate_A"], dL["up_A"] = s * torch.bmm(dgb.transpose(1, 2), xf), s * torch.bmm(dub.transpose(1, 2), xf)
    return y, dx, dL


class _Plan:
    """One call's GPU share: its pairs in expert order and the chunks of its experts."""

    __slots__ = ("order", "k", "counts", "starts", "active", "groups", "resident_groups", "_meta")

    def __init__(self, order: torch.Tensor, k: int, counts: List[int], active: List[int], groups: List[List[int]], resident_groups: int = 0) -> None:
        self.order, self.k, self.counts, self.active, self.groups = order, k, counts, active, groups
        #: The first ``resident_groups`` groups are resident experts (no copy).
        self.resident_groups = resident_groups
        self.starts = [0, *itertools.accumulate(counts)][:-1]
        self._meta: Optional[torch.Tensor] = None

    def meta(self, dev: torch.device) -> torch.Tensor:
        """``[2, len(active)]`` on ``dev``: each active expert's first pair in ``order`` and
        its rows; copied once per plan (forward and backward share it), from pinned memory
        so the copy never makes the host wait."""
        if self._meta is None:
            host = torch.tensor([[self.starts[e] for e in self.active], [self.counts[e] for e in self.active]], dtype=torch.int64)
            cuda = dev.type == "cuda"
            self._meta = (host.pin_memory() if cuda else host).to(dev, non_blocking=cuda)
        return self._meta


class _GpuShareFunction(torch.autograd.Function):
    """The GPU's share of a training call: f32 ``[T, H]``; backward recomputes it chunk by
    chunk from weights copied again (see :meth:`StreamedExperts.train`)."""

    @staticmethod
    def forward(ctx, streamed: StreamedExperts, plan: _Plan, lora, scaling: float, sink, guard: bool, hidden, topk_weights):
        # The LoRA values of this forward, as the CPU's cache keeps its own.
        L = streamed._lora_slices(plan, lora, hidden.device)
        out = streamed._run(plan, hidden, topk_weights, L, scaling)
        ctx.save_for_backward(hidden, topk_weights)
        ctx.args = (streamed, plan, L, scaling, sink, any(p.requires_grad for p in lora))
        ctx.bad = ~torch.isfinite(out).all() if guard else None
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, topk_weights = ctx.saved_tensors
        streamed, plan, L, scaling, sink, want_lora = ctx.args
        gx, gw, gL = streamed._run_backward(plan, hidden, topk_weights, L, scaling, grad_out, want_lora)
        bad = ctx.bad
        if bad is not None:
            for g in (gx, *(gL or {}).values()):
                bad = bad | ~torch.isfinite(g).all()
        sink(plan.active, gL, bad)
        return None, None, None, None, None, None, gx.to(hidden.dtype), gw.view(topk_weights.shape).to(topk_weights.dtype)
