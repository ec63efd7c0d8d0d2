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
    return model


def build_hf_gpu(config, device):
    with torch.device(device):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    return model.eval()


@torch.no_grad()
def measure(model, device, prefill: List[int], decode: int, repeats: int) -> Dict:
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
    if decode:
        ids = torch.randint(0, model.config.vocab_size, (1, 64), generator=g).to(device)
        kw = dict(do_sample=False, pad_token_id=0, min_new_tokens=decode, max_new_tokens=decode)
        model.generate(ids, **{**kw, "min_new_tokens": 2, "max_new_tokens": 2})
        sync()
        t0 = time.perf_counter()
        model.generate(ids, **kw)
        sync()
        t1 = time.perf_counter()
        model.generate(ids, **{**kw, "min_new_tokens": 1, "max_new_tokens": 1})
        sync()
        t2 = time.perf_counter()
        res["decode_tok_s"] = (decode - 1) / ((t1 - t0) - (t2 - t1))
        print(f"    decode: {res['decode_tok_s']:.2f} tok/s", flush=True)
    if device.startswith("cuda"):
        res["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    res["host_rss_gb"] = rss_gb()
    return res


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
        out["results"]["ktrs"] = measure(model, device, args.prefill, args.decode, args.repeats)
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
            out["results"]["hf_gpu"] = measure(model, device, args.prefill, args.decode, args.repeats)
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
    heads = ["prefill512 tok/s", "prefill2048 tok/s", "decode tok/s", "GPU peak GB", "host RSS GB", "SFT tok/s", "SFT GPU GB"]
    print(f"\n{'system':<12} " + " ".join(f"{k:>17}" for k in heads))
    for name, r in out["results"].items():
        cells = [r.get("prefill_512_tok_s"), r.get("prefill_2048_tok_s"), r.get("decode_tok_s"), r.get("gpu_peak_gb"), r.get("host_rss_gb"),
                 r.get("sft_tok_s"), r.get("sft_gpu_peak_gb")]
        print(f"{name:<12} " + " ".join(f"{v:17.2f}" if v is not None else f"{'-':>17}" for v in cells))
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
