"""LoRA on the routed experts alone (no attention or other PEFT targets), through the
PEFT API, on every family, against stock PEFT on the stock, unpatched model: training,
save_pretrained, loading both ways, and PEFT's adapter controls."""

import copy
import json
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig, PeftModel  # noqa: E402

import ktrs  # noqa: E402

from conftest import rel_l2  # noqa: E402
from test_family_finetune import ALPHA, R, family, logits, stock  # noqa: E402,F401 (fixtures: one per family)
from test_finetune import randomize_b  # noqa: E402
from tiny_families import stock_model, tie_free_batch  # noqa: E402


def expert_only():
    return LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_parameters=["gate_up_proj", "down_proj"])


def patched(stock):
    return ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2)


def saved(path):
    from safetensors.torch import load_file

    with open(f"{path}/adapter_config.json") as f:
        cfg = json.load(f)
    return cfg, {k: tuple(v.shape) for k, v in load_file(f"{path}/adapter_model.safetensors").items()}


def train(pm, b, steps=3):
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-2)
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        pm(**b).loss.backward()
        opt.step()


def test_train_save_and_load_both_ways(family, stock, tmp_path):
    b = tie_free_batch(stock)
    pm = ktrs.get_peft_model(patched(stock), expert_only())
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_experts." in n for n in trainable), sorted(trainable)[:4]
    base = logits(pm, b)
    train(pm, b)
    want = logits(pm, b)
    assert rel_l2(want, base) > 1e-2  # the expert LoRA trained and moves the logits
    pm.save_pretrained(str(tmp_path / "ktrs"))

    # The file stock PEFT writes for the same config on the stock model: same config
    # targets, same tensor names; down_proj's shapes are the same, gate_up's rank is 2r
    # (ktrs keeps gate and up A apart; rank_pattern says so, stock PEFT reads it).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(stock), expert_only())
    theirs.save_pretrained(str(tmp_path / "stock"))
    cfg_k, keys_k = saved(tmp_path / "ktrs")
    cfg_s, keys_s = saved(tmp_path / "stock")
    assert set(keys_k) == set(keys_s)
    # [] where PEFT's transformers-5 conversion ran on the stock model, else null: both mean none
    assert not cfg_k["target_modules"] and not cfg_s["target_modules"]
    assert sorted(cfg_k["target_parameters"]) == sorted(cfg_s["target_parameters"])
    for k, shape in keys_s.items():
        if ".base_layer." in k:  # gate_up: [E·r, H] / [2I, E·r] in stock, rank 2r in ktrs
            assert keys_k[k] == (2 * shape[0], shape[1]) if k.endswith("lora_A.weight") else keys_k[k] == (shape[0], 2 * shape[1]), k
        else:
            assert keys_k[k] == shape, k

    # (a) into a fresh ktrs model
    again = ktrs.load_adapter(patched(stock), str(tmp_path / "ktrs"))
    assert rel_l2(logits(again, b), want) < 1e-5
    # (b) into the stock model through stock PEFT, as it ships; on a batch without routing
    # near-ties under the trained adapter (ktrs' bf16 experts vs stock fp32 could route it
    # differently)
    plain = PeftModel.from_pretrained(copy.deepcopy(stock), str(tmp_path / "ktrs"))
    b2 = tie_free_batch(plain)
    assert rel_l2(logits(plain, b2), logits(pm, b2)) < 2e-2


def test_an_expert_only_adapter_made_by_stock_peft_loads_into_ktrs(family, stock, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(stock), expert_only())
    randomize_b(theirs, 5)
    theirs.save_pretrained(str(tmp_path))
    b = tie_free_batch(stock)
    want = logits(theirs, b)
    assert rel_l2(want, logits(stock, b)) > 3e-2  # the adapter matters
    ours = ktrs.load_adapter(patched(stock), str(tmp_path))
    assert rel_l2(logits(ours, b), want) < 2e-2
    # and the ktrs model written back out loads in stock PEFT with the same logits
    ours.save_pretrained(str(tmp_path / "back"))
    plain = PeftModel.from_pretrained(copy.deepcopy(stock), str(tmp_path / "back"))
    assert rel_l2(logits(plain, b), want) < 2e-2


@pytest.mark.parametrize("fam, targets", [("qwen3_moe", ["gate_proj", "up_proj", "down_proj"]), ("mixtral", ["w1", "w2", "w3"])])
def test_mlp_leaf_targets_in_a_model_without_shared_experts_mean_expert_only(fam, targets, tmp_path):
    # These match no module of PEFT's here (no shared experts or dense MLPs; Mixtral's
    # transformers-4 expert names): stock PEFT moves them onto the routed experts, ktrs does
    # the same. For this spelling stock PEFT makes gate_up rank 2r too: the files match
    # tensor for tensor.
    stock = stock_model(fam)
    cfg = LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=targets)
    pm = ktrs.get_peft_model(patched(stock), cfg)
    experts = [m for m in pm.modules() if isinstance(m, ktrs.KtrsExperts)]
    assert experts and all(ex.experts.lora_rank == R for ex in experts)
    assert all(".lora_experts." in n for n, p in pm.named_parameters() if p.requires_grad)
    randomize_b(pm, 6)
    pm.save_pretrained(str(tmp_path / "ktrs"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = peft.get_peft_model(copy.deepcopy(stock), cfg)
    theirs.save_pretrained(str(tmp_path / "stock"))
    assert saved(tmp_path / "ktrs")[1] == saved(tmp_path / "stock")[1]
    plain = PeftModel.from_pretrained(copy.deepcopy(stock), str(tmp_path / "ktrs"))
    b = tie_free_batch(plain)
    assert rel_l2(logits(plain, b), logits(pm, b)) < 2e-2
    assert rel_l2(logits(plain, b), logits(stock, b)) > 3e-2


def test_peft_adapter_controls_reach_expert_only_lora(tmp_path):
    # failure-modes row 11: PEFT's adapter controls reach expert-only LoRA, against the stock model.
    from peft.tuners.tuners_utils import BaseTunerLayer
    import peft.functional as pf

    stock = stock_model("deepseek_v2")
    b = tie_free_batch(stock)
    pm = ktrs.get_peft_model(patched(stock), expert_only())
    randomize_b(pm, 3)
    want, plain = logits(pm, b), logits(stock, b)
    assert rel_l2(want, plain) > 3e-2
    experts = [m for m in pm.modules() if isinstance(m, ktrs.KtrsExperts)]
    assert experts and all(isinstance(ex, BaseTunerLayer) for ex in experts)

    status = pm.get_model_status()
    assert status.num_adapter_layers == len(experts) and status.enabled is True and status.active_adapters == ["default"]
    with pm.disable_adapter():
        assert pm.get_model_status().enabled is False
        assert rel_l2(logits(pm, b), plain) < 2e-2
    assert rel_l2(logits(pm, b), want) < 1e-6

    pm.merge_adapter()
    assert pm.get_model_status().merged_adapters == ["default"]
    assert rel_l2(logits(pm, b), want) < 1e-6
    pm.unmerge_adapter()
    assert pm.get_model_status().merged_adapters == []

    # a second expert-only adapter: PEFT's set_adapter and peft.functional.set_adapter switch
    pm.add_adapter("other", expert_only())
    assert pm.get_model_status().available_adapters == ["default", "other"]
    pm.set_adapter("other")
    other = logits(pm, b)  # fresh LoRA: B = 0, so the base model
    assert rel_l2(other, plain) < 2e-2
    assert all(p.requires_grad for ex in experts for p in ex.lora_experts.values())
    pf.set_adapter(pm, "default")
    assert rel_l2(logits(pm, b), want) < 1e-6
    pf.set_requires_grad(pm, "default", requires_grad=False)
    assert not any(p.requires_grad for ex in experts for p in ex.lora_experts.values())
    pf.set_requires_grad(pm, "default", requires_grad=True)
    pm.set_adapter("other")
    pm.delete_adapter("default")
    assert pm.get_model_status().available_adapters == ["other"]
    assert rel_l2(logits(pm, b), plain) < 2e-2


def test_resume_merge_and_unload_of_expert_only_lora(tmp_path):
    # failure-modes row 5: merge_and_unload of expert-only LoRA keeps the adapted logits.
    stock = stock_model("deepseek_v2")
    b = tie_free_batch(stock)
    pm = ktrs.get_peft_model(patched(stock), expert_only())
    randomize_b(pm, 4)
    want = logits(pm, b)
    pm.save_pretrained(str(tmp_path))
    params = list(ktrs.expert_lora_parameters(pm))
    with torch.no_grad():
        for p in params:
            p.zero_()
    pm.load_adapter(str(tmp_path), "default", is_trainable=True)  # what the Trainer's resume does
    assert list(ktrs.expert_lora_parameters(pm)) == params  # in place: optimizer state still maps
    assert rel_l2(logits(pm, b), want) < 1e-6
    merged = pm.merge_and_unload()
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    assert rel_l2(logits(merged, b), want) < 2e-2
    assert rel_l2(logits(merged, b), logits(stock, b)) > 3e-2


def test_expert_only_configs_ktrs_cannot_run_get_ktrs_errors():
    stock = stock_model("deepseek_v2")
    with pytest.raises(ktrs.KtrsValueError, match="lora_dropout"):
        ktrs.get_peft_model(patched(stock), LoraConfig(r=R, lora_alpha=ALPHA, lora_dropout=0.1, target_parameters=["gate_up_proj", "down_proj"]))
    with pytest.raises(ktrs.KtrsValueError, match="targets nothing"):
        ktrs.get_peft_model(patched(stock), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=[]))


@pytest.mark.parametrize(
    "cfg",
    [
        dict(target_parameters=["gate_up_proj", "down_proj"]),
        dict(target_modules=["q_proj"], target_parameters=["gate_up_proj", "down_proj"]),
        # PEFT's transformers-5 MoE rewrite turns these into routed-expert target_parameters
        dict(target_modules=["q_proj", "gate_proj", "up_proj", "down_proj"]),
    ],
)
def test_stock_peft_on_a_ktrs_model_refuses_expert_targets_before_changing_anything(cfg):
    # failure-modes row 6: stock PEFT cannot wrap ktrs' routed experts; it is refused up front.
    stock = stock_model("deepseek_v2")
    model = patched(stock)
    with pytest.raises(ktrs.KtrsValueError, match=r"target_parameters=.*ktrs.get_peft_model"):
        peft.get_peft_model(model, LoraConfig(r=R, lora_alpha=ALPHA, **cfg))
    assert type(model.model.layers[1].self_attn.q_proj) is torch.nn.Linear  # nothing was wrapped
    # what PEFT can do on its own still works, and ktrs' call takes the same config
    peft.get_peft_model(patched(stock), LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["q_proj"]))
    ktrs.get_peft_model(patched(stock), LoraConfig(r=R, lora_alpha=ALPHA, **cfg))


def test_stock_peft_from_pretrained_on_a_ktrs_model_names_ktrs_load_adapter(tmp_path):
    # failure-modes row 7: PeftModel.from_pretrained on a ktrs model points to ktrs.load_adapter.
    stock = stock_model("deepseek_v2")
    ktrs.get_peft_model(patched(stock), expert_only()).save_pretrained(str(tmp_path))
    with pytest.raises(ktrs.KtrsValueError, match="ktrs.load_adapter"):
        PeftModel.from_pretrained(patched(stock), str(tmp_path))


def test_hf_trainer_trains_checkpoints_and_resumes_expert_only_lora(tmp_path):
    from transformers import Trainer, TrainingArguments

    from test_finetune import batch

    stock = stock_model("deepseek_v2")
    data = [{k: v[0] for k, v in batch(seed=s, n=1, t=12).items()} for s in range(8)]

    def run(out, max_steps, resume=None):
        pm = ktrs.get_peft_model(patched(stock), expert_only())
        randomize_b(pm, 9)
        args = TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=3e-3,
            logging_steps=1, save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, seed=0,
            lr_scheduler_type="constant", disable_tqdm=True, data_seed=0,
        )
        tr = Trainer(model=pm, args=args, train_dataset=data)
        start = [p.detach().clone() for p in ktrs.expert_lora_parameters(pm)]
        tr.train(resume_from_checkpoint=resume)
        assert any(not torch.equal(a, p) for a, p in zip(start, ktrs.expert_lora_parameters(pm)))  # it trained them
        return [h["loss"] for h in tr.state.log_history if "loss" in h], pm

    full, pm_full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    cfg, keys = saved(tmp_path / "b" / "checkpoint-2")
    assert cfg["target_parameters"] and any(".mlp.experts.lora_A.weight" in k for k in keys)
    assert not any(".lora_experts." in k for k in keys)
    resumed, pm_res = run(tmp_path / "c", 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert resumed[2:] == pytest.approx(full[2:], rel=1e-4)
    a = dict(pm_full.named_parameters())
    moved = 0
    for n, p in pm_res.named_parameters():
        if ".lora_experts." in n:
            torch.testing.assert_close(p, a[n], rtol=1e-4, atol=1e-6)
            moved += 1
    assert moved
