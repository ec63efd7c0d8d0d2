"""Where a decode step's time goes with an un-merged LoRA adapter: batch-1 greedy decode
on the ktrs model (DeepSeek-V2-Lite shape by default, `--model` as bench_model's; random
weights) with no adapter, with LoRA on
the attention only, on the routed experts only, and on both; per decode step the wall
time, ktrs's breakdown (graph replay, CPU experts) and the GPU kernel time and launches
by torch's profiler (a 1-token call subtracted, so prefill cancels). Needs CUDA.

    python benchmarks/profile_decode.py --layers 8 --decode 16
    python benchmarks/profile_decode.py --model qwen3-30b-a3b --layers 48 --setups "no adapter" "expert LoRA"
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import time
from typing import Dict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import MODELS, build_ktrs, model_config  # noqa: E402

import ktrs  # noqa: E402
from ktrs.hf import find_moe_blocks  # noqa: E402
from ktrs import decode as kdecode  # noqa: E402

#: Kernels listed per setup (by GPU time per step).
TOP = int(os.environ.get("PROFILE_TOP", "12"))


def _kernels(model, ids, kw) -> Dict[str, list]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        model.generate(ids, **kw)
        torch.cuda.synchronize()
    by_name: Dict[str, list] = collections.defaultdict(lambda: [0.0, 0])
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            by_name[ev.name][0] += ev.device_time
            by_name[ev.name][1] += 1
    return by_name


def per_step(model, ids, decode: int, **sampling) -> Dict:
    """Per decode step: wall ms, ktrs's breakdown, GPU kernel µs and launches, top kernels."""
    kw = {"do_sample": False, "pad_token_id": 0, "min_new_tokens": decode, "max_new_tokens": decode, **sampling}
    one = {**kw, "min_new_tokens": 1, "max_new_tokens": 1}
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    graphs = model._ktrs_decode
    graphs.profile = True
    kdecode.reset_stats(model)
    before = kdecode.stats(model)
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    torch.cuda.synchronize()
    t1 = time.perf_counter()
    after = kdecode.stats(model)
    graphs.profile = False
    model.generate(ids, **one)
    torch.cuda.synchronize()
    t2 = time.perf_counter()
    steps = decode - 1
    step = ((t1 - t0) - (t2 - t1)) / steps
    replays = max(after.get("replayed_steps", after.get("replays", 0)), 1)  # decode steps run by replays
    graph = after.get("replay_gpu_seconds", float("nan")) / replays
    expert = (after["host_node_seconds"] - before["host_node_seconds"]) / replays
    full, short = _kernels(model, ids, kw), _kernels(model, ids, one)
    diff = {k: (v[0] - short.get(k, [0, 0])[0], v[1] - short.get(k, [0, 0])[1]) for k, v in full.items()}
    top = sorted(diff.items(), key=lambda kv: -kv[1][0])[:TOP]
    return {
        "step_ms": step * 1e3, "step_wall_median_ms": after.get("step_wall_median_seconds", float("nan")) * 1e3,
        "step_wall_max_ms": after.get("step_wall_max_seconds", float("nan")) * 1e3, "graph_ms": graph * 1e3, "cpu_experts_ms": expert * 1e3,
        "gpu_and_handoffs_ms": (graph - expert) * 1e3, "outside_graph_ms": (step - graph) * 1e3,
        "replays": after.get("replays", 0), "captures": after.get("captures", 0), "eager_steps": after.get("eager_steps", 0),
        "gpu_kernel_us": sum(v[0] for v in diff.values()) / steps,
        "launches": sum(v[1] for v in diff.values()) / steps,
        "top": [(name[:100], round(us / steps, 1), n / steps) for name, (us, n) in top],
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="v2-lite", help="model shape (bench_model's MODELS)")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--decode", type=int, default=16)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--setups", nargs="*", default=["no adapter", "expert LoRA", "attention LoRA", "both"],
                    choices=["no adapter", "expert LoRA", "attention LoRA", "both"])
    ap.add_argument("--sample", action="store_true", help="also sampling (top_p 0.9, temperature 0.7), as bench_model")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("profile_decode: needs CUDA")
        return 2
    from peft import LoraConfig

    config = model_config(args.model, args.layers)
    model = build_ktrs(config, "cuda", args.threads)
    ids = torch.randint(1, config.vocab_size, (1, 64), generator=torch.Generator().manual_seed(0)).cuda()
    attn = {"target_modules": list(MODELS[args.model]["attention"])}
    both = {**attn, "target_parameters": ["gate_up_proj", "down_proj"]}
    experts = [b.experts for _, b in find_moe_blocks(model)]
    out = {}
    # Expert LoRA alone goes straight to ktrs (PEFT wants a target of its own).
    modes = [("greedy", {})] + ([("sampling", {"do_sample": True, "top_p": 0.9, "temperature": 0.7})] if args.sample else [])
    for name in args.setups:
        m = model
        if name == "expert LoRA":
            for ex in experts:
                ex.enable_lora(8, alpha=16)
        elif name != "no adapter":
            for ex in experts:
                ex.experts.set_lora(0)
            m = ktrs.get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, **(attn if name == "attention LoRA" else both))).eval()
        try:
            results = {mode: per_step(m, ids, args.decode, **kw) for mode, kw in modes}
        except Exception as exc:  # noqa: BLE001 - report and go on to the next setup
            print(f"== {name}: failed: {exc!r}", flush=True)
            continue
        finally:
            if m is not model:
                model = m.unload()  # the bare model again for the next setup
        for mode, res in results.items():
            report(f"{name}, {mode}", res)
            out[f"{name}, {mode}"] = res
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


def report(name: str, res: Dict) -> None:
    print(f"== {name}: step {res['step_ms']:.2f} ms (directly: median {res['step_wall_median_ms']:.2f}, max "
          f"{res['step_wall_max_ms']:.2f}) = graph {res['graph_ms']:.2f} (CPU experts {res['cpu_experts_ms']:.2f}, "
          f"GPU + hand-offs {res['gpu_and_handoffs_ms']:.2f}) + outside {res['outside_graph_ms']:.2f}; GPU kernels "
          f"{res['gpu_kernel_us']:.0f} µs in {res['launches']:.0f} launches; replays {res['replays']}, captures "
          f"{res['captures']}, eager steps {res['eager_steps']}", flush=True)
    for kname, us, n in res["top"]:
        print(f"   {us:9.1f} µs {n:6.1f}x  {kname}")


if __name__ == "__main__":
    raise SystemExit(main())
