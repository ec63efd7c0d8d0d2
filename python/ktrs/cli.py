"""The ``ktrs`` command line: info, demo, train, chat, bench, inspect, export-merged."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from ._native import KtrsFileNotFoundError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ktrs", description="ktrs: MoE routed experts on the CPU, with LoRA")
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("info", help="CPU features, ISA, threads, AMX permission")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = sub.add_parser("demo", help="build a small DeepSeek-V2, chat, fine-tune it with ktrs, chat again")
    s.add_argument("--workdir", default="demo-out", help="where the model, adapter and plots go (default: ./demo-out)")
    s.add_argument("--steps", type=int, default=100)
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")

    s = sub.add_parser("train", help="LoRA SFT of a DeepSeek-V2 checkpoint on chat JSONL")
    s.add_argument("--config", help="YAML file with any of the options below")
    s.add_argument("--model", help="checkpoint directory (config.json, safetensors, tokenizer)")
    s.add_argument("--data", help='JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line')
    s.add_argument("--output", help="adapter directory to write")
    s.add_argument("--steps", type=int)
    s.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float)
    s.add_argument("--lora-rank", type=int)
    s.add_argument("--lora-alpha", type=float)
    s.add_argument("--batch-size", type=int)
    s.add_argument("--max-len", type=int)
    s.add_argument("--device")
    s.add_argument("--seed", type=int)

    s = sub.add_parser("chat", help="chat with a checkpoint (and adapter): REPL, or one shot with --prompt")
    s.add_argument("--model", required=True)
    s.add_argument("--adapter")
    s.add_argument("--prompt", help="answer this one message and exit")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--device")

    s = sub.add_parser("bench", help="one DeepSeek-V2-Lite-shaped MoE layer on every ISA: checked and timed")
    s.add_argument("--tokens", type=int, default=64)
    s.add_argument("--rank", type=int, default=8)
    s.add_argument("--threads", type=int)

    s = sub.add_parser("inspect", help="NaN/Inf counts and magnitudes per tensor of a PEFT adapter")
    s.add_argument("adapter_dir")
    s.add_argument("--json", action="store_true")

    s = sub.add_parser("export-merged", help="merge an adapter into a checkpoint stock transformers loads")
    s.add_argument("--model", required=True)
    s.add_argument("--adapter", required=True)
    s.add_argument("--output", required=True)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - shown to the user without a traceback
        from . import KtrsError

        if not isinstance(exc, (FileNotFoundError, ValueError, RuntimeError, KtrsError)):
            raise
        hint = ""
        if type(exc).__name__ == "IsaUnavailableError":
            hint = "\nhint: unset KTRS_ISA (or pick one `ktrs info` lists as available)"
        print(f"ktrs {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "info":
        from .info import format_info, info

        d = info()
        print(json.dumps(d, indent=2) if args.json else format_info(d))
        return 0
    if args.command == "demo":
        from .demo import run_demo

        return run_demo(workdir=args.workdir, steps=args.steps, device=args.device)
    if args.command == "bench":
        from .demo import run

        return run(tokens=args.tokens, rank=args.rank, threads=args.threads)
    if args.command == "train":
        from .train import load_config, train

        over = {k: getattr(args, k) for k in ("model", "data", "output", "steps", "learning_rate", "lora_rank", "lora_alpha", "batch_size", "max_len", "device", "seed")}
        cfg = load_config(args.config, over)
        m = train(cfg)
        print(f"trained {m['steps']} steps on {m['device']} (ISA {m['isa']}): loss {m['first_loss']:.3f} -> {m['final_loss']:.3f}")
        print(f"time: {m['train_seconds']:.1f} s, of which CPU experts {m['cpu_expert_seconds']:.1f} s")
        print(f"wrote {cfg.output}/ (adapter, loss_curve.png, metrics.json)")
        return 0
    if args.command == "chat":
        from .chat import load_chat_model, repl, reply

        model, tok = load_chat_model(args.model, args.adapter, args.device)
        if args.prompt is not None:
            text, speed = reply(model, tok, [{"role": "user", "content": args.prompt}], args.max_new_tokens, stream=True)
            print(f"[{speed:.1f} tok/s]")
            return 0
        repl(model, tok, args.max_new_tokens)
        return 0
    if args.command == "inspect":
        return _inspect(args.adapter_dir, args.json)
    if args.command == "export-merged":
        import ktrs

        from .chat import load_chat_model

        model, tok = load_chat_model(args.model, args.adapter, "cpu")
        ktrs.export_merged(model, args.output)
        tok.save_pretrained(args.output)
        print(f"wrote a merged checkpoint to {args.output}/")
        return 0
    return 2


def _inspect(adapter_dir: str, as_json: bool) -> int:
    import os

    from .tools import inspect_adapter

    if not os.path.exists(os.path.join(adapter_dir, "adapter_model.safetensors")):
        raise KtrsFileNotFoundError(f"no adapter_model.safetensors in {adapter_dir!r}")
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
