"""Runs KTransformers' kt-kernel SFT MoE (AMXBF16_SFT) on the same inputs as ktrs, for
the side-by-side numbers in bench_layer.py. Only used when `kt_kernel` is importable
(its wheel is not a dependency of ktrs; see scripts/device_build.sh for carrying a trimmed
copy to the AMX machine)."""

from __future__ import annotations

import sys
import time
import types
from typing import Dict, List

import torch

KT_LORA_ORDER = ("gate_A", "gate_B", "up_A", "up_B", "down_A", "down_B")


def available() -> bool:
    _stub_gguf()
    try:
        from kt_kernel.sft import AMXSFTMoEWrapper  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means "not here"
        print(f"(kt-kernel not importable: {type(exc).__name__}: {exc})")
        return False
    return True


def _stub_gguf() -> None:
    # kt_kernel imports gguf at module level for its GGUF loader, which the SFT path never uses.
    if "gguf" not in sys.modules:
        try:
            import gguf  # noqa: F401
        except ImportError:
            mod, reader = types.ModuleType("gguf"), types.ModuleType("gguf.gguf_reader")
            reader.GGUFReader = object
            mod.gguf_reader = reader
            sys.modules["gguf"], sys.modules["gguf.gguf_reader"] = mod, reader


class KtLayer:
    def __init__(self, gate, up, down, lora: Dict[str, torch.Tensor], k: int, rank: int, alpha: float, threads: int, max_tokens: int):
        from kt_kernel.sft import AMXSFTMoEWrapper

        E, I, H = gate.shape
        self.w = AMXSFTMoEWrapper(
            layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H, moe_intermediate_size=I,
            num_gpu_experts=0, cpuinfer_threads=threads, threadpool_count=1, weight_path="",
            chunked_prefill_size=max_tokens, lora_rank=rank, lora_alpha=alpha, method="AMXBF16_SFT",
        )
        self.w.load_weights_from_tensors(gate.contiguous(), up.contiguous(), down.contiguous(), torch.arange(E, dtype=torch.int64))
        self.lora = [lora[n].to(torch.bfloat16).contiguous() for n in KT_LORA_ORDER]
        self.grads = [torch.zeros_like(t) for t in self.lora]
        self.w.init_lora_weights(*self.lora, *self.grads)

    def run(self, hidden, ids, weights, grad_out, repeats: int) -> Dict:
        fwd: List[float] = []
        bwd: List[float] = []
        out = None
        for i in range(repeats + 1):
            self.w.update_lora_weights()  # once per step, as its own layer does after optimizer steps
            t0 = time.perf_counter()
            out = self.w.forward(hidden, ids, weights, save_for_backward=True)
            t1 = time.perf_counter()
            gx, gw = self.w.backward(grad_out)
            t2 = time.perf_counter()
            if i:
                fwd.append(t1 - t0)
                bwd.append(t2 - t1)
        fwd.sort()
        bwd.sort()
        return {"fwd_ms": fwd[len(fwd) // 2] * 1e3, "bwd_ms": bwd[len(bwd) // 2] * 1e3, "out": out, "grad_hidden": gx}


class KtInferLayer:
    """kt-kernel's BF16 inference MoE (``AMXBF16_MOE`` behind its ``NativeMoEWrapper``, no
    LoRA), driven through the task it submits to its own worker pool, on our tensors."""

    def __init__(self, gate, up, down, k: int, threads: int, max_tokens: int):
        from kt_kernel.utils.amx import NativeMoEWrapper

        E, I, H = gate.shape
        # Its loader reads HF per-expert safetensors; this stands in with the same tensors
        # (gate/up [I, H], down [H, I]), kept alive for as long as the layer.
        self.experts = {
            "gate": [gate[e].contiguous() for e in range(E)],
            "up": [up[e].contiguous() for e in range(E)],
            "down": [down[e].contiguous() for e in range(E)],
        }
        experts = self.experts

        class _Tensors:
            def load_experts(self, base_key, device="cpu"):
                return experts

            def close_all_handles(self):
                pass

        NativeMoEWrapper._native_loader_instance = _Tensors()
        self.w = NativeMoEWrapper(
            layer_idx=0, num_experts=E, num_experts_per_tok=k, hidden_size=H, moe_intermediate_size=I,
            gpu_experts_mask=None, cpuinfer_threads=threads, threadpool_count=1, weight_path="",
            chunked_prefill_size=max_tokens, method="BF16",
        )
        self.w.load_weights(torch.arange(E, dtype=torch.int64))
        self.k, self.E = k, E

    def _call(self, x, ids, w, out) -> None:
        bsz = torch.full((1,), x.shape[0], dtype=torch.int32)
        task = self.w.moe.forward_task(bsz.data_ptr(), self.k, ids.data_ptr(), w.data_ptr(),
                                       x.data_ptr(), out.data_ptr(), False)
        self.w.cpu_infer.submit(task)
        self.w.cpu_infer.sync()

    def run(self, hidden, ids, weights, repeats: int) -> Dict:
        x = hidden.contiguous()
        ids = ids.to(torch.int64).contiguous()
        w = weights.to(torch.float32).contiguous()
        out = torch.zeros_like(x)
        ts: List[float] = []
        for i in range(repeats + 1):
            t0 = time.perf_counter()
            self._call(x, ids, w, out)
            if i:
                ts.append(time.perf_counter() - t0)
        res = {"fwd_ms": sorted(ts)[len(ts) // 2] * 1e3, "out": out.clone(), "cold_ms": None}
        T = x.shape[0]
        if T <= 64:  # fresh routing per call, as bench_layer's `cold` column
            gen = torch.Generator().manual_seed(1234)
            cold: List[float] = []
            for _ in range(max(repeats, 5)):
                fresh = torch.rand(T, self.E, generator=gen).topk(self.k, dim=1).indices.contiguous()
                t0 = time.perf_counter()
                self._call(x, fresh, w, out)
                cold.append(time.perf_counter() - t0)
            res["cold_ms"] = sorted(cold)[len(cold) // 2] * 1e3
        return res
