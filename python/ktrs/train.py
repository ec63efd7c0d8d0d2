"""`ktrs train`: LoRA SFT of a local DeepSeek-V2 checkpoint on chat JSONL."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import torch

from ._native import KtrsFileNotFoundError, KtrsValueError


@dataclass
class TrainConfig:
    model: str
    data: str
    output: str
    lora_rank: int = 16
    lora_alpha: float = 32.0
    learning_rate: float = 5e-3
    steps: int = 200
    batch_size: int = 16
    max_len: int = 256
    device: Optional[str] = None
    seed: int = 0
    targets: List[str] = field(default_factory=lambda: ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def load_config(path: Optional[str], overrides: dict) -> TrainConfig:
    values = {}
    if path:
        import yaml

        with open(path) as f:
            values = yaml.safe_load(f) or {}
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("model", "data", "output") if not values.get(k)]
    if missing:
        raise KtrsValueError(f"missing {', '.join(missing)} (give them as flags or in the YAML file)")
    unknown = set(values) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise KtrsValueError(f"unknown options: {sorted(unknown)}")
    return TrainConfig(**values)


def resolve_device(device: Optional[str]) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KtrsValueError("--device cuda was asked for, but torch sees no CUDA GPU (use --device cpu)")
    return device


def check_checkpoint(path: str) -> None:
    cfg = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.exists(cfg):
        raise KtrsFileNotFoundError(f"{path!r} is not a model directory (no config.json)")
    with open(cfg) as f:
        kind = json.load(f).get("model_type")
    if kind != "deepseek_v2":
        raise KtrsValueError(f"{path!r} is a {kind!r} checkpoint; ktrs trains DeepSeek-V2 models (model_type deepseek_v2)")


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Trains LoRA (expert LoRA in ktrs, the rest in PEFT) and writes to `cfg.output`:
    the adapter, loss_curve.png and metrics.json. Returns the metrics."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    import ktrs

    from .chat_data import collate, encode, read_jsonl
    from .plot import loss_curve_png

    check_checkpoint(cfg.model)
    device = resolve_device(cfg.device)
    convs = read_jsonl(cfg.data)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    if tok.chat_template is None:
        raise KtrsValueError(f"the tokenizer in {cfg.model!r} has no chat template")
    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = ktrs.from_pretrained(cfg.model, device=device, dtype=dtype)
    pm = ktrs.get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=list(cfg.targets)))
    pm.train()
    data = [encode(tok, c, cfg.max_len) for c in convs]
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, cfg.steps) / cfg.steps)))
    gen = torch.Generator().manual_seed(cfg.seed)
    losses: List[float] = []
    timer = ktrs.module.Timer.global_()
    timer.reset()
    t0 = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, desc="ktrs train", unit="step")
    for step in range(cfg.steps):
        pick = torch.randperm(len(data), generator=gen)[: cfg.batch_size].tolist()
        batch = {k: v.to(device) for k, v in collate([data[i] for i in pick], tok.pad_token_id).items()}
        loss = pm(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if bar is not None:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
            bar.update(1)
    if bar is not None:
        bar.close()
    secs = time.perf_counter() - t0
    os.makedirs(cfg.output, exist_ok=True)
    pm.save_pretrained(cfg.output)
    tok.save_pretrained(cfg.output)
    loss_curve_png(losses, os.path.join(cfg.output, "loss_curve.png"))
    metrics = {
        "config": asdict(cfg), "device": device, "isa": ktrs.info()["selected_isa"], "steps": cfg.steps,
        "first_loss": losses[0], "final_loss": sum(losses[-5:]) / min(5, len(losses)), "losses": losses,
        "train_seconds": secs, "cpu_expert_seconds": timer.seconds, "other_seconds": secs - timer.seconds,
    }
    with open(os.path.join(cfg.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
