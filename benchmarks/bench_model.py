"""Whole-model benchmark (random weights) at DeepSeek-V2-Lite, Qwen3-30B-A3B or
DeepSeek-V3 shape (--model): ktrs (routed experts on the CPU, the rest on the GPU) against
plain HF with everything on the GPU (skipped, and said so, when the model does not fit;
running out of GPU memory later is recorded) and against HF with the experts offloaded to
the CPU by accelerate. Prefill and decode tokens/s, GPU and host memory; or (--sft) LoRA
SFT steps with and without activation checkpointing: tok/s, step time, CPU expert time and
step/expert, GPU peak, host RSS, and (--profile) where a step's time goes. Writes JSON.

The ktrs model is built on the meta device with its experts packed straight into Rust
memory from a few random sources (host memory: the packed experts once, nothing more);
HF's model is built on the GPU.

    python benchmarks/bench_model.py                      # V2-Lite, 27 layers, prefill 512/2048, decode 32
    python benchmarks/bench_model.py --layers 4 --skip offload
    python benchmarks/bench_model.py --model qwen3-30b-a3b --skip offload   # 48 layers, 54 GiB of experts
    python benchmarks/bench_model.py --model v3 --layers 4 --skip offload   # 1 dense + 3 MoE layers, 63 GiB of experts
    python benchmarks/bench_model.py --sft 512 2048 --profile     # LoRA SFT, checkpointing off and on
    python benchmarks/bench_model.py --sft 64 --tiny --layers 3 --sft-steps 2 --profile   # quick check (any --model)
    python benchmarks/bench_model.py --sft 2048 --accum 4         # gradient accumulation: 4 micro-batches per step
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import time
from typing import Dict, List, Optional

import torch

import ktrs
from ktrs.hf import _install, _load_rest, default_threads, find_moe_blocks


def rss_gb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


#: Whole-model shapes (transformers 5 classes, random weights). `shape`: the real model's
#: sizes; `tiny`: the same structure at toy sizes (--tiny) to check the script in seconds;
#: `layers`: the default --layers (the real count; V3's 61 layers hold 1.3 TB of experts,
#: so 4 there); `dense_layers`: dense first layers (one for both DeepSeeks: the real V3
#: has three, which changes nothing per MoE layer; none with --layers 1); `attention`: the
#: attention projections that get LoRA (with the routed experts) in the adapter-decode and
#: SFT measurements.
MODELS = {
    "v2-lite": dict(
        config="DeepseekV2Config",
        shape=dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
                   num_attention_heads=16, num_key_value_heads=16, n_routed_experts=64, num_experts_per_tok=6,
                   n_shared_experts=2, kv_lora_rank=512, q_lora_rank=None, qk_nope_head_dim=128, qk_rope_head_dim=64,
                   v_head_dim=128, max_position_embeddings=8192, routed_scaling_factor=1.0, topk_method="greedy",
                   n_group=1, topk_group=1),
        tiny=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=16, num_experts_per_tok=4,
                  n_shared_experts=1, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  max_position_embeddings=4096),
        layers=27, dense_layers=1, attention=["q_proj", "kv_b_proj", "o_proj"]),
    "qwen3-30b-a3b": dict(
        config="Qwen3MoeConfig",
        shape=dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                   num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                   norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960,
                   rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
        tiny=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=96,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=64, num_experts=16, num_experts_per_tok=4,
                  max_position_embeddings=4096),
        layers=48, dense_layers=0, attention=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "v3": dict(
        config="DeepseekV3Config",
        shape=dict(vocab_size=129280, hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
                   num_attention_heads=128, num_key_value_heads=128, n_routed_experts=256, num_experts_per_tok=8,
                   n_shared_experts=1, kv_lora_rank=512, q_lora_rank=1536, qk_nope_head_dim=128, qk_rope_head_dim=64,
                   v_head_dim=128, n_group=8, topk_group=4, routed_scaling_factor=2.5, norm_topk_prob=True,
                   max_position_embeddings=163840),
        tiny=dict(vocab_size=1024, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                  num_attention_heads=4, num_key_value_heads=4, n_routed_experts=32, num_experts_per_tok=4,
                  kv_lora_rank=64, q_lora_rank=96, qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32,
                  max_position_embeddings=4096),
        layers=4, dense_layers=1, attention=["q_a_proj", "q_b_proj", "kv_b_proj", "o_proj"]),
}


def model_config(model: str, layers: int, tiny: bool = False, **sizes):
    """`model`'s shape (a MODELS key) with `layers` layers, the tiny variant with `tiny`;
    `sizes` override fields."""
    import transformers

    spec = MODELS[model]
    shape = {**spec["shape"], **(spec["tiny"] if tiny else {}), **sizes}
    if spec["dense_layers"]:
        shape.setdefault("first_k_dense_replace", min(spec["dense_layers"], layers - 1))
    return getattr(transformers, spec["config"])(num_hidden_layers=layers, rms_norm_eps=1e-6, tie_word_embeddings=False, **shape)


def v2_lite_config(layers: int, **sizes):
    """DeepSeek-V2-Lite's shape with `layers` layers; `sizes` override fields."""
    return model_config("v2-lite", layers, **sizes)


def tiny_config(layers: int):
    """A small DeepSeek-V2 (same structure) to check the script end to end in seconds."""
    return model_config("v2-lite", layers, tiny=True)


def meta_model(config):
    """`config`'s model on the meta device (no memory), bf16 but for what HF keeps in fp32."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def model_bytes(config) -> Dict[str, int]:
    """Bytes of `config`'s model as HF holds it (bf16, routers fp32): all of it, and the
    routed experts (what ktrs holds on the host)."""
    model = meta_model(config)
    sizes = {"all": 0, "experts": 0}
    for name, p in model.named_parameters():
        n = p.numel() * p.element_size()
        sizes["all"] += n
        if ".experts." in name:
            sizes["experts"] += n
    return sizes


def mem_available_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def host_shortfall(expert_bytes: int, sft: bool) -> Optional[str]:
    """Why ktrs' packed experts (and for SFT the backward's transposed copies, up to
    KTRS_TRANSPOSED_CACHE_MB, default a quarter of RAM) do not fit in available host
    memory with a few GiB to spare; None if they do."""
    need = expert_bytes
    if sft:
        mb = os.environ.get("KTRS_TRANSPOSED_CACHE_MB")
        budget = int(mb) * 2**20 if mb else os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 4
        need += min(budget, expert_bytes)
    have = mem_available_bytes()
    if have and need + 4 * 2**30 > have:
        what = "experts" + (" and their transposed copies for the backward" if sft else "")
        return f"ktrs needs {need / 2**30:.1f} GiB of host memory for the {what}, {have / 2**30:.1f} GiB is available"
    return None


def gpu_shortfall(model_bytes_all: int) -> Optional[str]:
    """Why HF's whole model does not fit on the GPU (weights + 10% + 4 GiB against the free
    memory); None if it does. What runs out later (SFT activations) is caught as it happens."""
    free, _ = torch.cuda.mem_get_info()
    need = model_bytes_all * 1.1 + 4 * 2**30
    if need > free:
        return f"the whole model needs ~{need / 2**30:.0f} GiB of GPU memory, {free / 2**30:.0f} GiB is free"
    return None


def build_ktrs(config, device, threads):
    """Meta skeleton; random experts straight into ktrs (only the packed copy is ever in
    host memory); random rest on `device`."""
    model = meta_model(config)
    blocks = find_moe_blocks(model)
    if blocks:
        E, two_i, H = blocks[0][1].experts.gate_up_proj.shape
        I = two_i // 2
        # A few random sources reused at different experts: values do not affect speed, and
        # every expert still has its own packed copy in Rust memory.
        g = torch.Generator().manual_seed(0)
        pool = [(torch.randn(I, H, generator=g) * H**-0.5).bfloat16() for _ in range(4)]
        down = [(torch.randn(H, I, generator=g) * I**-0.5).bfloat16() for _ in range(2)]
    threads = default_threads(torch.device(device), threads)  # as patch_model and from_pretrained choose
    for name, block in blocks:
        rust = ktrs.MoeExperts.empty(E, H, I, threads=threads)
        for x in range(E):
            rust.set_expert(x, pool[x % 4], pool[(x + 1) % 4], down[x % 2])
        _install(block, rust, name)
    state = {}
    for name, p in model.named_parameters():
        if p.is_meta:  # norms 1, the rest small random, each in the dtype HF gives it (no fp32 temporaries)
            t = torch.empty(p.shape, dtype=p.dtype, device=device)
            state[name] = t.fill_(1.0) if name.endswith("norm.weight") else t.normal_(0.0, 0.02)
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


class _StepClock:
    """A `generate` streamer that only notes when each token arrives (the prompt first)."""

    def __init__(self) -> None:
        self.times: List[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass

    def median_step(self) -> Optional[float]:
        steps = sorted(b - a for a, b in zip(self.times[1:], self.times[2:]))  # [0]: the prompt
        return steps[len(steps) // 2] if steps else None


def measure_decode(model, device: str, batch: int, decode: int, g, key: str, **sampling) -> Dict:
    """Decode tok/s (all sequences together) from `generate` at `batch` x 64-token
    prompts. Batch 1: the median time between two tokens, from a streamer (HF and ktrs
    alike; one slow step does not move it). Larger batches (streamers take one sequence):
    (decode - 1) tokens per sequence over the difference of a `decode`-token and a 1-token
    call, so prefill cancels — noisier, since the two calls' prefills differ by their
    routing. For ktrs also where a token's time goes."""
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
    clock = _StepClock() if batch == 1 else None
    t0 = time.perf_counter()
    model.generate(ids, **kw, **({"streamer": clock} if clock else {}))
    sync()
    t1 = time.perf_counter()
    if graphs is not None:
        after = kdecode.stats(model)
        graphs.profile = False
    model.generate(ids, **{**kw, "min_new_tokens": 1, "max_new_tokens": 1})
    sync()
    t2 = time.perf_counter()
    steps = decode - 1
    step_diff = ((t1 - t0) - (t2 - t1)) / steps
    step_s = (clock.median_step() if clock else None) or step_diff
    res = {key: batch / step_s, key.replace("tok_s", "step_ms_from_call_difference"): step_diff * 1e3}
    line = f"    decode batch {batch}{' (sampling)' if sampling.get('do_sample') else ''}: {res[key]:.2f} tok/s ({step_s * 1e3:.1f} ms/step)"
    if graphs is not None:
        replays = max(after.get("replayed_steps", after.get("replays", 0)), 1)  # decode steps run by replays
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


def lora_kwargs(attention: List[str]) -> Dict:
    """LoRA r=8 on the `attention` projections (MODELS' `attention`) and the routed experts:
    the adapter of the adapter-decode and SFT measurements."""
    return dict(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(attention), target_parameters=["gate_up_proj", "down_proj"])


def measure_adapter_decode(model, device: str, decode: int, peft_get, lora: Dict) -> Dict:
    """Decode with an un-merged LoRA adapter (`lora`: attention + routed experts), greedy and sampling."""
    from peft import LoraConfig

    pm = peft_get(model, LoraConfig(**lora)).eval()
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


def oom_message(exc: BaseException) -> str:
    return str(exc).split("\n")[0][:200]


def free_gpu() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def measure_sft(pm, device: str, seqs: List[int], steps: int, ckpts: List[bool], reentrant: bool, profile: bool, accum: int = 1) -> Dict:
    """LoRA SFT steps (forward, backward, AdamW) at batch 1 × each of `seqs` tokens, with
    and without activation checkpointing, on a PEFT model `pm` (ktrs or stock); with
    `accum` > 1, each optimizer step accumulates the gradients of `accum` micro-batches
    (forward and backward each) and tok/s counts all of them. Per configuration: tok/s and
    step time (medians of `steps` warm steps), the CPU expert time in those steps and
    step/expert, expert forwards per step, GPU peak, host RSS; with `profile`, where a
    step's time goes (the profiled forward+backward is one micro-batch)."""
    from ktrs.module import Timer

    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    is_ktrs = any(isinstance(m, ktrs.KtrsExperts) for m in pm.modules())
    # ktrs: the expert-LoRA step in Rust (GPU LoRA on torch's AdamW); stock: torch's AdamW.
    opt = ktrs.optim.AdamW(params, lr=1e-4) if is_ktrs else torch.optim.AdamW(params, lr=1e-4)
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    timer = Timer.global_()
    g = torch.Generator().manual_seed(2)
    res: Dict = {}
    for seq in seqs:
        micro = [torch.randint(0, pm.config.vocab_size, (1, seq), generator=g).to(device) for _ in range(accum)]
        ids = micro[0]
        for ckpt in ckpts:
            if ckpt:
                pm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
            else:
                pm.gradient_checkpointing_disable()
            if cuda:
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()
            timer.per_layer = profile
            key = f"{seq}_{'ckpt' if ckpt else 'no_ckpt'}" + (f"_accum{accum}" if accum > 1 else "")
            try:
                step_s, fwd_s, bwd_s, opt_s, snap = sft_steps(pm, micro, steps, opt, sync, timer, profile)
                prof = step_profile(pm, ids, opt, sync, step_s, fwd_s, bwd_s, opt_s, snap, cuda) if profile else None
            except torch.OutOfMemoryError as exc:  # e.g. HF's whole model on the GPU without checkpointing
                res[key] = {"oom": oom_message(exc)}
            if "oom" in res.get(key, {}):  # outside the except: its traceback held the activations
                timer.per_layer = False
                opt.zero_grad(set_to_none=True)
                free_gpu()
                print(f"    SFT seq {seq}, checkpointing {'on ' if ckpt else 'off'}: OUT OF GPU MEMORY ({res[key]['oom']})", flush=True)
                continue
            r = {"tok_s": seq * accum / step_s, "step_s": step_s, "accum": accum, "host_rss_gb": rss_gb()}
            if is_ktrs:
                r.update(expert_forwards_per_step=snap["forwards"], expert_backwards_per_step=snap["backwards"],
                         expert_recomputes_reused=snap["reused"], expert_s=snap["seconds"])
                r["step_per_expert"] = step_s / snap["seconds"] if snap["seconds"] else float("nan")
                from ktrs import gpu_experts

                # The training split's CPU cost factor as learnt so far (ktrs.gpu_experts.Balance).
                r["split_cpu_factor"] = gpu_experts.TRAINING_CPU_FACTOR * gpu_experts.BALANCE.factor
                r["split_calls_learnt"] = gpu_experts.BALANCE.calls
            if cuda:
                r["gpu_peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
            if profile:
                r["profile"] = prof
            res[key] = r
            line = f"    SFT seq {seq}{f' x{accum} micro-batches' if accum > 1 else ''}, checkpointing {'on ' if ckpt else 'off'}: {r['tok_s']:.1f} tok/s ({step_s:.3f} s/step"
            if is_ktrs:
                line += f"; CPU experts {r['expert_s']:.3f} s, step/expert {r['step_per_expert']:.2f}; expert fwd/bwd/reused per step {snap['forwards']}/{snap['backwards']}/{snap['reused']}"
                if r["split_calls_learnt"]:
                    line += f"; split CPU factor {r['split_cpu_factor']:.2f} after {r['split_calls_learnt']} calls"
            line += ")" + (f", GPU peak {r['gpu_peak_gb']:.2f} GiB" if cuda else "") + f", host RSS {r['host_rss_gb']:.1f} GB"
            print(line, flush=True)
            if profile:
                print_profile(r["profile"])
    pm.gradient_checkpointing_disable()
    res["trainable"] = sum(p.numel() for p in params)
    return res


def sft_steps(pm, micro: List[torch.Tensor], steps: int, opt, sync, timer, profile: bool):
    """`steps` timed optimizer steps after one warm-up, each over the micro-batches `micro`:
    the median step's (step, forward, backward, optimizer) seconds and expert-timer snapshot."""
    accum = len(micro)
    rows = []
    for i in range(steps + 1):  # the first step warms up
        timer.reset()
        sync()
        t0 = time.perf_counter()
        fwd_t = bwd_t = 0.0
        for mb in micro:
            ta = time.perf_counter()
            loss = pm(input_ids=mb, labels=mb).loss / accum
            if profile:
                sync()
            tb = time.perf_counter()
            loss.backward()
            del loss
            if profile:  # boundaries only when profiling: syncs there cost overlap
                sync()
            tc = time.perf_counter()
            fwd_t, bwd_t = fwd_t + (tb - ta), bwd_t + (tc - tb)
        t1, t2 = t0 + fwd_t, time.perf_counter()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if i:
            rows.append((t3 - t0, t1 - t0, t2 - t1, t3 - t2, timer.snapshot()))
    timer.per_layer = False
    rows.sort(key=lambda r: r[0])
    return rows[len(rows) // 2]


def step_profile(pm, ids, opt, sync, step_s, fwd_s, bwd_s, opt_s, snap, cuda) -> Dict:
    """Where a step's time goes, in ms. From the median timed step (synchronised at the
    forward/backward/optimizer boundaries; the ktrs Timer's per-layer figures): forward,
    backward, optimizer, CPU experts per layer, copies/waits, and `gpu_and_python`, the
    forward and backward less the experts and copies. One more forward+backward under
    torch.profiler splits that rest (`profiled`): the GPU kernels' busy time (CUDA) or
    torch's CPU op time (CPU), and what is neither (`python`: the interpreter, launches,
    an idle GPU, the profiler's own overhead, so an upper bound). ``KTRS_TRACE=path``
    also writes that forward+backward as a Chrome trace and prints the top ops."""
    from ktrs.module import Timer
    from torch.profiler import ProfilerActivity, profile

    ms = 1e3
    layers = {n: {"forward": v["forward_s"] * ms, "backward": v["backward_s"] * ms, "forwards": v["forwards"],
                  "backwards": v["backwards"], "reused": v["reused"], "copies": v["copy_s"] * ms} for n, v in snap["layers"].items()}
    out = {"step": step_s * ms, "forward": fwd_s * ms, "backward": bwd_s * ms, "optimizer": opt_s * ms,
           "expert_forward": snap["forward_seconds"] * ms, "expert_backward": snap["backward_seconds"] * ms,
           "copies_waits": snap["copy_seconds"] * ms,
           "gpu_and_python": (fwd_s + bwd_s - snap["seconds"] - snap["copy_seconds"]) * ms, "layers": layers}
    timer = Timer.global_()
    timer.reset()
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=acts) as prof:
        sync()
        t0 = time.perf_counter()
        loss = pm(input_ids=ids, labels=ids).loss
        loss.backward()
        del loss
        sync()
        wall = time.perf_counter() - t0
    opt.step()
    opt.zero_grad(set_to_none=True)
    rest = (wall - timer.seconds - timer.copy_seconds) * ms
    prof_out = {"forward_backward": wall * ms, "experts": timer.seconds * ms, "copies_waits": timer.copy_seconds * ms, "rest": rest}
    if cuda:
        busy = sum(e.device_time_total for e in prof.events()
                   if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith(("Memcpy", "Memset"))) / 1e3
        prof_out["gpu_kernels"] = busy
        prof_out["python"] = rest - busy
    else:
        ops = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key.startswith("aten::")) / 1e3
        prof_out["torch_cpu_ops"] = ops
        prof_out["python"] = rest - ops
    out["profiled"] = prof_out
    trace = os.environ.get("KTRS_TRACE")
    if trace:  # the profiled forward+backward as a Chrome trace, and the top ops
        prof.export_chrome_trace(trace)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=25), flush=True)
    return out


def print_profile(p: Dict) -> None:
    q = p["profiled"]
    part = "gpu_kernels" if "gpu_kernels" in q else "torch_cpu_ops"
    print(f"      step {p['step']:.1f} ms = forward {p['forward']:.1f} + backward {p['backward']:.1f} + optimizer {p['optimizer']:.1f}; "
          f"CPU experts forward {p['expert_forward']:.1f} + backward {p['expert_backward']:.1f}, copies/waits {p['copies_waits']:.1f}, "
          f"GPU part and Python {p['gpu_and_python']:.1f}", flush=True)
    print(f"      profiled forward+backward {q['forward_backward']:.1f} ms: experts {q['experts']:.1f}, copies/waits {q['copies_waits']:.1f}, "
          f"{part.replace('_', ' ')} {q[part]:.1f}, Python and idle {q['python']:.1f}", flush=True)
    for name, v in p["layers"].items():
        print(f"      {name}: expert forward {v['forward']:.1f} ms ({v['forwards']} run, {v['reused']} reused), "
              f"backward {v['backward']:.1f} ms, copies {v['copies']:.1f} ms", flush=True)


def print_sft_table(results: Dict) -> None:
    cols = [("tok_s", "tok/s"), ("step_s", "step s"), ("expert_s", "CPU expert s"), ("step_per_expert", "step/expert"),
            ("expert_forwards_per_step", "expert fwd/step"), ("gpu_peak_gb", "GPU peak GiB"), ("host_rss_gb", "host RSS GB")]
    print(f"\n{'SFT':<16} {'config':<20} " + " ".join(f"{h:>15}" for _, h in cols))
    for name, r in results.items():
        rows = [(name, k, v) for k, v in r.get("sft", {}).items()]
        rows += [(f"{name} CPU only", k, v) for k, v in r.get("sft_cpu_only", {}).items()]
        for label, key, v in rows:
            if isinstance(v, dict) and "oom" in v:
                print(f"{label:<16} {key:<20} out of GPU memory")
            elif isinstance(v, dict):
                print(f"{label:<16} {key:<20} " + " ".join(f"{v[k]:15.3f}" if v.get(k) is not None else f"{'-':>15}" for k, _ in cols))


def run_hf(config, device: str, args, sft: Optional[List[int]], ckpts: List[bool], lora: Dict, results: Dict) -> None:
    """Stock HF with the whole model on the GPU, then (unless skipped) with the routed
    experts offloaded to the CPU by accelerate; results into `results`."""
    model = build_hf_gpu(config, device)
    if "gpu" not in args.skip:
        torch.cuda.reset_peak_memory_stats()
        print("[hf, all on GPU]", flush=True)
        results["hf_gpu"] = measure(model, device, args.prefill, args.decode, args.repeats, args.batches, args.ttft)
        if sft:
            import peft

            pm = peft.get_peft_model(model, peft.LoraConfig(**lora))
            results["hf_gpu"]["sft"] = measure_sft(pm, device, sft, args.sft_steps, ckpts, args.reentrant, bool(args.profile), args.accum)
            del pm
    if "offload" not in args.skip:
        from accelerate import cpu_offload_with_hook  # noqa: F401  (accelerate present)
        from accelerate.hooks import AlignDevicesHook, add_hook_to_module

        for _, block in find_moe_blocks(model):
            block.experts.to("cpu")
            add_hook_to_module(block.experts, AlignDevicesHook(execution_device=torch.device(device), offload=True, io_same_device=True, weights_map=block.experts.state_dict()))
        free_gpu()
        torch.cuda.reset_peak_memory_stats()
        print("[hf, experts offloaded by accelerate]", flush=True)
        results["hf_offload"] = measure(model, device, args.prefill[:1], args.offload_decode, 1)
    del model
    free_gpu()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=None, help="layers (default: the model's; v3: 4)")
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
    ap.add_argument("--sft", type=int, nargs="*", default=None, metavar="SEQ",
                    help="time LoRA SFT steps (batch 1) at these sequence lengths (no value: 512 2048) instead of decode")
    ap.add_argument("--sft-steps", type=int, default=3, help="timed SFT steps per configuration (after one warm-up)")
    ap.add_argument("--accum", type=int, default=1, metavar="N",
                    help="SFT: gradient accumulation, N micro-batches (forward+backward each) per optimizer step; tok/s counts all")
    ap.add_argument("--checkpointing", choices=["both", "on", "off"], default="both", help="SFT with activation checkpointing")
    ap.add_argument("--gpu-experts", choices=["auto", "off", "both"], default="auto",
                    help="SFT: long expert calls partly on the GPU (auto), CPU only (off), or both in turn")
    ap.add_argument("--gpu-expert-memory", default=None, metavar="SIZE",
                    help="ktrs: GPU memory for routed experts kept on the GPU (ktrs.place_experts_on_gpu), e.g. 12GiB")
    ap.add_argument("--reentrant", action="store_true", help="reentrant checkpointing (default: HF's non-reentrant)")
    ap.add_argument("--profile", nargs="?", const=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "sft_profile.json"),
                    default=None, metavar="JSON", help="SFT: also where each step's time goes, written to JSON")
    ap.add_argument("--model", choices=sorted(MODELS), default="v2-lite",
                    help="model shape (random weights); --layers defaults to its layer count (v3: 4, i.e. 3 MoE layers)")
    ap.add_argument("--tiny", action="store_true", help="the model's structure at toy sizes: checks the script runs, in seconds")
    ap.add_argument("--json", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "bench_model.json"))
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.layers is None:
        args.layers = MODELS[args.model]["layers"]
    if args.layers < 1:
        ap.error("--layers must be at least 1")
    config = model_config(args.model, args.layers, tiny=args.tiny)
    sft = None if args.sft is None else (args.sft or [512, 2048])
    ckpts = {"both": [False, True], "on": [True], "off": [False]}[args.checkpointing]
    if args.accum < 1:
        ap.error("--accum must be at least 1")
    if sft:  # SFT replaces the inference measurements
        args.prefill, args.decode, args.ttft, args.context = [], 0, 0, 0
        args.skip = sorted(set(args.skip) | {"offload"})
    sizes = model_bytes(config)
    moe_layers = len(find_moe_blocks(meta_model(config)))
    info = ktrs.info()
    print(f"model {args.model}{' (tiny)' if args.tiny else ''}: {args.layers} layers ({moe_layers} MoE), {sizes['all'] / 2**30:.1f} GiB "
          f"in bf16, {sizes['experts'] / 2**30:.1f} GiB of it routed experts; device {device}, ktrs ISA {info['selected_isa']}, "
          f"threads {args.threads or info['default_threads']}")
    out = {"config": {"model": args.model, "tiny": args.tiny, "layers": args.layers, "moe_layers": moe_layers, "device": device,
                      "isa": info["selected_isa"], "model_gib": sizes["all"] / 2**30, "expert_gib": sizes["experts"] / 2**30},
           "results": {}}
    if sft:
        out["config"]["accum"] = args.accum
    if "ktrs" not in args.skip and (short := host_shortfall(sizes["experts"], bool(sft))):
        ap.error(f"{short}: fewer --layers (each MoE layer holds {sizes['experts'] / max(moe_layers, 1) / 2**30:.1f} GiB)")

    if "ktrs" not in args.skip:
        t0 = time.perf_counter()
        model = build_ktrs(config, device, args.threads)
        out["config"]["ktrs_build_s"] = time.perf_counter() - t0
        if args.gpu_expert_memory:
            placed = ktrs.place_experts_on_gpu(model, memory=args.gpu_expert_memory)
            n = sum(len(v) for v in placed.values())
            out["config"]["gpu_expert_memory"] = args.gpu_expert_memory
            out["config"]["gpu_resident_experts"] = n
            print(f"[ktrs] {n} of {sum(m.num_experts for _, m in ktrs.resident._layers(model))} routed experts kept on the GPU "
                  f"({args.gpu_expert_memory})", flush=True)
        print(f"[ktrs] built in {out['config']['ktrs_build_s']:.0f} s; host RSS {rss_gb():.1f} GB", flush=True)
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        lora = lora_kwargs(MODELS[args.model]["attention"])
        out["results"]["ktrs"] = measure(model, device, args.prefill, args.decode, args.repeats, args.batches, args.ttft)
        if device.startswith("cuda") and args.context:
            out["results"]["ktrs"].update(measure_long_context_memory(model, device, args.context))
        if args.decode and not args.no_adapter and not sft:
            out["results"]["ktrs"].update(measure_adapter_decode(model, device, args.decode, ktrs.get_peft_model, lora))
        if sft:
            from peft import LoraConfig

            pm = ktrs.get_peft_model(model, LoraConfig(**lora))
            # Long calls run part of their experts on the GPU (gpu_experts.py) unless
            # KTRS_GPU_PREFILL_ROWS=0: "both" measures with and without, in one process.
            splits = {"auto": [None], "off": ["0"], "both": [None, "0"]}[args.gpu_experts]
            for rows in splits:
                if rows is not None:
                    os.environ["KTRS_GPU_PREFILL_ROWS"] = rows
                    print("  [experts on the CPU only: KTRS_GPU_PREFILL_ROWS=0]", flush=True)
                key = "sft" if rows is None else "sft_cpu_only"
                out["results"]["ktrs"][key] = measure_sft(pm, device, sft, args.sft_steps, ckpts, args.reentrant, bool(args.profile), args.accum)
            del pm
        del model
        free_gpu()

    if device.startswith("cuda") and not {"gpu", "offload"} <= set(args.skip):
        if (why := gpu_shortfall(sizes["all"])) is not None:
            print(f"[hf, all on GPU] skipped: {why}", flush=True)
            out["results"]["hf_gpu"] = {"skipped": why}
        else:
            oom = None
            try:
                run_hf(config, device, args, sft, ckpts, lora_kwargs(MODELS[args.model]["attention"]), out["results"])
            except torch.OutOfMemoryError as exc:
                oom = oom_message(exc)
            if oom is not None:  # outside the except: its traceback held the model
                free_gpu()
                out["results"].setdefault("hf_gpu", {})["oom"] = oom
                print(f"[hf] OUT OF GPU MEMORY, the rest of HF's measurements skipped: {oom}", flush=True)

    os.makedirs(os.path.dirname(args.json), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    cols = [(f"prefill_{T}_tok_s", f"prefill{T} tok/s") for T in args.prefill] + [("decode_tok_s", "decode b1 tok/s"),
            ("decode_b4_tok_s", "decode b4"), ("decode_b16_tok_s", "decode b16"), ("adapter_decode_tok_s", "b1 adapter"),
            ("adapter_sampling_decode_tok_s", "b1 adapter+sample"), (f"ttft_{args.ttft}_s", f"TTFT {args.ttft} s"),
            ("gpu_peak_gb", "GPU peak GB"), (f"gpu_peak_{args.context}_ctx_gb", f"GPU GB @{args.context}"), ("host_rss_gb", "host RSS GB"),
            ("sft_tok_s", "SFT tok/s"), ("sft_gpu_peak_gb", "SFT GPU GB")]
    cols = [(k, h) for k, h in cols if any(k in r for r in out["results"].values())]
    if sft:
        print_sft_table(out["results"])
    else:
        print(f"\n{'system':<12} " + " ".join(f"{h:>17}" for _, h in cols))
        for name, r in out["results"].items():
            print(f"{name:<12} " + " ".join(f"{r[k]:17.2f}" if r.get(k) is not None else f"{'-':>17}" for k, _ in cols))
    for name, r in out["results"].items():  # HF not run, or stopped
        for what, word in (("skipped", "skipped"), ("oom", "out of GPU memory")):
            if r.get(what):
                print(f"{name}: {word}: {r[what]}")
    if args.profile:
        prof = {"config": out["config"], "command": " ".join(sys.argv),
                "profiles": {name: {k: v["profile"] for k, v in r.get("sft", {}).items() if isinstance(v, dict) and "profile" in v}
                             for name, r in out["results"].items()}}
        os.makedirs(os.path.dirname(os.path.abspath(args.profile)), exist_ok=True)
        with open(args.profile, "w") as f:
            json.dump(prof, f, indent=2)
        print(f"profile JSON: {args.profile}")
    print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
