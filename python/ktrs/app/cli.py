"""The ``ktrs`` command line: info, demo, train, chat, bench, inspect, export-merged."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional

from .._native import IsaUnavailableError, KtrsError, KtrsFileNotFoundError, KtrsValueError


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, unless it is None or the help already names one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    from .train import MIN_MAX_LEN, TrainConfig

    d = TrainConfig.__dataclass_fields__
    p = argparse.ArgumentParser(prog="ktrs", description="ktrs: MoE routed experts on the CPU, with LoRA", formatter_class=_Help)
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def cmd(name: str, text: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=text, description=text, formatter_class=_Help)

    s = cmd("info", "CPU features, ISA, threads, AMX permission")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = cmd("demo", "build a small DeepSeek-V2, chat, fine-tune it with ktrs, chat again")
    s.add_argument("--workdir", default="demo-out", help="where the model, adapter and plots go")
    s.add_argument("--steps", type=int, default=100, help="training steps")
    s.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")

    s = cmd("train", "LoRA SFT of a MoE checkpoint (DeepSeek-V2/V3, Qwen2/3-MoE, Mixtral, GLM-4-MoE) on chat JSONL")
    s.add_argument("--config", help="YAML file with any of the options below (keys as the flags spell them, or with _)")
    s.add_argument("--model", help="checkpoint directory (config.json, safetensors, tokenizer)")
    s.add_argument("--data", help='JSONL, one {"messages": [{"role": ..., "content": ...}, ...]} per line; the last message, an assistant reply, is trained')
    s.add_argument("--output", help="directory to write the adapter, loss_curve.png and metrics.json into (new or empty)")
    s.add_argument("--overwrite", action="store_true", default=None, help="write into --output even if it holds files")
    s.add_argument("--steps", type=int, help=f"optimizer steps (default: {d['steps'].default})")
    s.add_argument("--learning-rate", "--lr", dest="learning_rate", type=float, help=f"AdamW learning rate, cosine schedule (default: {d['learning_rate'].default})")
    s.add_argument("--lora-rank", type=int, help=f"LoRA rank r (default: {d['lora_rank'].default})")
    s.add_argument("--lora-alpha", type=float, help=f"LoRA alpha; scale alpha/r (default: {d['lora_alpha'].default})")
    s.add_argument("--batch-size", type=int, help=f"conversations per step (default: {d['batch_size'].default})")
    s.add_argument("--max-len", type=int, help=f"tokens kept per conversation, at least {MIN_MAX_LEN} (default: {d['max_len'].default})")
    s.add_argument("--device", help="cuda or cpu for everything but the routed experts (default: cuda when available)")
    s.add_argument("--gpu-expert-memory", help="GPU memory for routed experts kept on the GPU too, most used first (e.g. 12GiB; default: none)")
    s.add_argument("--seed", type=int, help=f"random seed (default: {d['seed'].default})")

    s = cmd("chat", "chat with a checkpoint (and adapter): REPL, or one shot with --prompt")
    s.add_argument("--model", required=True, help="checkpoint directory")
    s.add_argument("--adapter", help="adapter directory written by `ktrs train` (or any PEFT adapter)")
    s.add_argument("--prompt", help="answer this one message and exit")
    s.add_argument("--max-new-tokens", type=int, default=64, help="longest reply, in tokens")
    s.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    s.add_argument("--gpu-expert-memory", help="GPU memory for routed experts kept on the GPU too (e.g. 12GiB; default: none)")

    s = cmd("bench", "one DeepSeek-V2-Lite-shaped MoE layer on every ISA: checked and timed")
    s.add_argument("--tokens", type=int, default=64, help="tokens T in the batch")
    s.add_argument("--rank", type=int, default=8, help="LoRA rank")
    s.add_argument("--threads", type=int, help="kernel threads (default: KTRS_THREADS, else one per physical core)")

    s = cmd("inspect", "NaN/Inf counts and magnitudes per tensor of a PEFT adapter")
    s.add_argument("adapter_dir", help="adapter directory")
    s.add_argument("--json", action="store_true", help="print JSON")

    s = cmd("export-merged", "merge an adapter into a checkpoint stock transformers loads")
    s.add_argument("--model", required=True, help="checkpoint directory")
    s.add_argument("--adapter", required=True, help="adapter directory")
    s.add_argument("--output", required=True, help="directory for the merged checkpoint (written in the checkpoint's dtype)")
    return p


def _at_least(name: str, value: Optional[int], low: int, high: Optional[int] = None) -> None:
    if value is not None and (value < low or (high is not None and value > high)):
        span = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise KtrsValueError(f"{name} must be {span}, got {value}")


def _check_args(args) -> None:
    """Mistakes found before anything loads (the training options: `TrainConfig.check`)."""
    from .. import MAX_THREADS, _native

    _native.resolve_threads(None)  # a bad KTRS_THREADS
    if args.command == "bench":
        _at_least("--tokens", args.tokens, 1)
        _at_least("--rank", args.rank, 1)
        _at_least("--threads", args.threads, 1, MAX_THREADS)
    elif args.command == "chat":
        _at_least("--max-new-tokens", args.max_new_tokens, 1)
    elif args.command == "demo":
        _at_least("--steps", args.steps, 1)


def main(argv: Optional[List[str]] = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _check_args(args)
        return _run(args)
    except KeyboardInterrupt:
        return 130
    except (KtrsError, FileNotFoundError, ValueError, RuntimeError) as exc:
        # Errors of ktrs and of the libraries it drives, shown as one line; anything
        # else is a bug and keeps its traceback.
        hint = ""
        if isinstance(exc, IsaUnavailableError):
            hint = " (hint: unset KTRS_ISA, or pick one `ktrs info` lists as available)"
        print(f"ktrs {args.command}: error: {exc}{hint}", file=sys.stderr)
        return 2


def _run(args) -> int:
    if args.command == "info":
        from ..info import format_info, info

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

        import os

        over = {k: getattr(args, k) for k in ("model", "data", "output", "steps", "learning_rate", "lora_rank", "lora_alpha", "batch_size", "max_len", "device", "seed", "overwrite", "gpu_expert_memory")}
        cfg = load_config(args.config, over)
        m = train(cfg, progress=not os.environ.get("KTRS_NO_PROGRESS"))
        print(f"trained {m['steps']} steps on {m['device']} (ISA {m['isa']}): loss {m['first_loss']:.3f} -> {m['final_loss']:.3f}")
        print(f"time: {m['train_seconds']:.1f} s, of which CPU experts {m['cpu_expert_seconds']:.1f} s")
        print(f"wrote {os.path.join(os.path.normpath(cfg.output), '')} (adapter, loss_curve.png, metrics.json)")
        return 0
    if args.command == "chat":
        from .chat import load_chat_model, repl, reply

        model, tok = load_chat_model(args.model, args.adapter, args.device, gpu_expert_memory=args.gpu_expert_memory)
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

        model, tok = load_chat_model(args.model, args.adapter, "cpu", dtype=_checkpoint_dtype(args.model))
        ktrs.export_merged(model, args.output)
        tok.save_pretrained(args.output)
        print(f"wrote a merged checkpoint to {args.output}/")
        return 0
    return 2


def _checkpoint_dtype(model_dir: str):
    """The dtype a checkpoint was saved in (config.json), so a merge keeps its size."""
    import os

    import torch

    with open(os.path.join(model_dir, "config.json")) as f:
        cfg = json.load(f)
    name = cfg.get("dtype") or cfg.get("torch_dtype") or "float32"
    return getattr(torch, str(name).replace("torch.", ""), torch.float32)


def _inspect(adapter_dir: str, as_json: bool) -> int:
    import os

    from ..tools import inspect_adapter

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
