"""Peak host memory of ktrs.from_pretrained against the packed expert bytes.

Writes a DeepSeek-V2-Lite-shaped checkpoint with a few layers (random bf16 weights, real
per-expert key names, 1 GB shards), then loads it in a fresh process and reports the peak
resident memory next to what ktrs must hold (packed experts) and one shard.

    python benchmarks/bench_load.py --layers 4 --dir /tmp/v2lite-4l
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time


def write_checkpoint(path: str, layers: int) -> None:
    import torch
    from transformers import DeepseekV2ForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_model import v2_lite_config

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = DeepseekV2ForCausalLM(v2_lite_config(layers)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="1GB")


def load(path: str) -> None:
    import torch

    import ktrs

    t0 = time.perf_counter()
    model = ktrs.from_pretrained(path, device="cpu", dtype=torch.bfloat16)
    secs = time.perf_counter() - t0
    packed = sum(b.experts.experts.weight_bytes for _, b in ktrs.find_moe_blocks(model))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    shards = [os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")]
    print(json.dumps({"load_s": secs, "peak_rss_gb": peak / 2**30, "packed_experts_gb": packed / 2**30,
                      "largest_shard_gb": max(shards) / 2**30, "checkpoint_gb": sum(shards) / 2**30}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/ktrs-v2lite-ckpt")
    ap.add_argument("--load-only", action="store_true")
    args = ap.parse_args()
    if args.load_only:
        load(args.dir)
        return 0
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        write_checkpoint(args.dir, args.layers)
    r = subprocess.run([sys.executable, __file__, "--load-only", "--dir", args.dir], capture_output=True, text=True, env={**os.environ, "KTRS_NO_PROGRESS": "1"})
    if r.returncode:
        print(r.stderr)
        return r.returncode
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"checkpoint {res['checkpoint_gb']:.2f} GB, largest shard {res['largest_shard_gb']:.2f} GB")
    print(f"packed experts {res['packed_experts_gb']:.2f} GB; peak RSS while loading {res['peak_rss_gb']:.2f} GB "
          f"(includes torch and the non-expert weights); load {res['load_s']:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
