"""Batch-1 decode of the V2-Lite-shaped model under several settings, in one process
(the model is built once): hand-off (stream channel or host nodes), worker spin time,
thread count, blocking wait, graphs on/off.

    python benchmarks/sweep_decode.py --layers 27 --decode 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_model import build_ktrs, measure_decode, v2_lite_config  # noqa: E402

import ktrs  # noqa: E402

VARIANTS = {
    "default": {},
    "host nodes": {"channel": False},
    "spin 200us": {"spin": 200},
    "spin 1000us": {"spin": 1000},
    "15 threads": {"threads": 15},
    "no graphs": {"graphs": False},
}


def apply(model, threads_default: int, v: dict) -> None:
    for m in model.modules():
        if isinstance(m, ktrs.KtrsExperts):
            m.experts.threads = v.get("threads", threads_default)
    g = model._ktrs_decode
    g.spin_us = v.get("spin", 5000)
    g.wait_blocking = v.get("blocking", True)
    g.enabled = v.get("graphs", True)
    want_channel = v.get("channel", True)
    if bool(g.channel) != want_channel or g.channel is None:
        g.drop()
        g.channel = None if want_channel else False


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--variants", nargs="*", default=list(VARIANTS))
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    model = build_ktrs(v2_lite_config(args.layers), "cuda", None)
    threads = ktrs.info()["default_threads"]
    results = {}
    for name in args.variants:
        apply(model, threads, VARIANTS[name])
        print(f"[{name}]", flush=True)
        g = torch.Generator().manual_seed(1)
        results[name] = measure_decode(model, "cuda", 1, args.decode, g, "decode_tok_s")
    apply(model, threads, {})
    print(f"\n{'setting':<28} {'tok/s':>8}")
    for name, r in results.items():
        print(f"{name:<28} {r['decode_tok_s']:8.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
