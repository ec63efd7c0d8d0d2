"""PEFT's adapter controls reach the expert LoRA (failure-modes row 11), checked against
stock PEFT on the unpatched model: the same adapters, the same controls, the same logits.

`disable_adapter()` (TRL's DPO reference pass), `merge_adapter`/`unmerge_adapter`,
several named adapters with `set_adapter`, and `delete_adapter`."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from transformers import DeepseekV2ForCausalLM  # noqa: E402

import ktrs  # noqa: E402

from conftest import rel_l2  # noqa: E402
from test_finetune import EXPERT_CFG, logits, randomize_b  # noqa: E402
from test_patch_model import bf16_exact, tiny_config  # noqa: E402

# Stock PEFT's fused gate_up LoRA against ktrs' (bf16 experts, f32 LoRA): what
# test_finetune allows for the same comparison.
TOL = 2e-2


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return bf16_exact(DeepseekV2ForCausalLM(tiny_config())).eval()


@pytest.fixture(scope="module")
def adapters(base, tmp_path_factory):
    """Two adapters trained (randomised) by stock PEFT on the unpatched model, with
    expert LoRA, attention LoRA and different values."""
    dirs = {}
    for name, seed in (("default", 31), ("other", 32)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stock = peft.get_peft_model(copy.deepcopy(base), LoraConfig(**EXPERT_CFG))
        randomize_b(stock, seed)
        d = tmp_path_factory.mktemp(name)
        stock.save_pretrained(str(d))
        dirs[name] = str(d)
    return dirs


def stock_model(base, adapters):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = peft.PeftModel.from_pretrained(copy.deepcopy(base), adapters["default"])
        m.load_adapter(adapters["other"], adapter_name="other")
    return m.eval()


def ktrs_model(base, adapters):
    pm = ktrs.load_adapter(ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2), adapters["default"])
    pm.load_adapter(adapters["other"], adapter_name="other")
    return pm.eval()


def same(pm, stock, what):
    got, want = logits(pm), logits(stock)
    assert rel_l2(got, want) < TOL, what
    return want


def test_disable_adapter_gives_the_base_model(base, adapters):
    # failure-modes row 11: disable_adapter() switches the expert LoRA off too, as stock PEFT.
    stock, pm = stock_model(base, adapters), ktrs_model(base, adapters)
    on = same(pm, stock, "adapter on")
    with stock.disable_adapter():
        off = logits(stock)
    with pm.disable_adapter():
        got = logits(pm)
        assert not any(ex.lora_active for ex in ktrs.peft._ktrs_experts(pm))
    assert rel_l2(off, logits(base)) < 1e-5  # stock's disabled model is the base model
    assert rel_l2(got, off) < TOL
    assert rel_l2(on, off) > 10 * TOL  # the adapters matter: the check can fail
    same(pm, stock, "adapter back on")
    # Only the expert LoRA left on would show: the routed experts alone must follow.
    pm.base_model.disable_adapter_layers()
    stock.base_model.disable_adapter_layers()
    same(pm, stock, "disable_adapter_layers")
    pm.base_model.enable_adapter_layers()
    stock.base_model.enable_adapter_layers()
    same(pm, stock, "enable_adapter_layers")


def test_disable_adapter_keeps_training_gradients_right(base, adapters):
    # failure-modes row 11: the DPO order (policy pass, reference pass off, backward) keeps gradients right.
    pm = ktrs.load_adapter(ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2), adapters["default"], is_trainable=True)
    b = {"input_ids": torch.arange(12).reshape(2, 6) % 160}
    # DPO order: policy forward with the adapter, reference forward without, one backward.
    loss = pm(**b).logits.float().pow(2).mean()
    with pm.disable_adapter(), torch.no_grad():
        pm(**b)
    loss.backward()
    grads = [p.grad for p in ktrs.expert_lora_parameters(pm)]
    assert all(g is not None and g.abs().sum() > 0 for g in grads)
    # A forward under disable_adapter gives the expert LoRA no gradient (as PEFT's layers).
    pm.zero_grad(set_to_none=True)
    emb = pm.get_input_embeddings()(b["input_ids"]).detach().requires_grad_()
    with pm.disable_adapter():
        pm(inputs_embeds=emb).logits.float().pow(2).mean().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0
    assert all(p.grad is None for p in ktrs.expert_lora_parameters(pm))


def test_merge_and_unmerge_adapter(base, adapters):
    # failure-modes row 11: merge_adapter/unmerge_adapter, against stock PEFT.
    stock, pm = stock_model(base, adapters), ktrs_model(base, adapters)
    on = same(pm, stock, "before merge")
    stock.merge_adapter()
    pm.merge_adapter()
    same(pm, stock, "merged")
    with stock.disable_adapter():
        off = logits(stock)
    with pm.disable_adapter():
        assert rel_l2(logits(pm), off) < TOL, "disable_adapter while merged"
    stock.unmerge_adapter()
    pm.unmerge_adapter()
    assert rel_l2(same(pm, stock, "unmerged"), on) < 1e-4
    assert not any(ex.lora_merged for ex in ktrs.peft._ktrs_experts(pm))


def test_set_adapter_switches_the_expert_lora_too(base, adapters):
    # failure-modes row 11: set_adapter between two named adapters switches the expert LoRA.
    stock, pm = stock_model(base, adapters), ktrs_model(base, adapters)
    first = same(pm, stock, "default")
    stock.set_adapter("other")
    pm.set_adapter("other")
    second = same(pm, stock, "other")
    assert rel_l2(first, second) > 10 * TOL  # the adapters differ, so the check can fail
    assert all(ex.expert_adapter == "other" for ex in ktrs.peft._ktrs_experts(pm))
    stock.set_adapter("default")
    pm.set_adapter("default")
    assert rel_l2(same(pm, stock, "default again"), first) < 1e-5


def test_delete_adapter(base, adapters):
    # failure-modes row 11: delete_adapter drops the expert LoRA, as stock PEFT.
    stock, pm = stock_model(base, adapters), ktrs_model(base, adapters)
    for m in (stock, pm):
        m.set_adapter("other")
        m.delete_adapter("other")  # PEFT falls back to the remaining adapter
    same(pm, stock, "after deleting the active adapter")
    assert all(ex.adapter_names() == ["default"] for ex in ktrs.peft._ktrs_experts(pm))
    with pytest.raises(ValueError):
        pm.set_adapter("other")


def test_a_merged_adapter_cannot_be_deleted(base, adapters):
    pm = ktrs_model(base, adapters)
    pm.merge_adapter()
    with pytest.raises(ValueError, match="merged"):
        pm.delete_adapter("default")


def test_an_adapter_without_expert_lora_runs_the_base_experts(base, adapters, tmp_path):
    # A second adapter that targets attention only: while it is active the routed experts
    # run without LoRA (as PEFT's layers of the first adapter do), also once merged.
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "o_proj"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        attn = peft.get_peft_model(copy.deepcopy(base), cfg)
    randomize_b(attn, 33)
    attn.save_pretrained(str(tmp_path))
    stock, pm = stock_model(base, adapters), ktrs_model(base, adapters)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock.load_adapter(str(tmp_path), adapter_name="attn")
    pm.load_adapter(str(tmp_path), adapter_name="attn")
    stock.set_adapter("attn")
    pm.set_adapter("attn")
    want = same(pm, stock, "attention-only adapter active")
    assert not any(ex.lora_active for ex in ktrs.peft._ktrs_experts(pm))
    merged_stock, merged = stock.merge_and_unload(), pm.merge_and_unload()
    assert rel_l2(logits(merged), logits(merged_stock)) < TOL
    assert rel_l2(logits(merged), want) < TOL


def test_add_adapter_with_expert_targets_gets_its_own_expert_lora(base, adapters):
    # PEFT alone would match nothing on ktrs' experts and say so only in a warning.
    pm = ktrs_model(base, adapters)
    first = logits(pm)
    pm.add_adapter("fresh", LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0, target_modules=["o_proj"], target_parameters=["gate_up_proj", "down_proj"]))
    assert all("fresh" in ex.adapter_names() for ex in ktrs.peft._ktrs_experts(pm))
    pm.set_adapter("fresh")
    for ex in ktrs.peft._ktrs_experts(pm):
        assert ex.expert_adapter == "fresh" and ex.experts.lora_rank == 2 and ex.experts.lora_scaling == 2.0
        assert all(p.requires_grad for p in ex.lora_experts.values())
        assert (ex.lora["down_B"] == 0).all() and (ex.lora["gate_A"] != 0).any()  # PEFT's init
    got = logits(pm)
    with pm.disable_adapter():  # B = 0 everywhere: "fresh" is the (patched) base model
        assert rel_l2(got, logits(pm)) < 1e-6
    pm.set_adapter("default")
    assert rel_l2(logits(pm), first) < 1e-6


def test_a_config_that_targets_only_the_routed_experts_is_accepted(base):
    # Expert-only LoRA used to be refused (PEFT had no module of its own to wrap); it is
    # covered in depth by tests/test_peft_expert_only.py.
    model = ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2)
    pm = ktrs.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_parameters=["gate_up_proj", "down_proj"]))
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_experts." in n for n in trainable)


def test_a_config_that_targets_nothing_gets_a_ktrs_error_naming_the_arguments(base):
    model = ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2)
    with pytest.raises(ktrs.KtrsValueError, match="target_parameters") as info:
        ktrs.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=[]))
    assert "target_modules" in str(info.value)


def test_mixtral_w1_w2_w3_targets_mean_the_routed_experts():
    """transformers-4 Mixtral adapters name the routed experts w1/w2/w3; stock PEFT puts
    their LoRA on the experts, so ktrs.get_peft_model gives them expert LoRA in ktrs."""
    from tiny_families import mixtral

    torch.manual_seed(0)
    model = ktrs.patch_model(mixtral(), device="cpu", threads=2)
    pm = ktrs.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "w1", "w2", "w3"]))
    experts = [m for m in pm.modules() if isinstance(m, ktrs.KtrsExperts)]
    assert experts and all(ex.experts.lora_rank == 4 for ex in experts)
    assert all(p.requires_grad for ex in experts for p in ex.lora_experts.values())
    wrapped = {n.rsplit(".", 1)[-1] for n, m in pm.named_modules() if hasattr(m, "lora_A") and len(m.lora_A)}
    assert wrapped == {"q_proj"}
