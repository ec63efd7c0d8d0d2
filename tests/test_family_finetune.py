"""LoRA on every family against stock PEFT on the stock, unpatched model (its routed
experts in torch, their LoRA in PEFT's fused-parameter wrappers): loss and every LoRA
gradient, adapters both ways through stock PEFT, and `export_merged` loading in stock
transformers."""

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel  # noqa: E402

import ktrs  # noqa: E402
from ktrs.experts import LORA_NAMES  # noqa: E402
from ktrs.families import FAMILIES  # noqa: E402
from ktrs.peft import _no_moe_target_rewrite  # noqa: E402

from conftest import rel_l2  # noqa: E402
from test_families import EXPERT_KEY, saved_keys  # noqa: E402
from test_finetune import randomize_b  # noqa: E402
from tiny_families import BUILDERS, stock_model, tie_free_batch  # noqa: E402

R, ALPHA = 4, 8


@pytest.fixture(scope="module", params=list(BUILDERS))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def stock(family):
    return stock_model(family)


def logits(model, b):
    with torch.no_grad():
        return model(**b).logits


def ktrs_peft(stock, config, seed, device="cpu"):
    """The stock model patched, with `config`'s LoRA (B random, so every gradient is informative)."""
    model = ktrs.patch_model(copy.deepcopy(stock), device=device, threads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = ktrs.get_peft_model(model, config)
    randomize_b(pm, seed)
    return pm


def every_target(family):
    """Attention, shared-expert, dense-MLP and routed-expert LoRA: the `ktrs train` default."""
    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(FAMILIES[family].lora_targets))


def stock_peft_targets(family):
    """Targets stock PEFT keeps as they are: attention plus the fused expert parameters."""
    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=list(FAMILIES[family].attention_targets),
                      target_parameters=["gate_up_proj", "down_proj"])


def peft_expert_grads(wrapper_gu, wrapper_dn, E):
    """ktrs-shaped gradients from stock PEFT's fused expert LoRA gradients (PEFT's layout:
    A [E·r, in] expert-major, B [out, r·E] expert-minor). ktrs' gate_up LoRA is PEFT's rank
    2r with gate and up in separate halves of A and diagonal blocks of B."""
    a_gu = wrapper_gu.lora_A["default"].weight.grad
    b_gu = wrapper_gu.lora_B["default"].weight.grad
    a_dn = wrapper_dn.lora_A["default"].weight.grad
    b_dn = wrapper_dn.lora_B["default"].weight.grad
    two_i, h = b_gu.shape[0], a_gu.shape[1]
    i, r = two_i // 2, a_gu.shape[0] // E // 2
    a_gu = a_gu.reshape(E, 2 * r, h)
    b_gu = b_gu.reshape(two_i, 2 * r, E).permute(2, 0, 1)
    return {
        "gate_A": a_gu[:, :r], "up_A": a_gu[:, r:], "gate_B": b_gu[:, :i, :r], "up_B": b_gu[:, i:, r:],
        "down_A": a_dn.reshape(E, r, i), "down_B": b_dn.reshape(h, r, E).permute(2, 0, 1),
    }


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)"))])
def test_loss_and_every_lora_gradient_match_stock_peft(family, stock, device, tmp_path):
    """On CUDA the expert calls are stream work (stream_call.py) against stock PEFT on the CPU."""
    pm = ktrs_peft(stock, every_target(family), seed=1, device=device)
    pm.save_pretrained(str(tmp_path))  # carries the same values to stock PEFT
    # Stock PEFT, without its transformers-5 MoE target rewrite (which would move the
    # shared-expert and dense-MLP targets onto the routed experts, peft#3711).
    with warnings.catch_warnings(), _no_moe_target_rewrite():
        warnings.simplefilter("ignore")
        rm = PeftModel.from_pretrained(copy.deepcopy(stock), str(tmp_path), is_trainable=True)
    b = tie_free_batch(rm)
    loss = pm(**{k: v.to(device) for k, v in b.items()}).loss
    loss.backward()
    ref_loss = rm(**b).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-2 * abs(ref_loss.item())
    ref = dict(rm.named_parameters())
    checked = set()
    for n, p in pm.named_parameters():
        if p.requires_grad and ".lora_experts." not in n:
            assert p.grad is not None and rel_l2(p.grad.cpu(), ref[n].grad) < 3e-2, n
            checked.add(n)
    assert any(".self_attn." in n for n in checked)
    if family not in ("qwen3_moe", "mixtral"):
        assert any(".shared_expert" in n or ".mlp.gate_proj" in n for n in checked)
    for name, block in ktrs.find_moe_blocks(pm):
        ex = block.experts
        peft_block = rm.get_submodule(name)
        scale = {w.scaling["default"] for w in (peft_block.experts, peft_block.experts.base_layer)}
        assert scale == {ex.experts.lora_scaling}  # so ktrs and PEFT gradients agree unscaled
        want = peft_expert_grads(peft_block.experts.base_layer, peft_block.experts, ex.experts.num_experts)
        for n in LORA_NAMES:
            assert ex.lora[n].grad is not None and rel_l2(ex.lora[n].grad, want[n]) < 3e-2, (name, n)
            checked.add(f"{name}.{n}")
    assert len(checked) == sum(p.requires_grad for p in pm.parameters())


def test_adapter_round_trip_through_stock_peft(family, stock, tmp_path):
    pm = ktrs_peft(stock, stock_peft_targets(family), seed=11)
    pm.save_pretrained(str(tmp_path / "ktrs"))
    plain = PeftModel.from_pretrained(copy.deepcopy(stock), str(tmp_path / "ktrs"))  # stock PEFT, as it ships
    b = tie_free_batch(plain)
    want = logits(pm, b)
    assert rel_l2(logits(plain, b), want) < 2e-2
    again = ktrs.load_adapter(ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2), str(tmp_path / "ktrs"))
    assert rel_l2(logits(again, b), want) < 1e-5
    with torch.no_grad():  # the check is sensitive: the expert LoRA alone moves the logits
        for p in ktrs.expert_lora_parameters(pm):
            p.zero_()
    assert rel_l2(logits(pm, b), want) > 3e-2
    # and an adapter stock PEFT trained (gate and up share A) into ktrs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(stock), stock_peft_targets(family))
    randomize_b(theirs, 12)
    theirs.save_pretrained(str(tmp_path / "stock"))
    loaded = ktrs.load_adapter(ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2), str(tmp_path / "stock"))
    b = tie_free_batch(theirs)
    assert rel_l2(logits(loaded, b), logits(theirs, b)) < 2e-2


def test_export_merged_loads_in_stock_transformers(family, stock, tmp_path):
    from transformers import AutoModelForCausalLM

    pm = ktrs_peft(stock, every_target(family), seed=21)
    pm.save_pretrained(str(tmp_path / "adapter"))
    with warnings.catch_warnings(), _no_moe_target_rewrite():  # only to pick a batch without routing ties
        warnings.simplefilter("ignore")
        b = tie_free_batch(PeftModel.from_pretrained(copy.deepcopy(stock), str(tmp_path / "adapter")))
    want = logits(pm, b)
    ktrs.export_merged(pm, str(tmp_path / "merged"))
    stock.save_pretrained(str(tmp_path / "stock"))
    # The family's own checkpoint names, exactly what transformers writes.
    assert saved_keys(str(tmp_path / "merged")) == saved_keys(str(tmp_path / "stock"))
    assert EXPERT_KEY[family] in saved_keys(str(tmp_path / "merged"))
    merged = AutoModelForCausalLM.from_pretrained(str(tmp_path / "merged"), dtype=torch.float32).eval()
    assert type(merged) is type(stock)
    assert rel_l2(logits(merged, b), want) < 2e-2
    assert rel_l2(logits(stock, b), want) > 5e-2  # the adapters mattered


def test_transformers4_mixtral_adapter_loads_as_stock_peft_loads_it(tmp_path):
    # An adapter trained on transformers 4's per-expert Mixtral (`block_sparse_moe.experts.E.w1`,
    # targets w1/w2/w3): stock PEFT converts it onto the fused experts, and so does ktrs.
    import json

    from safetensors.torch import save_file

    stock = stock_model("mixtral")
    cfg = stock.config
    H, I, E = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
    g = torch.Generator().manual_seed(5)
    shapes = {"w1": (I, H), "w3": (I, H), "w2": (H, I)}
    weights = {}
    for layer in range(cfg.num_hidden_layers):
        for e in range(E):
            for w, (out, inp) in shapes.items():
                key = f"base_model.model.model.layers.{layer}.block_sparse_moe.experts.{e}.{w}"
                weights[f"{key}.lora_A.weight"] = torch.randn(R, inp, generator=g) * inp**-0.5
                weights[f"{key}.lora_B.weight"] = torch.randn(out, R, generator=g) * 0.05
        for proj in ("q_proj", "o_proj"):
            mod = stock.get_submodule(f"model.layers.{layer}.self_attn.{proj}")
            key = f"base_model.model.model.layers.{layer}.self_attn.{proj}"
            weights[f"{key}.lora_A.weight"] = torch.randn(R, mod.in_features, generator=g) * 0.1
            weights[f"{key}.lora_B.weight"] = torch.randn(mod.out_features, R, generator=g) * 0.05
    save_file(weights, str(tmp_path / "adapter_model.safetensors"))
    config = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "o_proj", "w1", "w2", "w3"]).to_dict()
    (tmp_path / "adapter_config.json").write_text(json.dumps({k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}))
    theirs = PeftModel.from_pretrained(copy.deepcopy(stock), str(tmp_path))
    assert isinstance(theirs.base_model.model.model.layers[0].mlp.experts.base_layer.lora_A["default"].weight, torch.Tensor)
    ours = ktrs.load_adapter(ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2), str(tmp_path))
    b = tie_free_batch(theirs)
    want = logits(theirs, b)
    assert rel_l2(logits(ours, b), want) < 2e-2
    with torch.no_grad():  # the expert LoRA mattered
        for p in ktrs.expert_lora_parameters(ours):
            p.zero_()
    assert rel_l2(logits(ours, b), want) > 3e-2
