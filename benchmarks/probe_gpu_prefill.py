#!/usr/bin/env python3
"""Probe: can a long prefill run the routed experts on the GPU by streaming their weights?

Times, for one DeepSeek-V2-Lite-shaped layer (64 experts, 1.1 GB of bf16 weights): the
host-to-device copy of all weights from pageable memory and from page-locked memory
(cudaHostRegister on existing memory, as ktrs' Rust buffers would be), the registration
itself, and the GPU's expert GEMMs at T tokens. Prints ms per layer.
"""

from __future__ import annotations

import argparse
import time

import torch


def timed(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t)
    ts.sort()
    return ts[len(ts) // 2] * 1e3


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 2048])
    a = ap.parse_args()
    E, H, I, k = a.experts, a.hidden, a.intermediate, a.topk
    n = E * 3 * H * I
    host = torch.empty(n, dtype=torch.bfloat16)
    host.view(torch.int16).random_(-2000, 2000)
    gb = n * 2 / 1e9
    dev = torch.empty(n, dtype=torch.bfloat16, device="cuda")
    ms = timed(lambda: dev.copy_(host, non_blocking=False))
    print(f"pageable H2D   {gb:.2f} GB: {ms:7.2f} ms  {gb / ms * 1e3:6.1f} GB/s")
    cudart = torch.cuda.cudart()
    t = time.perf_counter()
    r = cudart.cudaHostRegister(host.data_ptr(), n * 2, 0)
    reg = (time.perf_counter() - t) * 1e3
    print(f"cudaHostRegister {gb:.2f} GB: {reg:.1f} ms (rc {r}) is_pinned={host.is_pinned()}")
    ms = timed(lambda: dev.copy_(host, non_blocking=True))
    print(f"registered H2D {gb:.2f} GB: {ms:7.2f} ms  {gb / ms * 1e3:6.1f} GB/s")
    # Half the experts: does a partial copy keep the rate?
    half = n // 2
    ms = timed(lambda: dev[:half].copy_(host[:half], non_blocking=True))
    print(f"registered H2D half: {ms:7.2f} ms")
    # Chunked per expert on a side stream, overlapped with compute
    w = dev.view(E, 3, I, H)  # gate, up, down^T-ish (shapes only matter)
    for T in a.tokens:
        x = torch.randn(T, H, device="cuda", dtype=torch.bfloat16)
        ids = torch.randint(0, E, (T, k), device="cuda")
        wts = torch.rand(T, k, device="cuda")

        def experts():
            flat = ids.reshape(-1)
            order = torch.argsort(flat)
            counts = torch.bincount(flat, minlength=E).tolist()
            xs = x[order // k]
            out = torch.empty(T * k, H, device="cuda", dtype=torch.bfloat16)
            s = 0
            for e in range(E):
                c = counts[e]
                if c == 0:
                    continue
                xe = xs[s:s + c]
                g = xe @ w[e, 0].T
                u = xe @ w[e, 1].T
                h = torch.nn.functional.silu(g) * u
                out[s:s + c] = h @ w[e, 2]
                s += c
            y = torch.zeros(T, H, device="cuda", dtype=torch.float32)
            y.index_add_(0, order // k, out.float() * wts.reshape(-1)[order, None])
            return y

        ms = timed(experts)
        print(f"GPU experts T={T:5d}: {ms:7.2f} ms")

        def both():
            s = torch.cuda.Stream()
            with torch.cuda.stream(s):
                dev.copy_(host, non_blocking=True)
            torch.cuda.current_stream().wait_stream(s)
            experts()

        ms = timed(both)
        print(f"copy + GPU experts T={T:5d}: {ms:7.2f} ms")
    cudart.cudaHostUnregister(host.data_ptr())


if __name__ == "__main__":
    main()
