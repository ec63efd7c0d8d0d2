"""What differs between the MoE families ktrs supports, one entry per family.

Running a model needs no entry: `patch_model` finds MoE blocks by structure, and the
transformers-5 experts classes declare their layout (`use_experts_implementation`).
Files need one: a checkpoint's per-expert key names (streamed by `from_pretrained`,
written by `export_merged`, and transformers-4 style adapters), and the default LoRA
targets of `ktrs train`. Adding a family is one :class:`Family` in :data:`FAMILIES`
and one tiny-config case in tests/tiny_families.py.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Dict, Iterable, Optional, Pattern, Tuple

from ._native import KtrsValueError

__all__ = ["Family", "FAMILIES", "family_for", "family_of", "ignored_keys"]

_PROJ = ("gate", "up", "down")


@dataclass(frozen=True)
class Family:
    """Naming conventions of one transformers ``model_type``.

    In the model every family keeps the MoE block at ``layers.N.mlp`` with fused
    ``experts.gate_up_proj``/``experts.down_proj``; checkpoints (the original ones, and
    what transformers' ``save_pretrained`` writes) keep one tensor per expert and
    projection, under a block name and projection names of the family's own.
    """

    model_type: str
    #: Attention projections that `ktrs train` puts LoRA on by default.
    attention_targets: Tuple[str, ...]
    #: The MoE block's name in checkpoints (transformers renames it to ``mlp``).
    checkpoint_block: str = "mlp"
    #: Per-expert checkpoint names of the gate, up and down projections.
    expert_names: Tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    @property
    def lora_targets(self) -> Tuple[str, ...]:
        """Default `target_modules` of `ktrs train`: attention plus the MLP projections
        (routed experts become ktrs expert LoRA, shared experts and dense MLPs PEFT's)."""
        return self.attention_targets + ("gate_proj", "up_proj", "down_proj")

    @property
    def routed_only_names(self) -> Tuple[str, ...]:
        """Per-expert projection names that name nothing else in the model (Mixtral's
        w1/w2/w3): in a transformers-4 adapter's `target_modules` they mean the routed
        experts, which ktrs owns, and match no module of a transformers-5 model."""
        return tuple(n for n in self.expert_names if n not in ("gate_proj", "up_proj", "down_proj"))

    def to_checkpoint(self, key: str) -> str:
        """The checkpoint's name of the model tensor (or module path) `key`."""
        return key.replace(".mlp.", f".{self.checkpoint_block}.") if self.checkpoint_block != "mlp" else key

    def to_model(self, key: str) -> str:
        """The model's name of the checkpoint tensor `key` (inverse of :meth:`to_checkpoint`)."""
        return key.replace(f".{self.checkpoint_block}.", ".mlp.") if self.checkpoint_block != "mlp" else key

    def expert_key(self, block: str, expert: int, proj: str) -> str:
        """Checkpoint key of expert `expert`'s `proj` ("gate", "up", "down") weight in the
        MoE block whose module path is `block` (e.g. ``model.layers.3.mlp``)."""
        return f"{self.to_checkpoint(block + '.')}experts.{expert}.{self.expert_names[_PROJ.index(proj)]}.weight"

    def expert_pattern(self, suffix: str = r"\.weight") -> Pattern[str]:
        """Matches per-expert keys ending in `suffix`; groups: layer, expert, projection
        name (map it with :meth:`proj`)."""
        names = "|".join(re.escape(n) for n in self.expert_names)
        return re.compile(rf"^(.*?layers\.(\d+)\.{re.escape(self.checkpoint_block)}\.experts)\.(\d+)\.({names}){suffix}$")

    def proj(self, name: str) -> str:
        """"gate", "up" or "down" for a per-expert checkpoint projection name."""
        return _PROJ[self.expert_names.index(name)]


_DEEPSEEK_ATTENTION = ("q_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj")
_ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")

#: The families ktrs streams, trains, adapts and exports, each tested against the stock
#: model in tests/test_families.py and tests/test_family_finetune.py.
FAMILIES: Dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("deepseek_v2", _DEEPSEEK_ATTENTION),
        Family("deepseek_v3", _DEEPSEEK_ATTENTION),
        Family("qwen2_moe", _ATTENTION),
        Family("qwen3_moe", _ATTENTION),
        Family("glm4_moe", _ATTENTION),
        # Original Mixtral checkpoints (and transformers 5's save_pretrained) keep the block
        # as `block_sparse_moe` and the experts as w1 (gate), w3 (up), w2 (down).
        Family("mixtral", _ATTENTION, checkpoint_block="block_sparse_moe", expert_names=("w1", "w3", "w2")),
    )
}


def family_for(model_type: Optional[str], what: str = "ktrs") -> Family:
    """The :class:`Family` of `model_type`; an unknown type raises `KtrsValueError`
    naming the supported ones (`what` starts the message: the caller or the path)."""
    fam = FAMILIES.get(model_type or "")
    if fam is None:
        raise KtrsValueError(
            f"{what}: ktrs has no checkpoint names for {model_type!r} models; it supports {', '.join(FAMILIES)} "
            "(other MoE models with SwiGLU experts: load them with transformers, then ktrs.patch_model)"
        )
    return fam


def known_family(model) -> Optional[Family]:
    """The :class:`Family` of a (possibly PEFT-wrapped) transformers model, or None for a
    type ktrs has no names for (such a model can still be patched)."""
    return FAMILIES.get(getattr(getattr(model, "config", None), "model_type", None) or "")


def family_of(model, what: str = "ktrs") -> Family:
    """The :class:`Family` of a (possibly PEFT-wrapped) transformers model."""
    config = getattr(model, "config", None)
    return family_for(getattr(config, "model_type", None), what)


def ignored_keys(model) -> Iterable[Pattern[str]]:
    """Checkpoint keys transformers skips for this model (e.g. DeepSeek-V3's and
    GLM-4.5's multi-token-prediction layers, which the causal LM does not build)."""
    return [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ())]
