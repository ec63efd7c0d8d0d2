"""Every transformers-5 MoE family through the same block forward: tiny random
DeepSeek-V2/V3, Qwen2-MoE (shared expert with its sigmoid gate), Qwen3-MoE, Mixtral and
GLM-4-MoE, patched on the CPU, against the stock model (logits and greedy tokens);
experts ktrs cannot run refused at patch time; checkpoints that `from_pretrained`
streams, with each family's stock key names."""

import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ktrs  # noqa: E402
from ktrs.families import FAMILIES  # noqa: E402

from conftest import rel_l2  # noqa: E402
from tiny_families import BUILDERS, stock_model, tie_free_batch  # noqa: E402


def inputs(reference):
    """Token ids on which `reference` routes no token near a tie (see tie_free_batch)."""
    return tie_free_batch(reference)["input_ids"]

FAMILY_NAMES = list(BUILDERS)


def test_every_family_has_a_tiny_model():
    assert sorted(BUILDERS) == sorted(FAMILIES)
    for name, build in BUILDERS.items():
        assert build().config.model_type == name


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)"))]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_family_matches_the_stock_model(family, device):
    """On CUDA the rest of the model runs on the GPU, the experts through the overlapped
    submit path and, in `generate`, the decode graphs."""
    stock = stock_model(family)
    model = ktrs.patch_model(copy.deepcopy(stock), device=device, threads=2)
    blocks = ktrs.find_moe_blocks(model)
    assert len(blocks) >= 2 and all(isinstance(b.experts, ktrs.KtrsExperts) for _, b in blocks)
    ids = inputs(stock)
    with torch.no_grad():
        want, got = stock(ids).logits, model(ids.to(device)).logits.cpu()
        # The routed experts matter here: zeroing them moves the logits far more than
        # the tolerance below (so the comparison can fail).
        no_experts = copy.deepcopy(stock)
        for name, p in no_experts.named_parameters():
            if ".experts." in name:
                p.zero_()
        assert rel_l2(no_experts(ids).logits, want) > 0.1
    assert rel_l2(got, want) < 2e-2
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    got, want = model.generate(ids[:1].to(device), **kw).cpu(), stock.generate(ids[:1], **kw)
    if not torch.equal(got, want):
        # Greedy paths may part only at a near tie of the stock model's top two logits
        # (bf16 experts round differently from the stock fp32 ones).
        first = int((got != want).nonzero()[0, 1])
        with torch.no_grad():
            top2 = stock(want[:, :first]).logits[0, -1].topk(2).values
        assert float(top2[0] - top2[1]) < 0.05, (first, top2)
    assert "routed experts in ktrs" in ktrs.describe(model)


def test_experts_ktrs_cannot_run_are_refused_at_patch_time():
    from transformers import GptOssConfig, GptOssForCausalLM

    torch.manual_seed(0)
    cfg = GptOssConfig(vocab_size=128, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2, layer_types=["full_attention"] * 2)
    model = GptOssForCausalLM(cfg)
    with pytest.raises(ktrs.KtrsTypeError, match=r"GptOssForCausalLM: model\.layers\.0\.mlp\.experts \(GptOssExperts\) cannot run in ktrs: its experts have biases"):
        ktrs.patch_model(model, device="cpu", threads=2)


@pytest.mark.parametrize(
    "flag, value, reason",
    [
        ("is_concatenated", False, "interleaved"),
        ("is_transposed", True, "transposed"),
        ("has_gate", False, "not gated"),
        ("has_post_expert_norm", True, "post-expert norm"),
    ],
)
def test_layouts_the_experts_interface_declares_are_refused(flag, value, reason):
    # transformers' `use_experts_implementation` declares these on the experts module.
    model = stock_model("qwen3_moe")
    setattr(model.model.layers[1].mlp.experts, flag, value)
    with pytest.raises(ktrs.KtrsTypeError, match=rf"Qwen3MoeForCausalLM: model\.layers\.1\.mlp\.experts \(Qwen3MoeExperts\) cannot run in ktrs: .*{reason}"):
        ktrs.patch_model(model, device="cpu", threads=2)
    assert not isinstance(model.model.layers[0].mlp.experts, ktrs.KtrsExperts)  # refused before patching anything


def test_experts_with_their_own_gate_function_are_refused():
    model = stock_model("mixtral")
    experts = model.model.layers[0].mlp.experts
    cls = type("ClampedExperts", (type(experts),), {"_apply_gate": lambda self, gu: gu.clamp(max=7.0)})
    experts.__class__ = cls
    with pytest.raises(ktrs.KtrsTypeError, match=r"\(ClampedExperts\) cannot run in ktrs: its experts use their own gate function"):
        ktrs.patch_model(model, device="cpu", threads=2)


def saved_keys(path):
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            return set(json.load(f)["weight_map"])
    from safetensors import safe_open

    with safe_open(os.path.join(path, "model.safetensors"), "pt") as f:
        return set(f.keys())


#: What transformers' save_pretrained writes for one routed expert, per family: the
#: original checkpoints' names (Mixtral's block_sparse_moe and w1/w2/w3).
EXPERT_KEY = {name: "model.layers.1.mlp.experts.3.gate_proj.weight" for name in FAMILY_NAMES}
EXPERT_KEY["mixtral"] = "model.layers.1.block_sparse_moe.experts.3.w1.weight"


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_from_pretrained_streams_the_family_checkpoint(family, tmp_path):
    stock = stock_model(family)
    stock.save_pretrained(str(tmp_path), max_shard_size="200KB")
    keys = saved_keys(str(tmp_path))
    assert EXPERT_KEY[family] in keys and not any("gate_up_proj" in k for k in keys)
    loaded = ktrs.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32, threads=2)
    patched = ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2)
    assert [n for n, _ in ktrs.find_moe_blocks(loaded)] == [n for n, _ in ktrs.find_moe_blocks(patched)]
    for (_, a), (_, b) in zip(ktrs.find_moe_blocks(loaded), ktrs.find_moe_blocks(patched)):
        for x in range(a.experts.experts.num_experts):
            assert all(torch.equal(p, q) for p, q in zip(a.experts.experts.get_expert(x), b.experts.experts.get_expert(x)))
    ids = inputs(stock)
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, patched(ids).logits)
        assert rel_l2(loaded(ids).logits, stock(ids).logits) < 2e-2


def test_from_pretrained_reads_fused_mixtral_names(tmp_path):
    stock = stock_model("mixtral")
    stock.save_pretrained(str(tmp_path), save_original_format=False)  # transformers 5's own names
    assert "model.layers.0.mlp.experts.gate_up_proj" in saved_keys(str(tmp_path))
    loaded = ktrs.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32, threads=2)
    ids = inputs(stock)
    with torch.no_grad():
        assert rel_l2(loaded(ids).logits, stock(ids).logits) < 2e-2


def test_from_pretrained_skips_layers_transformers_ignores(tmp_path):
    # DeepSeek-V3 checkpoints hold a multi-token-prediction layer (model.layers.61) that
    # the causal LM does not build; transformers skips it, and so must ktrs.
    from safetensors.torch import save_file

    stock = stock_model("deepseek_v3")
    stock.save_pretrained(str(tmp_path))
    extra = {"model.layers.61.mlp.experts.0.gate_proj.weight": torch.ones(48, 64), "model.layers.61.embed_tokens.weight": torch.ones(2, 64)}
    save_file(extra, str(tmp_path / "model-mtp.safetensors"))
    index = {"metadata": {}, "weight_map": {k: "model.safetensors" for k in saved_keys(str(tmp_path))}}
    index["weight_map"].update({k: "model-mtp.safetensors" for k in extra})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    loaded = ktrs.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32, threads=2)
    ids = inputs(stock)
    with torch.no_grad():
        assert rel_l2(loaded(ids).logits, stock(ids).logits) < 2e-2


def test_from_pretrained_names_what_it_streams(tmp_path):
    from transformers import GptOssConfig

    (tmp_path / "config.json").write_text(GptOssConfig(num_hidden_layers=1).to_json_string())
    with pytest.raises(ktrs.KtrsValueError, match=r"'gpt_oss' models; it supports deepseek_v2, .*mixtral.*patch_model"):
        ktrs.from_pretrained(str(tmp_path), device="cpu")


def test_blocks_that_do_more_are_refused_and_left_as_they_were():
    # Hunyuan-MoE's block adds a `shared_mlp` ktrs' block forward does not know: accepted
    # by structure, it would run silently wrong; the patch-time probe refuses it.
    from transformers import HunYuanMoEV1Config, HunYuanMoEV1ForCausalLM

    torch.manual_seed(0)
    model = HunYuanMoEV1ForCausalLM(HunYuanMoEV1Config(vocab_size=160, hidden_size=64, intermediate_size=48, num_hidden_layers=2,
                                                       num_attention_heads=4, num_key_value_heads=2, num_experts=8, moe_topk=2, head_dim=16)).eval()
    ids = torch.arange(1, 19).view(2, 9)
    with torch.no_grad():
        want = model(ids).logits
    with pytest.raises(ktrs.KtrsTypeError, match=r"HunYuanMoEV1ForCausalLM: model\.layers\.0\.mlp \(HunYuanMoEV1Moe\) cannot run in ktrs: its forward does more"):
        ktrs.patch_model(model, device="cpu", threads=2)
    assert not any(isinstance(b.experts, ktrs.KtrsExperts) for _, b in ktrs.find_moe_blocks(model))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, want)


def test_a_router_of_another_contract_is_refused():
    # A block whose router returns (weights, ids), as some families' do: its own forward
    # runs, the block forward ktrs installs (router logits, weights, ids) cannot.
    model = stock_model("qwen3_moe")
    block = model.model.layers[0].mlp
    route = block.gate.forward
    block.gate.forward = lambda h: route(h)[1:]

    def forward(self, hidden_states):
        flat = hidden_states.view(-1, hidden_states.shape[-1])
        weights, ids = self.gate(flat)
        return self.experts(flat, ids, weights).view(hidden_states.shape)

    block.__class__ = type("TwoTupleRouterBlock", (type(block),), {"forward": forward})
    with pytest.raises(ktrs.KtrsTypeError, match=r"model\.layers\.0\.mlp \(TwoTupleRouterBlock\) cannot run in ktrs: the block forward ktrs runs fails on it"):
        ktrs.patch_model(model, device="cpu", threads=2)
    assert not isinstance(block.experts, ktrs.KtrsExperts) and "forward" not in block.__dict__


def test_an_untested_family_with_the_common_block_runs():
    # OLMoE is not in ktrs.families (no checkpoint names), but its block is router plus
    # routed experts: patch_model runs it, matching the stock model.
    from transformers import OlmoeConfig, OlmoeForCausalLM

    torch.manual_seed(0)
    stock = OlmoeForCausalLM(OlmoeConfig(vocab_size=160, hidden_size=64, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, num_experts=8, num_experts_per_tok=2, eos_token_id=1, pad_token_id=0)).eval()
    model = ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2)
    assert all(isinstance(b.experts, ktrs.KtrsExperts) for _, b in ktrs.find_moe_blocks(model))
    ids = inputs(stock)
    with torch.no_grad():
        assert rel_l2(model(ids).logits, stock(ids).logits) < 2e-2
    with pytest.raises(ktrs.KtrsValueError, match="ktrs.export_merged: ktrs has no checkpoint names for 'olmoe' models"):
        ktrs.export_merged(model, "/nonexistent/never-written")


def test_a_block_whose_own_forward_fails_is_refused():
    model = stock_model("qwen3_moe")
    model.config._experts_implementation = "no-such-kernels"  # the experts interface raises
    with pytest.raises(ktrs.KtrsTypeError, match=r"Qwen3MoeForCausalLM: model\.layers\.0\.mlp \(Qwen3MoeSparseMoeBlock\): its own forward fails on a probe input"):
        ktrs.patch_model(model, device="cpu", threads=2)
    assert not isinstance(model.model.layers[0].mlp.experts, ktrs.KtrsExperts)
