"""LoRA fine-tuning through ktrs.get_peft_model and the stock HF Trainer, against an
unpatched reference model with the same LoRA computed by plain torch."""

import copy
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402
from transformers import DeepseekV2ForCausalLM  # noqa: E402

import ktrs  # noqa: E402
from ktrs.experts import LORA_NAMES  # noqa: E402
from ktrs.peft import _no_moe_target_rewrite  # noqa: E402

from conftest import rel_l2  # noqa: E402
from test_patch_model import bf16_exact, tiny_config  # noqa: E402

TARGETS = ["q_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_config(**kw):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS), **kw)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return bf16_exact(DeepseekV2ForCausalLM(tiny_config())).eval()


def patched_peft(base, seed=0):
    model = ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = ktrs.get_peft_model(model, lora_config())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # non-zero B everywhere, so every gradient is informative
        for n, p in pm.named_parameters():
            if p.requires_grad and ("lora_B" in n or n.endswith("_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return pm


def test_peft_targets_split_between_peft_and_ktrs(base):
    pm = patched_peft(base)
    trainable = {n for n, p in pm.named_parameters() if p.requires_grad}
    assert any("layers.1.mlp.shared_experts.gate_proj.lora_A" in n for n in trainable)
    assert any("layers.0.mlp.down_proj.lora_B" in n for n in trainable)  # dense layer 0
    assert any("layers.2.self_attn.q_proj.lora_A" in n for n in trainable)
    for layer in (1, 2):
        ex = pm.base_model.model.model.layers[layer].mlp.experts
        assert isinstance(ex, ktrs.KtrsExperts)  # PEFT did not wrap the routed experts
        assert ex.experts.lora_rank == 4 and ex.experts.lora_scaling == 2.0
        for n in LORA_NAMES:
            p = ex.lora[n]
            assert p.requires_grad and f"model.layers.{layer}.mlp.experts.lora_experts.{n}" in " ".join(trainable)
            assert p.data_ptr() == ex.experts.lora_weight(n).data_ptr()
    assert not any("experts.base_layer" in n or "mlp.gate.lora" in n for n in trainable)


def _ref_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """fp32 torch routed experts with LoRA (independent of ktrs)."""
    L, s = self.ref_lora, self.ref_scale
    i = self.gate_up_proj.shape[1] // 2
    out = torch.zeros_like(hidden_states)
    for e in top_k_index.unique().tolist():
        tok, slot = (top_k_index == e).nonzero(as_tuple=True)
        x = hidden_states[tok]
        gu = self.gate_up_proj[e]
        g = x @ gu[:i].T + s * (x @ L["gate_A"][e].T) @ L["gate_B"][e].T
        u = x @ gu[i:].T + s * (x @ L["up_A"][e].T) @ L["up_B"][e].T
        a = F.silu(g) * u
        y = a @ self.down_proj[e].T + s * (a @ L["down_A"][e].T) @ L["down_B"][e].T
        out = out.index_add(0, tok, y * top_k_weights[tok, slot, None].to(y.dtype))
    return out


def reference_like(pm, base):
    """Unpatched model with PEFT on the same modules and torch expert LoRA, same values."""
    ref = copy.deepcopy(base)
    with warnings.catch_warnings(), _no_moe_target_rewrite():
        warnings.simplefilter("ignore")
        rm = peft.get_peft_model(ref, lora_config())
    src = dict(pm.named_parameters())
    with torch.no_grad():
        for n, p in rm.named_parameters():
            if p.requires_grad:
                p.copy_(src[n])
    for layer in (1, 2):
        ex = rm.base_model.model.model.layers[layer].mlp.experts
        kx = pm.base_model.model.model.layers[layer].mlp.experts
        ex.ref_lora = torch.nn.ParameterDict({n: torch.nn.Parameter(kx.lora[n].detach().clone()) for n in LORA_NAMES})
        ex.ref_scale = kx.experts.lora_scaling
        ex.forward = types.MethodType(_ref_experts_forward, ex)
    return rm


def batch(seed=1, n=3, t=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 160, (n, t), generator=g)
    return {"input_ids": ids, "labels": ids.clone()}


def test_loss_and_every_lora_gradient_match_unpatched_reference(base):
    pm = patched_peft(base)
    rm = reference_like(pm, base)
    b = batch()
    loss = pm(**b).loss
    loss.backward()
    ref_loss = rm(**b).loss
    ref_loss.backward()
    assert abs(loss.item() - ref_loss.item()) < 1e-2 * abs(ref_loss.item())
    ref_params = dict(rm.named_parameters())
    checked = 0
    for n, p in pm.named_parameters():
        if not p.requires_grad:
            continue
        if ".lora_experts." in n:
            layer_path, name = n.split(".mlp.experts.lora_experts.")
            want = ref_params[f"{layer_path}.mlp.experts.ref_lora.{name}"].grad
        else:
            want = ref_params[n].grad
        assert p.grad is not None, n
        assert rel_l2(p.grad, want) < 3e-2, n
        checked += 1
    assert checked == len([1 for _, p in pm.named_parameters() if p.requires_grad])


def test_hf_trainer_trains_expert_and_peft_lora(base, tmp_path):
    from transformers import Trainer, TrainingArguments

    pm = patched_peft(base, seed=3)
    data = [batch(seed=s, n=1, t=12) for s in range(8)]
    data = [{k: v[0] for k, v in d.items()} for d in data]
    seen = {1: set(), 2: set()}
    for layer in (1, 2):
        ex = pm.base_model.model.model.layers[layer].mlp.experts

        def hook(mod, args, layer=layer):
            seen[layer].update(args[1].flatten().tolist())

        ex.register_forward_pre_hook(hook)
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if ".lora_experts." in n}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2, max_steps=30,
        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, max_grad_norm=1.0,
        lr_scheduler_type="constant", seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=pm, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    # Failure mode 10: every expert that received tokens must have trained its LoRA.
    for layer in (1, 2):
        assert seen[layer], layer
        for n in ("gate_A", "down_B"):
            key = f"base_model.model.model.layers.{layer}.mlp.experts.lora_experts.{n}"
            now = dict(pm.named_parameters())[key].detach()
            changed = (now - before[key]).flatten(1).abs().amax(1) > 0
            for e in seen[layer]:
                assert changed[e], (layer, n, e)
