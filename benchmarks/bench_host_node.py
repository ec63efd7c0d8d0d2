"""What one MoE layer's hand-off costs inside a decode graph (CUDA only).

A decode step is one CUDA graph in which each MoE layer copies its inputs to pinned host
memory, runs the experts in a host node and copies the result back. This times those
pieces apart, per layer, with experts so small that their compute is negligible: the
copies, the host node, both, and a GPU-only chain of the same length for reference.

    python benchmarks/bench_host_node.py [--layers 26] [--threads 1 16]
"""

from __future__ import annotations

import argparse
import time

import torch

import ktrs
from ktrs import decode


def time_graph(body, layers: int, replays: int, channel) -> float:
    """Microseconds per layer of a graph that runs `body` `layers` times."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), decode._host_nodes(channel):
        body()  # warm-up: makes the staging memory
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with decode._host_nodes(channel), torch.cuda.graph(g):
        for _ in range(layers):
            body()
    g.replay()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(replays):
        g.replay()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / replays / layers * 1e6


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=26)
    ap.add_argument("--replays", type=int, default=50)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 16])
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--topk", type=int, default=6)
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs CUDA")
        return 0
    H, k = args.hidden, args.topk
    rows = []
    channel = decode.new_channel()
    if channel is not None:
        channel.set_active(True)
    for threads, via in [(t, v) for t in args.threads for v in ("host node", "channel")]:
        if via == "channel" and channel is None:
            print("no stream channel on this driver")
            continue
        ch = channel if via == "channel" else None
        module = ktrs.KtrsExperts(ktrs.MoeExperts.empty(8, H, 32, threads=threads))
        h = torch.randn(1, H, device="cuda", dtype=torch.bfloat16)
        ids = torch.randint(0, 8, (1, k), device="cuda")
        w = torch.rand(1, k, device="cuda")

        def full():
            h.add_(decode.experts_on_stream(module, h, ids, w))

        def host_only():
            decode._stages(module)[(1, k, id(ch), True)].native.launch(torch.cuda.current_stream().cuda_stream)

        def copies_only():
            st = decode._stages(module)[(1, k, id(ch), True)]
            st.x.copy_(h, non_blocking=True)
            st.ids.copy_(ids, non_blocking=True)
            st.w.copy_(w, non_blocking=True)
            h.add_(st.out.to("cuda", non_blocking=True))

        def gpu_only():
            h.add_(h * 0.0)

        for name, body in (("copies + hand-off (the decode pattern)", full), ("hand-off only", host_only),
                           ("copies only (3 to host, 1 back)", copies_only), ("GPU ops only", gpu_only)):
            us = time_graph(body, args.layers, args.replays, ch)
            rows.append((threads, via, name, us))
            print(f"threads {threads:2d}  {via:<9}  {name:<40} {us:8.1f} us/layer", flush=True)
        # The same hand-off outside a graph (one layer, synchronised), for comparison.
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with decode._host_nodes(ch):
            for _ in range(args.replays):
                full()
                torch.cuda.synchronize()
        us = (time.perf_counter() - t0) / args.replays * 1e6
        rows.append((threads, via, "eager hand-off + sync", us))
        print(f"threads {threads:2d}  {via:<9}  {'eager, one layer + synchronize':<40} {us:8.1f} us", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
