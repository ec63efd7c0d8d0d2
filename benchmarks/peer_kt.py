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
