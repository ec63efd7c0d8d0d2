"""`ktrs train`: LoRA SFT of a local MoE checkpoint (a family in `ktrs.families`) on chat JSONL."""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from typing import List, Optional

import torch

from .._native import KtrsError, KtrsFileNotFoundError, KtrsValueError
from ..families import Family, family_for


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
    #: LoRA `target_modules`; None: the family's attention projections and the MLP
    #: projections (`Family.lora_targets`).
    targets: Optional[List[str]] = None
    #: Write into an output directory that already holds files.
    overwrite: bool = False
    #: GPU memory for routed experts kept on the GPU too (e.g. "12GiB"); None: none.
    gpu_expert_memory: Optional[str] = None

    def check(self) -> None:
        """Refuses values that would fail only after the model has loaded, or train on
        nothing; each message names the option and what it accepts."""
        for name in ("steps", "batch_size", "lora_rank"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise KtrsValueError(f"{_flag(name)} must be a whole number of at least 1, got {v!r}")
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < MIN_MAX_LEN:
            raise KtrsValueError(f"--max-len must be a whole number of at least {MIN_MAX_LEN} tokens, got {self.max_len!r}")
        for name in ("learning_rate", "lora_alpha"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise KtrsValueError(f"{_flag(name)} must be a positive number, got {v!r}")
        if self.gpu_expert_memory is not None:
            from ..resident import parse_bytes

            try:
                parse_bytes(self.gpu_expert_memory)
            except KtrsError as exc:
                raise KtrsValueError(f"--gpu-expert-memory: {exc}") from None
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise KtrsValueError(f"--seed must be a whole number, got {self.seed!r}")
        if os.path.isfile(self.output):
            raise KtrsValueError(f"--output {self.output!r} is a file; give a directory")
        if os.path.isdir(self.output) and os.listdir(self.output) and not self.overwrite:
            raise KtrsValueError(f"--output {self.output!r} already holds files; choose a new directory or pass --overwrite")


#: Shorter sequences cannot hold a chat template's framing and any reply.
MIN_MAX_LEN = 8

#: YAML keys accepted besides the field names: the flags' spellings.
_ALIASES = {"lr": "learning_rate"}


def _flag(name: str) -> str:
    return "--" + ("lr" if name == "learning_rate" else name.replace("_", "-"))


def load_config(path: Optional[str], overrides: dict) -> TrainConfig:
    """The options from the YAML file at `path` (keys as field names or as the flags
    spell them: `lr`, `max-len`), overridden by the non-None `overrides`; validated."""
    values = {}
    if path:
        import yaml

        if not os.path.isfile(path):
            raise KtrsFileNotFoundError(f"no config file {path!r}")
        with open(path) as f:
            try:
                values = yaml.safe_load(f) or {}
            except yaml.YAMLError as exc:
                raise KtrsValueError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from exc
        if not isinstance(values, dict):
            raise KtrsValueError(f"{path}: expected a mapping of option: value")
        values = {_ALIASES.get(k, str(k).replace("-", "_")): v for k, v in values.items()}
    values.update({k: v for k, v in overrides.items() if v is not None})
    missing = [k for k in ("model", "data", "output") if not values.get(k)]
    if missing:
        raise KtrsValueError(f"missing {', '.join('--' + m for m in missing)} (give them as flags or in the YAML file)")
    unknown = set(values) - set(TrainConfig.__dataclass_fields__)
    if unknown:
        raise KtrsValueError(f"unknown options: {sorted(unknown)}")
    cfg = TrainConfig(**values)
    cfg.check()
    return cfg


def resolve_device(device: Optional[str]) -> str:
    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise KtrsValueError("--device cuda was asked for, but torch sees no CUDA GPU (use --device cpu)")
    return device


def check_checkpoint(path: str) -> Family:
    """The family of the checkpoint at `path`; refuses a directory without config.json
    or a model type ktrs has no names for."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isdir(path) or not os.path.exists(cfg):
        raise KtrsFileNotFoundError(f"{path!r} is not a model directory (no config.json)")
    with open(cfg) as f:
        kind = json.load(f).get("model_type")
    return family_for(kind, repr(path))


def check_encoded(data, max_len: int, tok) -> None:
    """Refuses data with nothing to train within `max_len` (the loss would be NaN); warns
    about conversations cut to nothing and words the tokenizer does not know."""
    import sys

    empty = [i for i, d in enumerate(data, 1) if not (d["labels"] != -100).any()]
    if len(empty) == len(data):
        raise KtrsValueError(f"--max-len {max_len} leaves no assistant reply to train in any conversation; raise --max-len")
    if empty:
        print(f"ktrs train: warning: --max-len {max_len} cuts the reply of {len(empty)} conversations (e.g. line {empty[0]}); they train nothing", file=sys.stderr)
    unk = tok.unk_token_id
    if unk is not None:
        n = sum(int((d["input_ids"] == unk).sum()) for d in data)
        if n:
            print(f"ktrs train: warning: {n} tokens of the data are not in the tokenizer's vocabulary and became {tok.unk_token!r}", file=sys.stderr)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    """Trains LoRA (expert LoRA in ktrs, the rest in PEFT) and writes to `cfg.output`:
    the adapter, loss_curve.png and metrics.json. Returns the metrics."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    import ktrs

    from .chat_data import collate, encode, read_jsonl
    from .plot import loss_curve_png

    cfg.check()
    family = check_checkpoint(cfg.model)
    device = resolve_device(cfg.device)
    convs = read_jsonl(cfg.data)
    tok = AutoTokenizer.from_pretrained(cfg.model)
    if tok.chat_template is None:
        raise KtrsValueError(f"the tokenizer in {cfg.model!r} has no chat template")
    # Everything that can be wrong with the data shows before the model loads.
    data = [encode(tok, c, cfg.max_len) for c in convs]
    check_encoded(data, cfg.max_len, tok)
    torch.manual_seed(cfg.seed)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = ktrs.from_pretrained(cfg.model, device=device, dtype=dtype, gpu_expert_memory=cfg.gpu_expert_memory)
    targets = list(cfg.targets or family.lora_targets)
    pm = ktrs.get_peft_model(model, LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=targets))
    pm.train()
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
        "config": {**asdict(cfg), "targets": targets}, "device": device, "isa": ktrs.info()["selected_isa"], "steps": cfg.steps,
        "first_loss": losses[0], "final_loss": sum(losses[-5:]) / min(5, len(losses)), "losses": losses,
        "train_seconds": secs, "cpu_expert_seconds": timer.seconds, "other_seconds": secs - timer.seconds,
    }
    with open(os.path.join(cfg.output, "metrics.json"), "w") as f:
        json.dump(metrics, f, indent=2)
    return metrics
