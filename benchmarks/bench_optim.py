"""Optimizer step time for DeepSeek-V2-Lite-sized expert LoRA: torch.optim.AdamW against
ktrs.optim.AdamW (the step in Rust), same threads, same tensors' shapes and values.

Default: 26 MoE layers x 6 LoRA matrices, E=64, H=2048, I=1408, r=8 (138 M f32
parameters, ~2.2 GB per optimizer with gradients and moments). Both optimizers see the
same gradients; their results are compared too.

    python benchmarks/bench_optim.py                     # threads: ktrs' default
    python benchmarks/bench_optim.py --threads 16 --layers 26 --repeats 10
    python benchmarks/bench_optim.py --layers 4 --foreach   # torch's foreach path as well
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

import ktrs


def shapes(E: int, H: int, I: int, r: int):
    # gate_A, gate_B, up_A, up_B, down_A, down_B: A [E, r, in], B [E, out, r]
    return [(E, r, H), (E, I, r), (E, r, H), (E, I, r), (E, r, I), (E, H, r)]


def timed(opt, repeats: int) -> list:
    opt.step()  # state allocation and first touch
    opt.step()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        opt.step()
        out.append(time.perf_counter() - t0)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None, help="default: ktrs' default (KTRS_THREADS or physical cores)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--foreach", action="store_true", help="also time torch AdamW(foreach=True)")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()

    threads = a.threads or ktrs.info()["default_threads"]
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    shp = shapes(a.experts, a.hidden, a.intermediate, a.rank) * a.layers
    base = [torch.randn(s, generator=g) * 0.02 for s in shp]
    grads = [torch.randn(s, generator=g) * 1e-3 for s in shp]
    n = sum(p.numel() for p in base)

    def params():
        ps = [torch.nn.Parameter(p.clone()) for p in base]
        for p, gr in zip(ps, grads):
            p.grad = gr
        return ps

    kw = dict(lr=1e-4, weight_decay=0.01)
    results = {"params": n, "tensors": len(shp), "threads": threads}
    runs = [("torch AdamW (default: for-loop on CPU)", lambda ps: torch.optim.AdamW(ps, **kw))]
    if a.foreach:
        runs.append(("torch AdamW foreach", lambda ps: torch.optim.AdamW(ps, foreach=True, **kw)))
    runs.append(("torch AdamW fused", lambda ps: torch.optim.AdamW(ps, fused=True, **kw)))
    runs.append(("ktrs.optim.AdamW", lambda ps: ktrs.optim.AdamW(ps, threads=threads, **kw)))
    finals = {}
    print(f"{n / 1e6:.1f} M f32 parameters in {len(shp)} tensors, {threads} threads, {a.repeats} timed steps")
    for name, make in runs:
        ps = params()
        ts = timed(make(ps), a.repeats)
        med = statistics.median(ts)
        results[name] = {"median_s": med, "min_s": min(ts), "all_s": ts}
        gbs = n * 4 * 7 / med / 1e9  # p, g, m, v read; p, m, v written
        print(f"  {name:40s} {med * 1e3:8.1f} ms/step (min {min(ts) * 1e3:.1f}; {gbs:.0f} GB/s effective)")
        finals[name] = ps[:6]
        del ps
    ref = finals[runs[0][0]]
    got = finals["ktrs.optim.AdamW"]
    err = max(((p - q).abs().max() / q.abs().max()).item() for p, q in zip(got, ref))
    results["max_rel_diff_vs_torch"] = err
    print(f"  ktrs vs torch after {a.repeats + 2} steps: max relative difference {err:.2e}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
