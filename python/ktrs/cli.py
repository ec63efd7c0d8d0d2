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
    p_demo = sub.add_parser("demo", help="run one DeepSeek-V2-Lite-shaped MoE layer on every ISA, checked and timed")
    p_demo.add_argument("--tokens", type=int, default=64)
    p_demo.add_argument("--rank", type=int, default=8)
    p_demo.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run

        return run(tokens=args.tokens, rank=args.rank, threads=args.threads)
    if args.command == "info":
        from .info import format_info, info

        d = info()
        print(json.dumps(d, indent=2) if args.json else format_info(d))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
