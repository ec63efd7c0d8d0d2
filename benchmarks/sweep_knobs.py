#!/usr/bin/env python3
"""Sweep ktrs' speed knobs on one MoE layer in one process (the layer is built once).

For every token count and knob setting it times the training forward, the backward and
the inference forward (median of --repeats after a warm-up), checks that the outputs
are the same as with the defaults, and with --profile prints the phase times of the
default setting. Used on the AMX reference machine to choose the knobs' defaults.

    python benchmarks/sweep_knobs.py --tokens 512 2048 \\
        --set KTRS_NB=4,8,16 --set KTRS_AMX_PF=0,2,4
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import ktrs  # noqa: E402
from bench_layer import make_inputs, make_lora, make_weights  # noqa: E402
from ktrs.experts import LORA_NAMES  # noqa: E402


def parse_sets(items: List[str]) -> List[Tuple[str, List[int]]]:
    out = []
    for it in items:
        name, _, vals = it.partition("=")
        out.append((name, [int(v) for v in vals.split(",") if v != ""]))
    return out


class StderrCapture:
    """Collects what native code writes to fd 2 (the Rust phase profile)."""

    def __enter__(self):
        sys.stderr.flush()
        self.tmp = tempfile.TemporaryFile(mode="w+b")
        self.saved = os.dup(2)
        os.dup2(self.tmp.fileno(), 2)
        return self

    def __exit__(self, *exc):
        sys.stderr.flush()
        os.dup2(self.saved, 2)
        os.close(self.saved)
        self.tmp.seek(0)
        self.text = self.tmp.read().decode(errors="replace")
        self.tmp.close()


def time_calls(ex, hidden, ids, weights, grad_out, repeats: int) -> Dict[str, float]:
    fwd, bwd, inf = [], [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        _, h = ex.forward(hidden, ids, weights, save_for_backward=True)
        t1 = time.perf_counter()
        ex.backward(h, grad_out)
        t2 = time.perf_counter()
        del h
        ex.forward(hidden, ids, weights)
        t3 = time.perf_counter()
        if i:  # the first round warms up
            fwd.append(t1 - t0)
            bwd.append(t2 - t1)
            inf.append(t3 - t2)
    med = lambda v: statistics.median(v) * 1e3
    return {"fwd_ms": med(fwd), "bwd_ms": med(bwd), "inf_ms": med(inf)}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def outputs(ex, hidden, ids, weights, grad_out):
    ex.zero_lora_grads()
    out, h = ex.forward(hidden, ids, weights, save_for_backward=True)
    gh, gw = ex.backward(h, grad_out)
    res = [out, gh, gw] + [ex.lora_grad(n).detach().clone() for n in LORA_NAMES]
    ex.zero_lora_grads()
    return res


def profile(ex, hidden, ids, weights, grad_out, repeats: int) -> Dict[str, float]:
    ktrs.set_tuning("KTRS_PROFILE", 1)
    try:
        with StderrCapture() as cap:
            for _ in range(repeats):
                _, h = ex.forward(hidden, ids, weights, save_for_backward=True)
                ex.backward(h, grad_out)
                del h
    finally:
        ktrs.set_tuning("KTRS_PROFILE", None)
    per: Dict[str, List[float]] = defaultdict(list)
    for m in re.finditer(r"ktrs profile: (.+?)\s+([0-9.]+) ms", cap.text):
        per[m.group(1).strip()].append(float(m.group(2)))
    # A phase may run more than once per call (lora B transpose): sum per call.
    return {k: sum(v) / repeats for k, v in per.items()}


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[512, 2048])
    p.add_argument("--set", action="append", default=[], metavar="KNOB=v1,v2",
                   help="values to try for one knob (others stay at their defaults); "
                        "the pseudo-knob 'threads' sets the layer's thread count")
    p.add_argument("--combo", action="append", default=[], metavar="K1=v,K2=v",
                   help="one combined setting to try as well")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--profile", action="store_true", help="phase times of the default setting")
    p.add_argument("--isa", default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--intermediate", type=int, default=1408)
    p.add_argument("--topk", type=int, default=6)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)

    E, H, I, k, r = args.experts, args.hidden, args.intermediate, args.topk, args.rank
    gen = torch.Generator().manual_seed(0)
    gate, up, down = make_weights(E, H, I, gen)
    ex = ktrs.MoeExperts(gate, up, down, lora_rank=r, lora_alpha=2.0 * r, isa=args.isa,
                         threads=args.threads)
    for n, t in make_lora(E, H, I, r, gen).items():
        ex.set_lora_weight(n, t)
    del gate, up, down
    settings: List[Tuple[str, Dict[str, int]]] = [("default", {})]
    for name, vals in parse_sets(args.set):
        settings += [(f"{name}={v}", {name: v}) for v in vals]
    for c in args.combo:
        d = {kk: int(vv) for kk, vv in (x.split("=") for x in c.split(","))}
        settings.append((c, d))
    print(f"isa {ex.isa}, threads {ex.threads}, knobs {ktrs.tuning()}")
    records = []
    for T in args.tokens:
        hidden, ids, weights, grad_out = make_inputs(T, E, H, k, seed=T)
        base = outputs(ex, hidden, ids, weights, grad_out)
        if args.profile:
            prof = profile(ex, hidden, ids, weights, grad_out, args.repeats)
            print(f"T={T} phases (ms per call): " + ", ".join(f"{kk} {v:.2f}" for kk, v in prof.items()))
            records.append({"tokens": T, "profile": prof})
        for label, knobs in settings:
            threads0 = ex.threads
            for kk, v in knobs.items():
                if kk == "threads":
                    ex.threads = v
                else:
                    ktrs.set_tuning(kk, v)
            try:
                t = time_calls(ex, hidden, ids, weights, grad_out, args.repeats)
                # Kernel-choosing knobs (KTRS_AMX_MIN_ROWS) change rounding; the others
                # only summation grouping of grad_topk_weights.
                same = all(rel(a, b) < 1e-5 for a, b in zip(outputs(ex, hidden, ids, weights, grad_out), base))
            finally:
                ex.threads = threads0
                for kk in knobs:
                    if kk != "threads":
                        ktrs.set_tuning(kk, None)
            flops = 2 * T * k * 3 * H * I
            t["fwd_tflops"] = flops / t["fwd_ms"] / 1e9
            t["fb_tflops"] = 2 * flops / (t["fwd_ms"] + t["bwd_ms"]) / 1e9
            rec = {"tokens": T, "setting": label, "same_results": same, **t}
            records.append(rec)
            print(f"T={T:5d} {label:32s} fwd {t['fwd_ms']:8.2f} bwd {t['bwd_ms']:8.2f} "
                  f"inf {t['inf_ms']:8.2f} ms  fwd {t['fwd_tflops']:.2f} f+b {t['fb_tflops']:.2f} TF"
                  f"{'' if same else '  RESULTS DIFFER'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"isa": ex.isa, "threads": ex.threads,
                                               "records": records}, indent=1))
    return 0 if all(r.get("same_results", True) for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
