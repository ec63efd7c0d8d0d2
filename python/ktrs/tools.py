"""Merging, exporting, describing models and inspecting adapters."""

from __future__ import annotations

import json
import os
import re
from collections import defaultdict
from typing import Dict, List

import torch
from torch import nn

from .experts import LORA_NAMES
from .families import family_of
from .hf import find_moe_blocks, shared_experts_of
from .module import KtrsExperts

__all__ = ["merge_expert_lora", "merge_and_unload", "export_merged", "describe", "inspect_adapter"]


@torch.no_grad()
def merge_expert_lora(model: nn.Module) -> int:
    """Adds every expert's LoRA delta (scale · B @ A, in f32) into its Rust-owned weights
    and removes the expert LoRA, where it belongs to an active adapter (as PEFT merges
    only active adapters). Returns the number of layers merged."""
    merged = 0
    for _, block in find_moe_blocks(model):
        ex = block.experts
        if not isinstance(ex, KtrsExperts) or ex.experts.lora_rank == 0 or ex.expert_adapter not in ex.active_adapters:
            continue
        rust, s = ex.experts, ex.experts.lora_scaling
        L = {n: rust.lora_weight(n) for n in LORA_NAMES}
        for e in range(rust.num_experts):
            g, u, d = (w.float() for w in rust.get_expert(e))
            g += s * L["gate_B"][e] @ L["gate_A"][e]
            u += s * L["up_B"][e] @ L["up_A"][e]
            d += s * L["down_B"][e] @ L["down_A"][e]
            rust.set_expert(e, g, u, d)
        ex.enable_lora(0)
        merged += 1
    return merged


def merge_and_unload(model: nn.Module) -> nn.Module:
    """PEFT's ``merge_and_unload`` for a ktrs model: PEFT's LoRA merges into the GPU
    modules, expert LoRA into the Rust-owned expert weights. Returns the base model."""
    merge_expert_lora(model)
    unload = getattr(model, "_ktrs_peft_merge_and_unload", None) or getattr(model, "merge_and_unload", None)
    return unload() if unload is not None else model


def export_merged(model: nn.Module, save_directory: str, *, max_shard_bytes: int = 2 << 30) -> None:
    """Writes a standard checkpoint (config.json + safetensors shards with the family's
    original key names, as transformers' ``save_pretrained`` writes them) that stock
    transformers loads; adapters are merged first."""
    from safetensors.torch import save_file

    family = family_of(model, "ktrs.export_merged")
    base = merge_and_unload(model)
    os.makedirs(save_directory, exist_ok=True)
    base.config.save_pretrained(save_directory)
    blocks = {name: block for name, block in find_moe_blocks(base)}
    shards: List[Dict[str, torch.Tensor]] = [{}]
    size = [0]

    def add(key: str, t: torch.Tensor) -> None:
        t = t.detach().to("cpu").contiguous()
        if size[0] + t.numel() * t.element_size() > max_shard_bytes and shards[-1]:
            shards.append({})
            size[0] = 0
        shards[-1][key] = t
        size[0] += t.numel() * t.element_size()

    for key, t in base.state_dict().items():
        if ".lora_experts." not in key:
            add(family.to_checkpoint(key), t)
    dtype = base.get_input_embeddings().weight.dtype
    for name, block in blocks.items():
        rust = block.experts.experts
        for e in range(rust.num_experts):
            for proj, w in zip(("gate", "up", "down"), rust.get_expert(e)):
                add(family.expert_key(name, e, proj), w.to(dtype))
    index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for s in shards for t in s.values())}, "weight_map": {}}
    for i, shard in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(save_directory, fname), metadata={"format": "pt"})
        index["weight_map"].update({k: fname for k in shard})
    with open(os.path.join(save_directory, "model.safetensors.index.json"), "w") as f:
        json.dump(index, f, indent=2)


def describe(model: nn.Module) -> str:
    """Which layers ktrs patched, where each part lives, LoRA parameters by group."""
    lines = []
    blocks = find_moe_blocks(model)
    lines.append(f"{type(model).__name__}: {len(blocks)} MoE blocks")
    for name, block in blocks:
        ex = block.experts
        if isinstance(ex, KtrsExperts):
            r = ex.experts
            dev = lambda m: ",".join(sorted({str(p.device) for p in m.parameters()})) or "-"  # noqa: E731
            shared = shared_experts_of(block)
            lines.append(
                f"  {name}: routed experts in ktrs ({r.num_experts} x H{r.hidden_size} I{r.intermediate_size}, "
                f"{r.weight_bytes / 2**20:.0f} MiB, ISA {r.isa}, {r.threads} threads, LoRA r={r.lora_rank}); "
                f"router on {dev(block.gate)}"
                + (f", shared experts on {dev(nn.ModuleList(shared))}" if shared else "")
                + (f"; {ex.resident.count} kept on {ex.resident.device} too ({ex.resident.nbytes / 2**20:.0f} MiB)" if ex.resident is not None else "")
            )
        else:
            lines.append(f"  {name}: NOT patched (experts in torch)")
    groups: Dict[str, int] = defaultdict(int)
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        groups[_component(n)] += p.numel()
    if groups:
        lines.append("trainable parameters by group:")
        for g, c in sorted(groups.items()):
            lines.append(f"  {g:<16} {c:>12,}")
    cfg = getattr(model, "peft_config", None)
    if cfg:
        for an, c in cfg.items():
            lines.append(f"PEFT adapter {an!r}: r={c.r} alpha={c.lora_alpha} targets={sorted(c.target_modules or [])} params={sorted(c.target_parameters or [])}")
    return "\n".join(lines)


def _component(name: str) -> str:
    if ".lora_experts." in name or re.search(r"\.mlp\.experts\.", name):
        return "routed experts"
    if re.search(r"\.shared_experts?(_gate)?\.", name):
        return "shared experts"
    if ".self_attn." in name:
        return "attention"
    if re.search(r"layers\.\d+\.mlp\.", name):
        return "dense MLP"
    return "other"


def inspect_adapter(adapter_dir: str) -> List[dict]:
    """Per-tensor NaN/Inf counts and magnitude statistics of an adapter file."""
    from safetensors import safe_open

    rows = []
    with safe_open(os.path.join(adapter_dir, "adapter_model.safetensors"), framework="pt") as f:
        for key in sorted(f.keys()):
            t = f.get_tensor(key).float()
            finite = t[torch.isfinite(t)]
            rows.append(
                {
                    "tensor": key,
                    "component": _component(key),
                    "shape": list(t.shape),
                    "nan": int(torch.isnan(t).sum()),
                    "inf": int(torch.isinf(t).sum()),
                    "max_abs": float(finite.abs().max()) if finite.numel() else float("nan"),
                    "rms": float(finite.pow(2).mean().sqrt()) if finite.numel() else float("nan"),
                }
            )
    return rows
