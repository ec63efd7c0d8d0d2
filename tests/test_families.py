"""Other transformers-5 MoE families through the same block forward: tiny random Qwen3-MoE,
Qwen2-MoE (shared expert with its sigmoid gate), Mixtral, DeepSeek-V3 and GLM-4-MoE, patched
on the CPU, against the stock model (logits and greedy tokens); families ktrs cannot run
refused at patch time; checkpoints that `from_pretrained` streams."""

import copy

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ktrs  # noqa: E402

from conftest import rel_l2  # noqa: E402
from test_patch_model import bf16_exact  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
              max_position_embeddings=128, num_experts_per_tok=2)


def qwen3():
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    return Qwen3MoeForCausalLM(Qwen3MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=48, num_experts=8,
                                              head_dim=16, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[]))


def qwen2():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    return Qwen2MoeForCausalLM(Qwen2MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=48, num_experts=8,
                                              shared_expert_intermediate_size=64, decoder_sparse_step=1, mlp_only_layers=[]))


def mixtral():
    from transformers import MixtralConfig, MixtralForCausalLM

    return MixtralForCausalLM(MixtralConfig(**COMMON, intermediate_size=48, num_local_experts=8))


def deepseek_v3():
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    return DeepseekV3ForCausalLM(DeepseekV3Config(**{**COMMON, "num_key_value_heads": 4}, intermediate_size=96, moe_intermediate_size=48, n_routed_experts=8,
                                                  n_shared_experts=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
                                                  qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1))


def glm4_moe():
    from transformers import Glm4MoeConfig, Glm4MoeForCausalLM

    return Glm4MoeForCausalLM(Glm4MoeConfig(**COMMON, intermediate_size=96, moe_intermediate_size=48, head_dim=16, n_routed_experts=8,
                                            n_shared_experts=1, first_k_dense_replace=0, n_group=1, topk_group=1))


@pytest.mark.parametrize("build", [qwen3, qwen2, mixtral, deepseek_v3, glm4_moe], ids=["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3", "glm4_moe"])
def test_family_matches_the_stock_model(build):
    torch.manual_seed(0)
    stock = bf16_exact(build()).eval()
    with torch.no_grad():  # weights large enough that the routed experts matter
        for name, p in stock.named_parameters():
            if ".experts." in name:
                p.mul_(4.0)
    stock = bf16_exact(stock)
    model = ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2)
    blocks = ktrs.find_moe_blocks(model)
    assert len(blocks) == 2 and all(isinstance(b.experts, ktrs.KtrsExperts) for _, b in blocks)
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = stock(ids).logits, model(ids).logits
        # The routed experts matter here: zeroing them moves the logits far more than
        # the tolerance below (so the comparison can fail).
        no_experts = copy.deepcopy(stock)
        for name, p in no_experts.named_parameters():
            if ".experts." in name:
                p.zero_()
        assert rel_l2(no_experts(ids).logits, want) > 0.1
    assert rel_l2(got, want) < 2e-2
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    got, want = model.generate(ids[:1], **kw), stock.generate(ids[:1], **kw)
    if not torch.equal(got, want):
        # Greedy paths may part only at a near tie of the stock model's top two logits
        # (bf16 experts round differently from the stock fp32 ones).
        first = int((got != want).nonzero()[0, 1])
        with torch.no_grad():
            top2 = stock(want[:, :first]).logits[0, -1].topk(2).values
        assert float(top2[0] - top2[1]) < 0.05, (first, top2)


def test_experts_ktrs_cannot_run_are_refused_at_patch_time():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    model = GptOssForCausalLM(cfg)
    with pytest.raises(ktrs.KtrsTypeError, match=r"GptOssForCausalLM: model\.layers\.0\.mlp\.experts \(GptOssExperts\) cannot run in ktrs: its experts have biases"):
        ktrs.patch_model(model, device="cpu", threads=2)


@pytest.mark.parametrize("build", [qwen3, qwen2], ids=["qwen3_moe", "qwen2_moe"])
def test_from_pretrained_streams_the_family_checkpoint(build, tmp_path):
    torch.manual_seed(0)
    stock = bf16_exact(build()).eval()
    stock.save_pretrained(str(tmp_path), max_shard_size="200KB")
    loaded = ktrs.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32, threads=2)
    assert len(ktrs.find_moe_blocks(loaded)) == 2
    ids = torch.randint(1, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert rel_l2(loaded(ids).logits, stock(ids).logits) < 2e-2


def test_from_pretrained_names_what_it_streams(tmp_path):
    torch.manual_seed(0)
    mixtral().save_pretrained(str(tmp_path))
    with pytest.raises(ktrs.KtrsValueError, match="'mixtral' checkpoint.*qwen3_moe.*patch_model"):
        ktrs.from_pretrained(str(tmp_path), device="cpu")
