"""Tiny random models of every family ktrs supports (one builder per `model_type`, the
keys of ktrs.families.FAMILIES), for tests against the stock transformers classes; the
vocabulary of tests/test_patch_model.py's DeepSeek-V2, so its inputs and batches fit."""

from __future__ import annotations

from typing import Callable, Dict

import torch
from torch import nn

from test_finetune import batch
from test_patch_model import bf16_exact, tiny_config

COMMON = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2)


def deepseek_v2(vocab_size: int = 160) -> nn.Module:
    from transformers import DeepseekV2ForCausalLM

    return DeepseekV2ForCausalLM(tiny_config(vocab_size=vocab_size, initializer_range=0.02))  # as the other families


def qwen3_moe(vocab_size: int = 160) -> nn.Module:
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, vocab_size=vocab_size, intermediate_size=96, moe_intermediate_size=48,
                                              num_experts=8, head_dim=16, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]))


def qwen2_moe(vocab_size: int = 160) -> nn.Module:
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, vocab_size=vocab_size, intermediate_size=96, moe_intermediate_size=48,
                                              num_experts=8, shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[]))


def mixtral(vocab_size: int = 160) -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**COMMON, vocab_size=vocab_size, intermediate_size=48, num_local_experts=8))


def deepseek_v3(vocab_size: int = 160) -> nn.Module:
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, vocab_size=vocab_size, intermediate_size=96,
                                                  moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=0,
                                                  kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                                                  n_group=1, topk_group=1))


def glm4_moe(vocab_size: int = 160) -> nn.Module:
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    return Glm4MoeForCausalLM(Glm4MoeConfig(**COMMON, vocab_size=vocab_size, intermediate_size=96, moe_intermediate_size=48, head_dim=16,
                                            n_routed_experts=8, n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1))


#: model_type -> builder; test_families.py checks that this covers ktrs.families.FAMILIES.
BUILDERS: Dict[str, Callable[..., nn.Module]] = {
    f.__name__: f for f in (deepseek_v2, deepseek_v3, qwen2_moe, qwen3_moe, mixtral, glm4_moe)
}


def stock_model(model_type: str, seed: int = 0, vocab_size: int = 160) -> nn.Module:
    """The family's tiny model in eval mode, weights rounded to bf16 (so ktrs' bf16
    experts see the same values) and routed experts large enough to matter."""
    torch.manual_seed(seed)
    model = bf16_exact(BUILDERS[model_type](vocab_size)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.mul_(4.0)
    return bf16_exact(model)


def tie_free_batch(reference: nn.Module, margin: float = 2e-3) -> dict:
    """The first batch (test_finetune.batch by seed) on which no token's routing is near a
    tie in `reference`: ktrs' bf16 experts move the router logits (std ~0.15 here) by
    ~4e-4 against the stock fp32 ones, and a token whose k-th and (k+1)-th logits are
    that close may pick another expert in each (one such token, 3e-4 apart, moved the
    logits by 10% and every Qwen2-MoE gradient by 15%). Logit order is the routing order
    for every family here (DeepSeek-V3/GLM's correction bias is zero at init)."""
    k = reference.config.num_experts_per_tok
    seen = []
    routers = [m for n, m in reference.named_modules() if n.endswith(".mlp.gate")]
    hooks = [r.register_forward_hook(lambda mod, args, out: seen.append(out[0])) for r in routers]
    try:
        for seed in range(1, 100):
            seen.clear()
            b = batch(seed=seed, n=2, t=8)
            with torch.no_grad():
                reference(**b)
            top = torch.cat([x.float().reshape(-1, x.shape[-1]) for x in seen]).topk(k + 1, dim=-1).values
            if len(seen) == len(routers) and float((top[:, k - 1] - top[:, k]).min()) > margin:
                return b
    finally:
        for h in hooks:
            h.remove()
    raise AssertionError("no batch without a near routing tie")
