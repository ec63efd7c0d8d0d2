"""GPU time per call of ktrs's decode kernels (fused LoRA, fused RMSNorm) against the
stock forwards they replace, at DeepSeek-V2-Lite decode shapes (LoRA on ``kv_b_proj``
over the MLA cache included), with a sweep of launch parameters. Needs CUDA.

    python benchmarks/bench_fused_kernels.py
"""

from __future__ import annotations

import itertools

import torch
from torch import nn


def timed(fn, reps: int = 200) -> float:
    """µs per call, from CUDA events around `reps` calls captured in one graph (as decode
    replays them: launch cost excluded, per-kernel gaps included)."""
    fn()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) * 1e3 / reps


def main() -> int:
    if not torch.cuda.is_available():
        print("bench_fused_kernels: needs CUDA")
        return 2
    from peft import LoraConfig, get_peft_model
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2RMSNorm

    from ktrs import fused_lora, fused_norm

    torch.manual_seed(0)
    # (what, rows, n_in, n_out): q_proj and o_proj of a decode step; kv_b_proj over a
    # 256- and a 4096-position cache
    for what, rows, n_in, n_out in [("q_proj", 1, 2048, 3072), ("o_proj", 1, 2048, 2048),
                                    ("kv_b_proj cache 256", 256, 512, 4096), ("kv_b_proj cache 2048", 2048, 512, 4096),
                                    ("kv_b_proj cache 4096", 4096, 512, 4096)]:
        base = nn.Sequential(nn.Linear(n_in, n_out, bias=False)).to(torch.bfloat16)
        layer = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, target_modules=["0"])).base_model.model[0].cuda()
        x = torch.randn(rows, n_in, device="cuda").to(torch.bfloat16)
        a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
        y = layer.base_layer(x)
        with torch.no_grad():
            peft_us = timed(lambda: layer(x))
            base_us = timed(lambda: layer.base_layer(x))
            line = f"{what:22s} rows {rows:5d}: PEFT {peft_us:6.1f} µs (base GEMM {base_us:5.1f})"
            if rows <= fused_lora.MAX_ROWS:
                saved = fused_lora._BLOCK_N, fused_lora._TILES_MANY_ROWS, fused_lora._WARPS
                tiles = [1] if rows <= fused_lora._FEW_ROWS else [4, 8, 16, 32]
                for bn, w, t in itertools.product([32, 64, 128, 256], [4, 8], tiles):
                    fused_lora._BLOCK_N, fused_lora._WARPS, fused_lora._TILES_MANY_ROWS = bn, w, t
                    us = timed(lambda: fused_lora.lora_add(x, a, b, 2.0, y))
                    line += f"\n    fused N{bn} w{w} tiles {t}: {us:6.1f} µs"
                fused_lora._BLOCK_N, fused_lora._TILES_MANY_ROWS, fused_lora._WARPS = saved
                line += f"\n    fused (defaults): {timed(lambda: fused_lora.lora_add(x, a, b, 2.0, y)):6.1f} µs"
            else:
                line += "  (above MAX_ROWS rows PEFT's forward runs)"
        print(line, flush=True)
    for n in (2048, 512):
        norm = DeepseekV2RMSNorm(n).to(torch.bfloat16).cuda()
        x = torch.randn(1, 1, n, device="cuda").to(torch.bfloat16)
        with torch.no_grad():
            hf = timed(lambda: norm(x))
            fused = timed(lambda: fused_norm.rms_norm(x, norm.weight, norm.variance_epsilon))
        print(f"RMSNorm {n}: HF {hf:5.1f} µs, fused {fused:5.1f} µs", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
