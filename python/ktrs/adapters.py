"""Expert LoRA in standard PEFT adapter files.

Routed-expert LoRA is stored the way PEFT stores LoRA on transformers 5's fused expert
parameters (`target_parameters=["gate_up_proj", "down_proj"]`), so stock PEFT loads the
adapter onto the stock, unpatched model:

    ...mlp.experts.base_layer.lora_A.weight  [E·r', H]    gate_up_proj (the inner wrapper)
    ...mlp.experts.base_layer.lora_B.weight  [2I, E·r']
    ...mlp.experts.lora_A.weight             [E·r, I]     down_proj
    ...mlp.experts.lora_B.weight             [H, E·r]

with `ΔW_e = scale · B.reshape(out, r, E)[:, :, e] @ A.reshape(E, r, in)[e]`. ktrs keeps
separate A matrices for gate and up, so gate_up is written with rank r' = 2r and a
block-diagonal B (and alpha 2α), which is exact; loading accepts any rank.

The prefix is the experts module's path, which transformers 5 spells
`model.layers.N.mlp.experts` in every supported family; only adapters from
transformers-4 style per-expert modules use family names (`ktrs.families`).
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, Optional, Tuple

import torch

from ._native import KtrsValueError
from .experts import LORA_NAMES
from .families import Family, known_family
from .hf import find_moe_blocks
from .module import KtrsExperts

__all__ = ["save_adapter", "load_adapter"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_GU = re.compile(r"^(.*layers\.(\d+)\.mlp\.experts)\.base_layer\.lora_([AB])\.weight$")
_DN = re.compile(r"^(.*layers\.(\d+)\.mlp\.experts)\.lora_([AB])\.weight$")
_PEFT_PREFIX = "base_model.model."
#: PEFT's `target_modules` placeholder for an adapter that wraps no module of PEFT's
#: (peft.utils.constants.DUMMY_TARGET_MODULES): what ktrs gives PEFT for expert-only LoRA.
_DUMMY_TARGETS = "dummy-target-modules"


def _peft_scale(alpha: float, r: int, rslora: bool) -> float:
    return alpha / (r**0.5) if rslora else alpha / r


def _expert_blocks(model) -> Dict[int, Tuple[str, KtrsExperts]]:
    """{layer: (the experts' adapter key prefix, KtrsExperts)} of a patched model, with
    or without its PEFT wrapper."""
    out = {}
    for name, block in find_moe_blocks(model):
        m = re.search(r"layers\.(\d+)\.mlp$", name)
        if m and isinstance(block.experts, KtrsExperts):
            path = name[len(_PEFT_PREFIX) :] if name.startswith(_PEFT_PREFIX) else name
            out[int(m.group(1))] = (f"{_PEFT_PREFIX}{path}.experts", block.experts)
    return out


def _v4_pattern(family: Optional[Family]) -> Optional["re.Pattern[str]"]:
    return family.expert_pattern(r"\.lora_([AB])\.weight") if family is not None else None


def _to_peft(ex: KtrsExperts, prefix: str, gu_scale: float, dn_scale: float) -> Dict[str, torch.Tensor]:
    L = {n: ex.experts.lora_weight(n).detach() for n in LORA_NAMES}
    s = ex.experts.lora_scaling
    E, r, H = L["gate_A"].shape
    I = L["gate_B"].shape[1]
    a_gu = torch.cat([L["gate_A"], L["up_A"]], dim=1)  # [E, 2r, H]
    b_gu = torch.zeros(E, 2 * I, 2 * r)
    b_gu[:, :I, :r] = L["gate_B"]
    b_gu[:, I:, r:] = L["up_B"]
    b_gu *= s / gu_scale
    b_dn = L["down_B"] * (s / dn_scale)
    return {
        f"{prefix}.base_layer.lora_A.weight": a_gu.reshape(E * 2 * r, H).contiguous(),
        f"{prefix}.base_layer.lora_B.weight": b_gu.permute(1, 2, 0).reshape(2 * I, 2 * r * E).contiguous(),
        f"{prefix}.lora_A.weight": L["down_A"].reshape(E * r, I).contiguous(),
        f"{prefix}.lora_B.weight": b_dn.permute(1, 2, 0).reshape(H, r * E).contiguous(),
    }


def save_adapter(model, save_directory: str, **kwargs) -> None:
    """Writes `model`'s adapters (PEFT's and ktrs' expert LoRA) as one standard PEFT
    adapter: adapter_config.json + adapter_model.safetensors."""
    from safetensors.torch import load_file, save_file

    blocks = _expert_blocks(model)
    has_experts = any(ex.experts.lora_rank > 0 for _, ex in blocks.values())
    save = getattr(model, "_ktrs_peft_save_pretrained", None) or model.save_pretrained
    save(save_directory, **kwargs)
    _strip_ktrs_layout(model, save_directory)
    _warn_what_stock_peft_drops(save_directory, getattr(model, "active_adapter", "default"))
    if not has_experts:
        return
    adapter = getattr(model, "active_adapter", "default")
    sub = os.path.join(save_directory, adapter) if adapter != "default" and os.path.isdir(os.path.join(save_directory, adapter)) else save_directory
    cfg_path = os.path.join(sub, CONFIG_NAME)
    with open(cfg_path) as f:
        cfg = json.load(f)
    r = next(ex.experts.lora_rank for _, ex in blocks.values() if ex.experts.lora_rank > 0)
    alpha = next(ex.experts.lora_alpha for _, ex in blocks.values() if ex.experts.lora_rank > 0)
    rslora = bool(cfg.get("use_rslora"))
    if cfg.get("r") != r or cfg.get("lora_alpha") != alpha:
        raise KtrsValueError(f"expert LoRA (r={r}, alpha={alpha}) must share the adapter's r={cfg.get('r')} and lora_alpha={cfg.get('lora_alpha')}")
    gu_scale = _peft_scale(2 * alpha, 2 * r, rslora)
    dn_scale = _peft_scale(alpha, r, rslora)
    weights = load_file(os.path.join(sub, WEIGHTS_NAME))
    for _, (prefix, ex) in sorted(blocks.items()):
        if ex.experts.lora_rank > 0:
            weights.update(_to_peft(ex, prefix, gu_scale, dn_scale))
    save_file(weights, os.path.join(sub, WEIGHTS_NAME), metadata={"format": "pt"})
    if not isinstance(cfg.get("target_modules"), list) and cfg.get("target_modules") in (None, _DUMMY_TARGETS):
        cfg["target_modules"] = []  # expert-only: what stock PEFT writes for target_parameters alone
    cfg["target_parameters"] = sorted(set(cfg.get("target_parameters") or []) | {"gate_up_proj", "down_proj"})
    cfg["rank_pattern"] = {**(cfg.get("rank_pattern") or {}), r".*\.gate_up_proj": 2 * r}
    cfg["alpha_pattern"] = {**(cfg.get("alpha_pattern") or {}), r".*\.gate_up_proj": 2 * alpha}
    with open(cfg_path, "w") as f:
        json.dump(cfg, f, indent=2, sort_keys=True)


def _strip_ktrs_layout(model, save_directory: str) -> None:
    """Drops what PEFT saved of ktrs' tuner layers (`lora_experts`, ktrs' own layout and
    no adapter name in the key) from every adapter PEFT wrote; the active adapter's expert
    LoRA is then added in PEFT's layout."""
    from safetensors.torch import load_file, save_file

    for name in getattr(model, "peft_config", {}) or {"default": None}:
        sub = save_directory if name == "default" else os.path.join(save_directory, name)
        path = os.path.join(sub, WEIGHTS_NAME)
        if not os.path.isfile(path):
            continue
        weights = load_file(path)
        kept = {k: v for k, v in weights.items() if ".lora_experts." not in k}
        if len(kept) != len(weights):
            save_file(kept, path, metadata={"format": "pt"})


# LoRA on a gate/up/down projection that is not a routed expert: a shared expert
# (DeepSeek's shared_experts, Qwen2-MoE's shared_expert) or a dense MLP (layer 0 of
# DeepSeek-V2).
_MLP_LEAF = re.compile(r"^.*\.mlp\.(shared_experts?\.)?(gate|up|down)_proj\.lora_[AB]\.weight$")


def _warn_what_stock_peft_drops(save_directory: str, adapter: str) -> None:
    """Warns when stock PEFT will not load part of the adapter just saved.

    PEFT 0.21's transformers-5 MoE target rewrite (huggingface/peft#3711) turns every
    `gate_proj`/`up_proj`/`down_proj` target of a transformers-5 MoE into routed-expert
    `target_parameters`, so stock PEFT drops the shared-expert and dense-MLP LoRA of
    such an adapter. No config spelling avoids it (regex targets are resolved to module
    names first), so ktrs names what will be dropped; `ktrs.load_adapter` loads all of it.
    """
    try:
        import peft.utils.transformers_weight_conversion  # noqa: F401 - the rewrite's home
    except ImportError:
        return
    from safetensors import safe_open

    sub = os.path.join(save_directory, adapter) if adapter != "default" and os.path.isdir(os.path.join(save_directory, adapter)) else save_directory
    with safe_open(os.path.join(sub, WEIGHTS_NAME), "pt") as f:
        dropped = sorted(k for k in f.keys() if _MLP_LEAF.match(k))
    if dropped:
        import warnings

        warnings.warn(
            f"ktrs: stock PEFT will not load {len(dropped)} of this adapter's LoRA tensors (the shared-expert and dense-MLP "
            f"gate_proj/up_proj/down_proj LoRA, e.g. {dropped[0]}): its transformers-5 MoE target rewrite moves those "
            "targets onto the routed experts (huggingface/peft#3711). ktrs.load_adapter loads all of them.",
            UserWarning,
            stacklevel=3,
        )


def _from_peft(parts: Dict[str, torch.Tensor], E: int, H: int, I: int, gu_scale: float, dn_scale: float) -> Tuple[Dict[str, torch.Tensor], float]:
    """ktrs LoRA matrices (one rank, one scale) equal to PEFT's fused expert LoRA."""
    a_gu, b_gu, a_dn, b_dn = (parts[k].float() for k in ("gu_A", "gu_B", "dn_A", "dn_B"))
    r_gu, r_dn = a_gu.shape[0] // E, a_dn.shape[0] // E
    a_gu = a_gu.reshape(E, r_gu, H)
    b_gu = b_gu.reshape(2 * I, r_gu, E).permute(2, 0, 1)
    a_dn = a_dn.reshape(E, r_dn, I)
    b_dn = b_dn.reshape(H, r_dn, E).permute(2, 0, 1)
    h = r_gu // 2
    block_diag = r_gu % 2 == 0 and not b_gu[:, :I, h:].any() and not b_gu[:, I:, :h].any()
    if block_diag:  # written by ktrs: separate gate and up A of rank r_gu / 2
        mats = {"gate_A": a_gu[:, :h], "up_A": a_gu[:, h:], "gate_B": b_gu[:, :I, :h], "up_B": b_gu[:, I:, h:]}
    else:  # PEFT's fused LoRA: gate and up share A
        mats = {"gate_A": a_gu, "up_A": a_gu, "gate_B": b_gu[:, :I], "up_B": b_gu[:, I:]}
    mats["down_A"], mats["down_B"] = a_dn, b_dn
    scale = {"gate_B": gu_scale, "up_B": gu_scale, "down_B": dn_scale}
    rank = max(m.shape[1] for n, m in mats.items() if n.endswith("_A"))
    out = {}
    for n, m in mats.items():
        if n.endswith("_A"):
            out[n] = torch.cat([m, m.new_zeros(E, rank - m.shape[1], m.shape[2])], 1)
        else:
            out[n] = torch.cat([m * (scale[n] / gu_scale), m.new_zeros(E, m.shape[1], rank - m.shape[2])], 2)
    return out, gu_scale


def _read(adapter_dir: str):
    from safetensors.torch import load_file

    with open(os.path.join(adapter_dir, CONFIG_NAME)) as f:
        raw = json.load(f)
    return raw, load_file(os.path.join(adapter_dir, WEIGHTS_NAME))


def restore_expert_lora(model, adapter_dir: str, adapter_name: Optional[str] = None) -> int:
    """Copies the expert LoRA of an adapter written by :func:`save_adapter` into the
    existing ktrs buffers, in place (the parameters, and so optimizer state keyed by
    them, stay the same objects): what resuming a Trainer checkpoint needs. Returns the
    number of layers restored."""
    raw, weights = _read(adapter_dir)
    mats_by_layer = _expert_mats(raw, weights, _expert_blocks(model), known_family(model))
    for layer, (ex, mats, scale) in mats_by_layer.items():
        if adapter_name is not None and adapter_name != ex.expert_adapter and adapter_name in ex._stash:
            (rank, alpha, rslora), _ = ex._stash[adapter_name]
            ex._stash[adapter_name] = ((rank, alpha, rslora), {n: _rescaled(n, mats[n], scale, _peft_scale(alpha, rank, rslora)).float() for n in LORA_NAMES})
            continue
        if mats["gate_A"].shape[1] != ex.experts.lora_rank:
            raise KtrsValueError(f"layer {layer}: adapter expert LoRA (rank {mats['gate_A'].shape[1]}) does not fit the model's (rank {ex.experts.lora_rank})")
        for n in LORA_NAMES:
            ex.experts.set_lora_weight(n, _rescaled(n, mats[n], scale, ex.experts.lora_scaling))
    return len(mats_by_layer)


def _rescaled(name: str, m: torch.Tensor, scale: float, target: float) -> torch.Tensor:
    """LoRA matrix `name` of a delta `scale · B·A`, re-expressed for scaling `target`
    (B carries the ratio). With rsLoRA the adapter's gate/up scale (√2·α/√r, the fused
    rank-2r layout) differs from the model's α/√r; the product is what must agree."""
    return m * (scale / target) if name.endswith("_B") and scale != target else m


def _expert_mats(raw, weights, blocks, family: Optional[Family]):
    """{layer: (KtrsExperts, ktrs matrices, ktrs scale)} for the layers the adapter covers."""
    v4_pattern = _v4_pattern(family)
    per_layer: Dict[int, Dict[str, torch.Tensor]] = {}
    v4: Dict[int, Dict[Tuple[int, str, str], torch.Tensor]] = {}
    for k, v in weights.items():
        m = _GU.match(k) or _DN.match(k)
        if m:
            kind = "gu" if ".base_layer." in k else "dn"
            per_layer.setdefault(int(m.group(2)), {})[f"{kind}_{m.group(3)}"] = v
            continue
        m = v4_pattern.match(k) if v4_pattern is not None else None
        if m:
            v4.setdefault(int(m.group(2)), {})[(int(m.group(3)), family.proj(m.group(4)), m.group(5))] = v
    r, alpha, rslora = raw["r"], raw["lora_alpha"], bool(raw.get("use_rslora"))
    gu_r = next((v for k, v in (raw.get("rank_pattern") or {}).items() if "gate_up" in k), r)
    gu_a = next((v for k, v in (raw.get("alpha_pattern") or {}).items() if "gate_up" in k), alpha)
    gu_scale, dn_scale = _peft_scale(gu_a, gu_r, rslora), _peft_scale(alpha, r, rslora)
    out = {}
    for layer, (_, ex) in blocks.items():
        E, H, I = ex.experts.num_experts, ex.experts.hidden_size, ex.experts.intermediate_size
        if layer in per_layer:
            mats, scale = _from_peft(per_layer[layer], E, H, I, gu_scale, dn_scale)
        elif layer in v4:  # transformers-4 style per-expert adapter keys
            t = v4[layer]
            mats = {f"{p}_{ab}": torch.stack([t[(e, p, ab)].float() for e in range(E)]) for p in ("gate", "up", "down") for ab in ("A", "B")}
            scale = dn_scale
        else:
            continue
        out[layer] = (ex, mats, scale)
    return out


def _peft_config(raw: dict, is_trainable: bool, family: Optional[Family], model=None):
    """The adapter's LoraConfig for PEFT, without the routed-expert targets ktrs owns; an
    adapter that leaves PEFT nothing to wrap (expert-only LoRA, or targets that match no
    module of `model`) gets PEFT's placeholder for "no modules"."""
    import peft

    cfg = dict(raw)
    if family is not None and isinstance(cfg.get("target_modules"), list):
        cfg["target_modules"] = [t for t in cfg["target_modules"] if t not in family.routed_only_names]
    cfg["target_parameters"] = [t for t in (cfg.get("target_parameters") or []) if t not in ("gate_up_proj", "down_proj")] or None
    cfg["rank_pattern"] = {k: v for k, v in (cfg.get("rank_pattern") or {}).items() if "gate_up" not in k}
    cfg["alpha_pattern"] = {k: v for k, v in (cfg.get("alpha_pattern") or {}).items() if "gate_up" not in k}
    allowed = set(peft.LoraConfig.__dataclass_fields__)
    config = peft.LoraConfig(**{k: v for k, v in cfg.items() if k in allowed and k not in ("peft_type", "auto_mapping")})
    config.inference_mode = not is_trainable
    if not config.target_parameters and config.target_modules != _DUMMY_TARGETS:
        targets = config.target_modules
        if targets and model is not None:
            from peft.tuners.tuners_utils import check_target_module_exists

            if not any(check_target_module_exists(config, name) for name, _ in model.named_modules() if name):
                targets = None
        if not targets:
            config.target_modules = _DUMMY_TARGETS
    return config


def _load_peft_tensors(pm, rest: Dict[str, torch.Tensor], adapter_name: str, adapter_dir: str) -> None:
    """Loads PEFT's part of an adapter; every LoRA tensor PEFT made for it must be in the file."""
    import peft

    from .peft import _no_moe_target_rewrite

    with _no_moe_target_rewrite():
        result = peft.set_peft_model_state_dict(pm, rest, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise KtrsValueError(f"adapter tensors that match no module: {unexpected[:5]}")
    # A LoRA tensor left at its init (B = 0) would silently drop that module's adaptation.
    not_loaded = [k for k in getattr(result, "missing_keys", []) if "lora_" in k and f".{adapter_name}." in k]
    if not_loaded:
        raise KtrsValueError(f"the adapter in {adapter_dir!r} has no tensors for {len(not_loaded)} LoRA weights, e.g. {not_loaded[:3]}")


def _split(adapter_dir: str, model, blocks):
    """(adapter config, PEFT's tensors, the expert LoRA by layer) of an adapter for `model`."""
    raw, weights = _read(adapter_dir)
    family = known_family(model)
    v4 = _v4_pattern(family)
    rest = {k: v for k, v in weights.items() if not (_GU.match(k) or _DN.match(k) or (v4 is not None and v4.match(k)))}
    return raw, rest, _expert_mats(raw, weights, blocks, family)


def load_adapter(model, adapter_dir: str, *, adapter_name: str = "default", is_trainable: bool = False):
    """Loads a PEFT adapter (written by :func:`save_adapter`, or by stock PEFT on an
    unpatched model) into a ktrs-patched model, in memory: expert LoRA into ktrs, every
    other target through PEFT (without PEFT's MoE target rewrite). Returns the PeftModel."""
    import peft

    from .peft import _attach_adapter_controls, _attach_save, _no_moe_target_rewrite

    blocks = _expert_blocks(model)
    if not blocks:
        raise KtrsValueError("ktrs.load_adapter needs a model patched by ktrs.patch_model")
    raw, rest, expert = _split(adapter_dir, model, blocks)
    for layer, (ex, mats, scale) in expert.items():
        rank = mats["gate_A"].shape[1]
        # ktrs scale = alpha / rank (rsLoRA off): pick alpha so it equals `scale`.
        ex.enable_lora(rank, alpha=scale * rank)
        for n in LORA_NAMES:
            ex.experts.set_lora_weight(n, mats[n])
    with _no_moe_target_rewrite():
        pm = peft.get_peft_model(model, _peft_config(raw, is_trainable, known_family(model), model), adapter_name=adapter_name)
    _load_peft_tensors(pm, rest, adapter_name, adapter_dir)
    _attach_save(pm)
    _attach_adapter_controls(pm, adapter_name)
    for p in (p for _, ex in blocks.values() for p in ex.lora_experts.values()):
        p.requires_grad_(is_trainable)
    return pm


def add_adapter_from_dir(pm, adapter_dir: str, adapter_name: str, *, is_trainable: bool = False) -> None:
    """Adds a further named adapter to a ktrs PeftModel (what ``pm.load_adapter(dir,
    name)`` does for a new name): PEFT's part through PEFT, the expert LoRA set aside in
    each ktrs layer until ``set_adapter(name)`` makes it the one the kernels run."""
    from .peft import _no_moe_target_rewrite

    raw, rest, expert = _split(adapter_dir, pm, _expert_blocks(pm))
    with _no_moe_target_rewrite():
        pm.add_adapter(adapter_name, _peft_config(raw, is_trainable, known_family(pm), pm.base_model.model))
    _load_peft_tensors(pm, rest, adapter_name, adapter_dir)
    for ex, mats, scale in expert.values():
        rank = mats["gate_A"].shape[1]
        ex._stash[adapter_name] = ((rank, scale * rank, False), {n: mats[n].float().contiguous() for n in LORA_NAMES})
