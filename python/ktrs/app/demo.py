"""The demos: `run_demo` (the README's first command: build, chat, fine-tune, chat again) and
`run` (`ktrs bench`: one MoE layer at DeepSeek-V2-Lite shape, forward and backward with
LoRA on every ISA this machine has, checked against a PyTorch reference and timed)."""

from __future__ import annotations

import time
from typing import Optional

import torch
import torch.nn.functional as F

from ..experts import LORA_NAMES, MoeExperts
from ..info import format_info, info

# DeepSeek-V2-Lite's routed experts: 64 experts, hidden 2048, expert width 1408, top-6.
V2_LITE = dict(experts=64, hidden=2048, intermediate=1408, top_k=6)


def _reference(gate, up, down, lora, scale, x, ids, w, gout):
    """fp32 torch autograd of the same math (independent of ktrs)."""
    x = x.float().requires_grad_(True)
    w = w.clone().requires_grad_(True)
    L = {n: t.clone().requires_grad_(True) for n, t in lora.items()}
    out = torch.zeros_like(x)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        xe = x[tok]
        g = F.linear(xe, gate[e].float()) + scale * (xe @ L["gate_A"][e].T) @ L["gate_B"][e].T
        u = F.linear(xe, up[e].float()) + scale * (xe @ L["up_A"][e].T) @ L["up_B"][e].T
        a = F.silu(g) * u
        y = F.linear(a, down[e].float()) + scale * (a @ L["down_A"][e].T) @ L["down_B"][e].T
        out = out.index_add(0, tok, y * w[tok, slot, None])
    out.backward(gout.float())
    return out.detach(), x.grad, w.grad, {n: L[n].grad for n in L}


def _rel(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def run(tokens: int = 64, rank: int = 8, threads: Optional[int] = None, seed: int = 0) -> int:
    d = info()
    print(format_info(d))
    E, H, I, k = V2_LITE["experts"], V2_LITE["hidden"], V2_LITE["intermediate"], V2_LITE["top_k"]
    print(f"\nOne MoE layer at DeepSeek-V2-Lite shape: E={E} H={H} I={I} top-{k}, LoRA r={rank}, T={tokens} tokens")
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(E, I, H, generator=g) * H**-0.5).bfloat16()
    up = (torch.randn(E, I, H, generator=g) * H**-0.5).bfloat16()
    down = (torch.randn(E, H, I, generator=g) * I**-0.5).bfloat16()
    x = torch.randn(tokens, H, generator=g).bfloat16()
    ids = torch.rand(tokens, E, generator=g).topk(k, dim=1).indices
    w = torch.rand(tokens, k, generator=g) * 0.3 + 0.05
    gout = torch.randn(tokens, H, generator=g).bfloat16()
    ref = None
    lora_b = {}
    flops = 2 * tokens * k * 3 * H * I
    print(f"packing the {E} experts for each ISA, then timing one forward and backward ...", flush=True)
    failures = 0
    for isa in d["available_isas"]:
        ex = MoeExperts(gate, up, down, lora_rank=rank, lora_alpha=2 * rank, isa=isa, threads=threads, seed=seed)
        for n in ("gate_B", "up_B", "down_B"):  # non-zero B so LoRA really contributes
            if n not in lora_b:
                lora_b[n] = torch.randn(ex.lora_shape(n), generator=g) * 0.02
            ex.set_lora_weight(n, lora_b[n])
        if ref is None:
            print("  (computing the fp32 torch reference, forward and backward ...)", flush=True)
            lora = {n: ex.lora_weight(n).clone() for n in LORA_NAMES}
            ref = _reference(gate, up, down, lora, ex.lora_scaling, x, ids, w, gout)
            print(f"{'ISA':<8} {'fwd ms':>9} {'bwd ms':>9} {'fwd TFLOPS':>11} {'max rel err':>12}", flush=True)
        ex.forward(x, ids, w)  # warm-up
        t0 = time.perf_counter()
        out, handle = ex.forward(x, ids, w, save_for_backward=True)
        t1 = time.perf_counter()
        grads = [torch.empty(ex.lora_shape(n)) for n in LORA_NAMES]
        gh, gw = ex.backward(handle, gout, lora_grads=grads)
        t2 = time.perf_counter()
        errs = [_rel(out, ref[0]), _rel(gh, ref[1]), _rel(gw, ref[2])] + [_rel(t, ref[3][n]) for t, n in zip(grads, LORA_NAMES)]
        worst = max(errs)
        ok = worst < 1e-2
        failures += not ok
        print(f"{isa:<8} {(t1 - t0) * 1e3:9.1f} {(t2 - t1) * 1e3:9.1f} {flops / (t1 - t0) / 1e12:11.3f} {worst:12.2e} {'ok' if ok else 'MISMATCH'}", flush=True)
    print("\nforward TFLOPS = 2*T*k*3*H*I / time (base GEMMs; LoRA adds ~1%)")
    print("errors: relative L2 of output, input/routing-weight gradients and all six LoRA gradients vs an fp32 torch reference")
    return 1 if failures else 0


def run_demo(workdir: str = "demo-out", steps: int = 100, device: Optional[str] = None) -> int:
    """The first thing a new user runs: build a small DeepSeek-V2 (tokenizer trained on a
    bundled corpus, random weights, a real checkpoint), ask it questions, fine-tune it with
    ktrs on bundled chat data, save and reload the adapter, ask again."""
    import os

    from .chat import load_chat_model, reply
    from .chat_data import read_jsonl
    from .tiny import DATA, build_checkpoint
    from .train import TrainConfig, resolve_device, train

    device = resolve_device(device)
    d = info()
    print(f"ktrs {d['version']} demo: ISA {d['selected_isa']}, {d['default_threads']} threads, rest of the model on {device}\n")
    ckpt = os.path.join(workdir, "tiny-deepseek-v2")
    if not os.path.exists(os.path.join(ckpt, "config.json")):
        build_checkpoint(ckpt)
    print(f"model: a small DeepSeek-V2 (3 layers, 8 routed experts, top-2) at {ckpt}/")
    data = os.path.join(DATA, "demo_chat.jsonl")
    convs = read_jsonl(data)
    probes = [convs[i] for i in (0, 3, 11)]

    def ask(model, tok, label):
        print(f"--- {label}")
        right = 0
        for c in probes:
            text, _ = reply(model, tok, c[:1], max_new_tokens=24)
            ok = text == c[1]["content"]
            right += ok
            print(f"  Q: {c[0]['content']}\n  A: {text}   {'(correct)' if ok else ''}")
        return right

    model, tok = load_chat_model(ckpt, device=device)
    before = ask(model, tok, "before fine-tuning")
    del model
    adapter = os.path.join(workdir, "adapter")
    print(f"\nfine-tuning with LoRA on {len(convs)} bundled conversations ({steps} steps) ...")
    # The demo owns its workdir: a second run replaces its adapter.
    m = train(TrainConfig(model=ckpt, data=data, output=adapter, steps=steps, device=device, overwrite=True))
    print(f"loss {m['first_loss']:.3f} -> {m['final_loss']:.3f}; adapter, loss_curve.png, metrics.json in {adapter}/")
    model, tok = load_chat_model(ckpt, adapter=adapter, device=device)
    after = ask(model, tok, "after fine-tuning (adapter reloaded from disk)")
    other = m["train_seconds"] - m["cpu_expert_seconds"]
    print(f"\ntraining time {m['train_seconds']:.1f} s: CPU experts (ktrs, {d['selected_isa']}) {m['cpu_expert_seconds']:.1f} s, everything else {other:.1f} s")
    print(f"recalled facts: {before}/{len(probes)} before, {after}/{len(probes)} after")
    print(f"next: ktrs chat --model {ckpt} --adapter {adapter}")
    return 0 if after > before else 1
