"""The ``ktrs`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="ktrs", description="ktrs: MoE routed experts on the CPU, with LoRA")
    sub = parser.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="CPU features, ISA, threads, AMX permission")
    p_info.add_argument("--json", action="store_true", help="print JSON")
    p_inspect = sub.add_parser("inspect", help="NaN/Inf counts and magnitudes per tensor of a PEFT adapter")
    p_inspect.add_argument("adapter_dir")
    p_inspect.add_argument("--json", action="store_true")
    p_demo = sub.add_parser("demo", help="run one DeepSeek-V2-Lite-shaped MoE layer on every ISA, checked and timed")
    p_demo.add_argument("--tokens", type=int, default=64)
    p_demo.add_argument("--rank", type=int, default=8)
    p_demo.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "inspect":
        return _inspect(args.adapter_dir, args.json)
    if args.command == "demo":
        from .demo import run

        return run(tokens=args.tokens, rank=args.rank, threads=args.threads)
    if args.command == "info":
        from .info import format_info, info

        d = info()
        print(json.dumps(d, indent=2) if args.json else format_info(d))
        return 0
    return 2


def _inspect(adapter_dir: str, as_json: bool) -> int:
    import os

    from .tools import inspect_adapter

    if not os.path.exists(os.path.join(adapter_dir, "adapter_model.safetensors")):
        print(f"ktrs inspect: no adapter_model.safetensors in {adapter_dir!r}", file=sys.stderr)
        return 2
    rows = inspect_adapter(adapter_dir)
    if as_json:
        print(json.dumps(rows, indent=2))
    else:
        bad = 0
        for comp in sorted({r["component"] for r in rows}):
            group = [r for r in rows if r["component"] == comp]
            nan, inf = sum(r["nan"] for r in group), sum(r["inf"] for r in group)
            bad += nan + inf
            print(f"{comp}: {len(group)} tensors, {nan} NaN, {inf} Inf, max |x| {max(r['max_abs'] for r in group):.4g}")
            for r in group:
                flag = "  <-- non-finite" if r["nan"] or r["inf"] else ""
                print(f"    {r['tensor']}  {r['shape']}  rms {r['rms']:.4g}  max {r['max_abs']:.4g}  nan {r['nan']}  inf {r['inf']}{flag}")
        print("OK: all finite" if not bad else f"FOUND {bad} non-finite values")
    return 1 if any(r["nan"] or r["inf"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
