"""Tests for bugs the rest of the suite let through when planted one at a time (issue 14),
and the rsLoRA Trainer-resume bug. Each test names the bug it catches."""

import copy
import gc
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
from peft import LoraConfig  # noqa: E402

import ktrs  # noqa: E402
from ktrs.experts import LORA_NAMES  # noqa: E402

from conftest import build, make_problem, reference, rel_l2  # noqa: E402
from test_finetune import TARGETS, batch, logits, patched_peft, randomize_b  # noqa: E402
from test_patch_model import bf16_exact, tiny_config  # noqa: E402


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return bf16_exact(transformers.DeepseekV2ForCausalLM(tiny_config())).eval()


def rslora_peft(base, seed=0):
    model = ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = ktrs.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS), use_rslora=True))
    randomize_b(pm, seed)
    return pm


def test_get_peft_model_keeps_use_rslora(base):
    # Bug: get_peft_model dropping `use_rslora` (expert LoRA scaled alpha/r, PEFT's alpha/sqrt(r)).
    pm = rslora_peft(base)
    for ex in ktrs.peft._ktrs_experts(pm):
        assert ex.experts.use_rslora and ex.experts.lora_scaling == pytest.approx(8 / 4**0.5)
    attn = pm.base_model.model.model.layers[1].self_attn.q_proj
    assert attn.scaling["default"] == pytest.approx(ex.experts.lora_scaling)  # PEFT's own layers agree


def test_rslora_adapter_resumes_into_the_same_parameters(base, tmp_path):
    # Bug: restore_expert_lora compared the read-back gate/up scale (sqrt(2)·alpha/sqrt(r))
    # with the model's alpha/sqrt(r) and refused every rsLoRA checkpoint.
    pm = rslora_peft(base, seed=3)
    want = logits(pm)
    saved = {n: p.detach().clone() for n, p in pm.named_parameters() if ".lora_experts." in n}
    pm.save_pretrained(str(tmp_path))  # what a Trainer checkpoint calls
    params = dict(pm.named_parameters())
    with torch.no_grad():
        for n in saved:
            params[n].zero_()
    assert rel_l2(logits(pm), want) > 1e-2
    pm.load_adapter(str(tmp_path), adapter_name="default")  # what resume_from_checkpoint calls
    for n, v in saved.items():
        assert params[n] is dict(pm.named_parameters())[n]  # optimizer state still maps
        torch.testing.assert_close(params[n].detach(), v, rtol=1e-5, atol=1e-7)
    assert rel_l2(logits(pm), want) < 1e-5


def test_trainer_resume_with_rslora(base, tmp_path):
    from transformers import Trainer, TrainingArguments

    data = [{k: v[0] for k, v in batch(seed=s, n=1, t=12).items()} for s in range(4)]

    def run(out, max_steps, resume=None):
        torch.manual_seed(0)
        pm = rslora_peft(base, seed=5)
        args = TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=2, max_steps=max_steps, learning_rate=3e-3, logging_steps=1,
            save_steps=2, save_strategy="steps", report_to=[], use_cpu=True, seed=0, lr_scheduler_type="constant",
            disable_tqdm=True, data_seed=0,
        )
        tr = Trainer(model=pm, args=args, train_dataset=data)
        tr.train(resume_from_checkpoint=resume)
        return [h["loss"] for h in tr.state.log_history if "loss" in h]

    full = run(tmp_path / "a", 4)
    run(tmp_path / "b", 2)
    resumed = run(tmp_path / "c", 4, resume=str(tmp_path / "b" / "checkpoint-2"))
    assert resumed[2:] == pytest.approx(full[2:], rel=1e-4)


def test_ktrs_load_adapter_restores_every_peft_lora_tensor(base, tmp_path):
    # failure-modes row 7: ktrs.load_adapter loads PEFT's and ktrs' parts of one adapter, all of them.
    # Bug: load_adapter dropping the shared-expert LoRA (only unexpected keys were checked).
    pm = patched_peft(base, seed=9)  # targets shared experts and the dense MLP too
    want = logits(pm)
    pm.save_pretrained(str(tmp_path))
    again = ktrs.load_adapter(ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2), str(tmp_path))
    src = dict(pm.named_parameters())
    lora = {n: p for n, p in again.named_parameters() if "lora_" in n}
    assert any("shared_experts" in n for n in lora) and any("layers.0.mlp" in n for n in lora)
    for n, p in lora.items():
        assert torch.equal(p.detach(), src[n].detach()), n
    assert rel_l2(logits(again), want) < 1e-5


def test_load_adapter_refuses_an_adapter_missing_tensors(base, tmp_path):
    from safetensors.torch import load_file, save_file

    pm = patched_peft(base, seed=10)
    pm.save_pretrained(str(tmp_path))
    path = tmp_path / "adapter_model.safetensors"
    w = load_file(str(path))
    save_file({k: v for k, v in w.items() if "shared_experts" not in k}, str(path))
    with pytest.raises(ktrs.KtrsValueError, match="shared_experts"):
        ktrs.load_adapter(ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2), str(tmp_path))


def _tensors_sharing(ptrs):
    gc.collect()
    found = []
    with warnings.catch_warnings():  # isinstance on some deprecated objects warns
        warnings.simplefilter("ignore")
        objects = [o for o in gc.get_objects() if isinstance(o, torch.Tensor)]
    for o in objects:
        if not o.is_meta:
            try:
                if o.untyped_storage().data_ptr() in ptrs:
                    found.append(tuple(o.shape))
            except RuntimeError:  # tensors without storage
                pass
    return found


def test_no_tensor_keeps_the_original_expert_storage(base):
    # failure-modes row 8: no tensor anywhere shares the original expert storage after patching.
    # Bug: patch_model keeping a `.detach()` of the original experts (a new tensor object
    # on the same storage: weakrefs to the Parameters cannot see it).
    model = copy.deepcopy(base)
    ptrs = set()
    for i in (1, 2):
        ex = model.get_submodule(f"model.layers.{i}.mlp.experts")
        ptrs |= {ex.gate_up_proj.untyped_storage().data_ptr(), ex.down_proj.untyped_storage().data_ptr()}
    assert _tensors_sharing(ptrs)  # the scan sees them before patching
    ktrs.patch_model(model, device="cpu", threads=2)
    assert _tensors_sharing(ptrs) == []


def test_patch_model_moves_everything_but_the_experts_to_device(base):
    # failure-modes row 4: dense layer 0, shared experts, router, attention, norms all reach the device.
    # Bug: patch_model never moving the rest of the model; with device="cpu" no placement
    # check can fail, the meta device shows placement without a GPU.
    model = ktrs.patch_model(copy.deepcopy(base), device="meta", threads=2, lora_rank=2)
    for n, p in model.named_parameters():
        want = "cpu" if ".lora_experts." in n else "meta"
        assert p.device.type == want, n
    assert all(b.device.type == "meta" for _, b in model.named_buffers())


def test_merge_and_unload_in_process(base):
    # Bug: merge_and_unload merging expert LoRA into the weights but leaving it active too.
    # failure-modes row 5: merge_and_unload works, merging ΔW into ktrs' own expert weights.
    pm = patched_peft(base, seed=21)
    want = logits(pm)
    experts = ktrs.peft._ktrs_experts(pm)
    d = torch.float64  # the merged weights, by float64 torch: W + s·B@A, rounded to bf16
    merged_ref = [
        [
            [(w.to(d) + ex.experts.lora_scaling * ex.lora[f"{m}_B"][e].to(d) @ ex.lora[f"{m}_A"][e].to(d)).to(torch.bfloat16) for m, w in zip(("gate", "up", "down"), ex.experts.get_expert(e))]
            for e in range(ex.experts.num_experts)
        ]
        for ex in experts
    ]
    assert rel_l2(merged_ref[0][0][0], experts[0].experts.get_expert(0)[0]) > 5e-2  # ΔW shows: the check can fail
    for ex in experts:  # logits without the expert LoRA: how much the check can see
        ex.active_adapters = ()
    without = logits(pm)
    for ex in experts:
        ex.active_adapters = ("default",)
    effect = rel_l2(without, want)
    merged = pm.merge_and_unload()
    assert not isinstance(merged, peft.PeftModel)
    assert all(ex.experts.lora_rank == 0 and not ex.lora_active for ex in ktrs.peft._ktrs_experts(merged))
    for ex, ref in zip(ktrs.peft._ktrs_experts(merged), merged_ref):
        for e, want_e in enumerate(ref):
            for got, w in zip(ex.experts.get_expert(e), want_e):
                torch.testing.assert_close(got.float(), w.float(), rtol=2**-7, atol=1e-6)
    assert rel_l2(logits(merged), want) < effect / 5, effect


def test_expert_lora_gradient_guard_fires_on_its_own():
    # failure-modes row 3: the gradient guard names the expert-LoRA tensor and the layer.
    # Bug: the expert-LoRA gradient guard switched off (the old test's input-gradient
    # guard fired first). Here only grad down_B overflows: down_B = 0 keeps the output
    # and the input gradient finite, a huge down_A makes act·down_Aᵀ ~1e30.
    p = make_problem(E=4, H=32, I=32, k=2, T=6, r=4, seed=31)
    m = ktrs.KtrsExperts(build(p))
    m.where = "model.layers.3.mlp.experts"
    with torch.no_grad():
        m.lora["down_B"].zero_()
        m.lora["down_A"].fill_(1e29)
    x = p.hidden.float().requires_grad_(True)
    out = m(x, p.ids, p.weights)
    assert torch.isfinite(out).all()
    with pytest.raises(ktrs.NonFiniteError, match=r"gradient of expert LoRA down_B in model\.layers\.3"):
        out.backward(torch.full_like(out, 1e10))
    m.check_finite = False  # without the guard the same backward goes through
    out = m(x, p.ids, p.weights)
    out.backward(torch.full_like(out, 1e10))
    assert torch.isfinite(x.grad).all() and not torch.isfinite(m.lora["down_B"].grad).all()


def test_adamw_first_step_follows_the_reference_gradients():
    # failure-modes row 10: the optimizer's step follows the float64 reference gradient.
    # Bug: all LoRA gradients zeroed; AdamW's weight decay moved the weights anyway, so
    # "the weights changed" could not tell. Adam's first step is -lr·g/(|g|+eps) on top
    # of the decay: check it against the float64 reference gradient.
    p = make_problem(E=8, H=32, I=32, k=2, T=16, r=4, seed=26, used_experts=6)
    m = ktrs.KtrsExperts(build(p))
    lr, wd = 1e-2, 0.01
    opt = torch.optim.AdamW(m.parameters(), lr=lr, weight_decay=wd)
    before = {n: m.lora[n].detach().clone() for n in LORA_NAMES}
    m(p.hidden, p.ids, p.weights).backward(p.grad_out)
    opt.step()
    ref = reference(p)
    for n in LORA_NAMES:
        g = ref[f"grad_{n}"].float()
        clear = g.abs() > 1e-4 * g.abs().max()  # signs rounding cannot flip
        assert clear.sum() > 0.5 * g.numel(), n
        want = before[n] * (1 - lr * wd) - lr * torch.sign(g)
        assert torch.allclose(m.lora[n].detach()[clear], want[clear], rtol=0, atol=1e-5), n


def test_bf16_trainer_trains_the_expert_lora(base, tmp_path):
    # failure-modes row 10: every expert-LoRA tensor changes under the bf16 Trainer.
    # Bug: all LoRA gradients zeroed passed the bf16 Trainer test (it checked the loss
    # and finiteness only).
    from transformers import Trainer, TrainingArguments

    pm = patched_peft(base, seed=4)
    data = [{k: v[0] for k, v in batch(seed=s, n=1, t=12).items()} for s in range(4)]
    before = {n: p.detach().clone() for n, p in pm.named_parameters() if ".lora_experts." in n}
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, learning_rate=3e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, bf16=True, seed=0, disable_tqdm=True, weight_decay=0.0,
    )
    Trainer(model=pm, args=args, train_dataset=data).train()
    for n, p in pm.named_parameters():
        if n in before:
            assert (p.detach() - before[n]).abs().amax() > 1e-4, n


def test_save_warns_about_what_stock_peft_drops(base, tmp_path):
    # Stock PEFT 0.21 rewrites gate/up/down targets onto the routed experts: check that it
    # really drops the shared-expert and dense-MLP LoRA, and that ktrs says so at save time.
    pm = patched_peft(base, seed=13)
    with pytest.warns(UserWarning, match=r"stock PEFT will not load \d+ of this adapter's LoRA tensors.*shared"):
        pm.save_pretrained(str(tmp_path / "all"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path / "all"))
    assert not any("shared_experts" in n and "lora_" in n for n, _ in stock.named_parameters())
    # An adapter without such targets saves silently.
    model = ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2)
    pm = ktrs.get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "o_proj"], target_parameters=["gate_up_proj", "down_proj"]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pm.save_pretrained(str(tmp_path / "attn"))
