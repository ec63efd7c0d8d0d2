"""Whole-model benchmark at DeepSeek-V2-Lite shape (random weights): ktrs (routed experts
on the CPU, the rest on the GPU) against plain HF with everything on the GPU and against
HF with the experts offloaded to the CPU by accelerate. Prefill and decode tokens/s, GPU
and host memory. Writes JSON.

    python benchmarks/bench_model.py                      # 27 layers, prefill 512/2048, decode 32
    python benchmarks/bench_model.py --layers 4 --skip offload
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time
from typing import Dict, List

import torch

import ktrs
from ktrs.hf import _install, _load_rest, find_moe_blocks


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def v2_lite_config(layers: int):
    from transformers import DeepseekV2Config

    return DeepseekV2Config(
        vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
        num_hidden_layers=layers, num_attention_heads=16, num_key_value_heads=16, first_k_dense_replace=1,
        n_routed_experts=64, num_experts_per_tok=6, n_shared_experts=2, kv_lora_rank=512, q_lora_rank=None,
        qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, max_position_embeddings=8192,
        routed_scaling_factor=1.0, topk_method="greedy", n_group=1, topk_group=1, rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )


def build_ktrs(config, device, threads):
    """Meta skeleton; random experts straight into ktrs; random rest on `device`."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    H, I = config.hidden_size, config.moe_intermediate_size
    # A few random sources reused at different experts: values do not affect speed, and
    # every expert still has its own packed copy in Rust memory.
    pool = [(torch.randn(I, H, generator=g) * H**-0.5).bfloat16() for _ in range(4)]
    down = [(torch.randn(H, I, generator=g) * I**-0.5).bfloat16() for _ in range(2)]
    for _, block in find_moe_blocks(model):
        rust = ktrs.MoeExperts.empty(config.n_routed_experts, H, I, threads=threads)
        for x in range(config.n_routed_experts):
            rust.set_expert(x, pool[x % 4], pool[(x + 1) % 4], down[x % 2])
        _install(block, rust)
    state = {}
    for name, p in model.named_parameters():
        if p.is_meta:
            t = torch.ones(p.shape, device=device) if name.endswith("norm.weight") else torch.randn(p.shape, device=device) * 0.02
            state[name] = t.to(torch.float32 if name.endswith("mlp.gate.weight") else torch.bfloat16)
    _load_rest(model, state, torch.device(device))
    model._ktrs_device = torch.device(device)
    ktrs.decode.enable(model)  # what patch_model and from_pretrained do
    return model


def build_hf_gpu(config, device):
    with torch.device(device):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


@torch.no_grad()
def measure(model, device, prefill: List[int], decode: int, repeats: int, batches=(1,), ttft: int = 0) -> Dict:
    res = {}
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    g = torch.Generator().manual_seed(1)
    for T in prefill:
        ids = torch.randint(0, model.config.vocab_size, (1, T), generator=g).to(device)
        model(ids)  # warm-up
        sync()
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(ids)
            sync()
            ts.append(time.perf_counter() - t0)
        ts.sort()
        res[f"prefill_{T}_tok_s"] = T / ts[len(ts) // 2]
        print(f"    prefill T={T}: {res[f'prefill_{T}_tok_s']:.1f} tok/s", flush=True)
    for batch in batches if decode else []:
        key = "decode_tok_s" if batch == 1 else f"decode_b{batch}_tok_s"
        res.update(measure_decode(model, device, batch, decode, g, key))
    if ttft and decode:
        ids = torch.randint(0, model.config.vocab_size, (1, ttft), generator=g).to(device)
        kw = dict(do_sample=False, pad_token_id=0, min_new_tokens=1, max_new_tokens=1)
        model.generate(ids, **kw)
        sync()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        sync()
        res[f"ttft_{ttft}_s"] = time.perf_counter() - t0
        print(f"    time to first token, {ttft}-token prompt: {res[f'ttft_{ttft}_s']:.3f} s", flush=True)
    if device.startswith("cuda"):
        res["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    res["host_rss_gb"] = rss_gb()
    return res


def measure_decode(model, device: str, batch: int, decode: int, g, key: str, **sampling) -> Dict:
    """Decode tok/s (all sequences together) from `generate` at `batch` x 64-token
    prompts: (decode - 1) tokens per sequence over the difference of a `decode`-token and
    a 1-token call, so prefill cancels. For ktrs also where a token's time goes."""
    from ktrs import decode as kdecode

    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    ids = torch.randint(0, model.config.vocab_size, (batch, 64), generator=g).to(device)
    kw = {"do_sample": False, "pad_token_id": 0, "min_new_tokens": decode, "max_new_tokens": decode, **sampling}
    graphs = getattr(model, "_ktrs_decode", None)
    model.generate(ids, **kw)  # warm-up at full length: the timed call reuses its cache and graphs
    sync()
    if graphs is not None:
        graphs.profile = True
        kdecode.reset_stats(model)
        before = kdecode.stats(model)
    t0 = time.perf_counter()
    model.generate(ids, **kw)
    sync()
    t1 = time.perf_counter()
    if graphs is not None:
        after = kdecode.stats(model)
        graphs.profile = False
    model.generate(ids, **{**kw, "min_new_tokens": 1, "max_new_tokens": 1})
    sync()
    t2 = time.perf_counter()
    steps = decode - 1
    step_s = ((t1 - t0) - (t2 - t1)) / steps
    res = {key: batch / step_s}
    line = f"    decode batch {batch}{' (sampling)' if sampling.get('do_sample') else ''}: {res[key]:.2f} tok/s ({step_s * 1e3:.1f} ms/step)"
    if graphs is not None:
        replays = max(after.get("replays", 0), 1)
        expert = (after["host_node_seconds"] - before["host_node_seconds"]) / replays
        graph = after.get("replay_gpu_seconds", float("nan")) / replays
        res[key.replace("tok_s", "breakdown_ms")] = {
            "step": step_s * 1e3, "graph_replay": graph * 1e3, "cpu_experts": expert * 1e3,
            "gpu_and_handoffs": (graph - expert) * 1e3, "outside_graph": (step_s - graph) * 1e3,
            "replays": after.get("replays", 0), "eager_steps": after.get("eager_steps", 0), "captures": after.get("captures", 0),
        }
        b = res[key.replace("tok_s", "breakdown_ms")]
        line += (f"; per step: graph {b['graph_replay']:.1f} ms = CPU experts {b['cpu_experts']:.1f} + GPU and hand-offs "
                 f"{b['gpu_and_handoffs']:.1f}; outside the graph (generate's Python) {b['outside_graph']:.1f}; "
                 f"replays {b['replays']}, eager steps {b['eager_steps']}")
        if after.get("failed"):
            line += f"; GRAPHS FAILED: {after['failed']}"
    print(line, flush=True)
    return res


def measure_adapter_decode(model, device: str, decode: int, peft_get) -> Dict:
    """Decode with an un-merged LoRA adapter (attention + routed experts), greedy and sampling."""
    from peft import LoraConfig

    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "kv_b_proj", "o_proj"],
                     target_parameters=["gate_up_proj", "down_proj"])
    pm = peft_get(model, cfg).eval()
    g = torch.Generator().manual_seed(3)
    res = measure_decode(pm, device, 1, decode, g, "adapter_decode_tok_s")
    res.update(measure_decode(pm, device, 1, decode, g, "adapter_sampling_decode_tok_s", do_sample=True, top_p=0.9, temperature=0.7))
    return res


def measure_long_context_memory(model, device: str, context: int) -> Dict:
    """GPU peak of a generate that fills `context` positions (prompt + 64 new tokens)."""
    g = torch.Generator().manual_seed(4)
    ids = torch.randint(0, model.config.vocab_size, (1, context - 64), generator=g).to(device)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model.generate(ids, do_sample=False, pad_token_id=0, min_new_tokens=64, max_new_tokens=64)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30
    print(f"    GPU peak at {context} context: {peak:.2f} GiB", flush=True)
    return {f"gpu_peak_{context}_ctx_gb": peak}


def measure_sft(model, device: str, seq: int, steps: int, peft_get) -> Dict:
    """LoRA SFT steps (forward, backward, AdamW) at batch 1 × `seq` tokens."""
    from peft import LoraConfig

    cfg = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "kv_b_proj", "o_proj"],
                     target_parameters=["gate_up_proj", "down_proj"])
    pm = peft_get(model, cfg)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=g).to(device)
    ts = []
    for i in range(steps + 1):
        sync()
        t0 = time.perf_counter()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        if i:
            ts.append(time.perf_counter() - t0)
    ts.sort()
    res = {"sft_tok_s": seq / ts[len(ts) // 2], "sft_step_s": ts[len(ts) // 2], "trainable": sum(p.numel() for p in params)}
    if device.startswith("cuda"):
        res["sft_gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    res["sft_host_rss_gb"] = rss_gb()
    print(f"    SFT seq {seq}: {res['sft_tok_s']:.1f} tok/s ({res['sft_step_s']:.2f} s/step), trainable {res['trainable']:,}", flush=True)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=27)
    ap.add_argument("--prefill", type=int, nargs="*", default=[512, 2048])
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="*", default=[1, 4, 16], help="decode batch sizes")
    ap.add_argument("--ttft", type=int, default=2048, help="prompt length for time to first token (0: skip)")
    ap.add_argument("--context", type=int, default=4096, help="GPU peak of ktrs at this context (0: skip)")
    ap.add_argument("--no-adapter", action="store_true", help="skip decode with a LoRA adapter")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip", nargs="*", default=[], choices=["ktrs", "gpu", "offload"])
    ap.add_argument("--offload-decode", type=int, default=4, help="decode tokens for the (slow) offload baseline")
    ap.add_argument("--sft", type=int, default=0, metavar="SEQ", help="also time LoRA SFT steps at this sequence length")
    ap.add_argument("--sft-steps", type=int, default=3)
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_model.json"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = v2_lite_config(args.layers)
    info = ktrs.info()
    print(f"layers {args.layers}, device {device}, ktrs ISA {info['selected_isa']}, threads {args.threads or info['default_threads']}")
    out = {"config": {"layers": args.layers, "device": device, "isa": info["selected_isa"]}, "results": {}}

    if "ktrs" not in args.skip:
        t0 = time.perf_counter()
        model = build_ktrs(config, device, args.threads)
        print(f"[ktrs] built in {time.perf_counter() - t0:.0f} s; host RSS {rss_gb():.1f} GB", flush=True)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        out["results"]["ktrs"] = measure(model, device, args.prefill, args.decode, args.repeats, args.batches, args.ttft)
        if device.startswith("cuda") and args.context:
            out["results"]["ktrs"].update(measure_long_context_memory(model, device, args.context))
        if args.decode and not args.no_adapter and not args.sft:
            out["results"]["ktrs"].update(measure_adapter_decode(model, device, args.decode, ktrs.get_peft_model))
        if args.sft:
            torch.cuda.reset_peak_memory_stats() if device.startswith("cuda") else None
            out["results"]["ktrs"].update(measure_sft(model, device, args.sft, args.sft_steps, ktrs.get_peft_model))
        del model
        gc.collect()
        torch.cuda.empty_cache() if device.startswith("cuda") else None

    if device.startswith("cuda") and not {"gpu", "offload"} <= set(args.skip):
        model = build_hf_gpu(config, device)
        if "gpu" not in args.skip:
            torch.cuda.reset_peak_memory_stats()
            print("[hf, all on GPU]", flush=True)
            out["results"]["hf_gpu"] = measure(model, device, args.prefill, args.decode, args.repeats, args.batches, args.ttft)
            if args.sft and "offload" in args.skip:
                import peft

                torch.cuda.reset_peak_memory_stats()
                out["results"]["hf_gpu"].update(measure_sft(model, device, args.sft, args.sft_steps, peft.get_peft_model))
        if "offload" not in args.skip:
            from accelerate import cpu_offload_with_hook  # noqa: F401  (accelerate present)
            from accelerate.hooks import AlignDevicesHook, add_hook_to_module

            for _, block in find_moe_blocks(model):
                block.experts.to("cpu")
                add_hook_to_module(block.experts, AlignDevicesHook(execution_device=torch.device(device), offload=True, io_same_device=True, weights_map=block.experts.state_dict()))
            gc.collect()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            print("[hf, experts offloaded by accelerate]", flush=True)
            out["results"]["hf_offload"] = measure(model, device, args.prefill[:1], args.offload_decode, 1)
        del model

    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    cols = [("prefill_512_tok_s", "prefill512 tok/s"), ("prefill_2048_tok_s", "prefill2048 tok/s"), ("decode_tok_s", "decode b1 tok/s"),
            ("decode_b4_tok_s", "decode b4"), ("decode_b16_tok_s", "decode b16"), ("adapter_decode_tok_s", "b1 adapter"),
            ("adapter_sampling_decode_tok_s", "b1 adapter+sample"), (f"ttft_{args.ttft}_s", f"TTFT {args.ttft} s"),
            ("gpu_peak_gb", "GPU peak GB"), (f"gpu_peak_{args.context}_ctx_gb", f"GPU GB @{args.context}"), ("host_rss_gb", "host RSS GB"),
            ("sft_tok_s", "SFT tok/s"), ("sft_gpu_peak_gb", "SFT GPU GB")]
    cols = [(k, h) for k, h in cols if any(k in r for r in out["results"].values())]
    print(f"\n{'system':<12} " + " ".join(f"{h:>17}" for _, h in cols))
    for name, r in out["results"].items():
        print(f"{name:<12} " + " ".join(f"{r[k]:17.2f}" if r.get(k) is not None else f"{'-':>17}" for k, _ in cols))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
