"""LoRA fine-tuning through ktrs.get_peft_model and the stock HF Trainer, against an
unpatched reference model with the same LoRA computed by plain torch."""

import contextlib
import copy
import types
import warnings
from typing import List

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
from test_patch_model import DEVICES, bf16_exact, tiny_config  # noqa: E402

TARGETS = ["q_proj", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def lora_config(**kw):
    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(TARGETS), **kw)


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    return bf16_exact(DeepseekV2ForCausalLM(tiny_config())).eval()


def patched_peft(base, seed=0, device="cpu"):
    model = ktrs.patch_model(copy.deepcopy(base), device=device, threads=2)
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
    # failure-modes row 6: PEFT wraps no routed-expert projection; the expert LoRA is ktrs'.
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


def test_peft_wraps_only_modules_on_the_device(base):
    # failure-modes row 6: PEFT wraps attention, shared experts and the dense MLP (all on
    # the device; meta stands in for a GPU), never a routed-expert projection, whose
    # weights live in CPU memory; the expert LoRA, ktrs' own, is the only thing on the CPU.
    from peft.tuners.lora import LoraLayer

    pm = patched_peft(base, device="meta")
    wrapped = {n.split("model.layers.", 1)[1] for n, m in pm.named_modules() if isinstance(m, LoraLayer)}
    want = {f"{i}.self_attn.{t}" for i in range(3) for t in ("q_proj", "kv_b_proj", "o_proj")}
    want |= {f"0.mlp.{t}" for t in ("gate_proj", "up_proj", "down_proj")}
    want |= {f"{i}.mlp.shared_experts.{t}" for i in (1, 2) for t in ("gate_proj", "up_proj", "down_proj")}
    assert wrapped == want
    for n, p in pm.named_parameters():
        assert p.device.type == ("cpu" if ".lora_experts." in n else "meta"), n


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


def reference_like(pm, base, device="cpu"):
    """Unpatched model with PEFT on the same modules and torch expert LoRA, same values."""
    ref = copy.deepcopy(base).to(device)
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
        ex.ref_lora = torch.nn.ParameterDict({n: torch.nn.Parameter(kx.lora[n].detach().clone().to(device)) for n in LORA_NAMES})
        ex.ref_scale = kx.experts.lora_scaling
        ex.forward = types.MethodType(_ref_experts_forward, ex)
    return rm


def batch(seed=1, n=3, t=10, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 160, (n, t), generator=g).to(device)
    return {"input_ids": ids, "labels": ids.clone()}


def test_loss_and_every_lora_gradient_match_unpatched_reference(base, device):
    # failure-modes row 9: PEFT on the real model, every LoRA gradient against the unpatched model.
    pm = patched_peft(base, device=device)
    rm = reference_like(pm, base, device)
    b = batch(device=device)
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
        assert rel_l2(p.grad.cpu(), want.cpu()) < 3e-2, n
        checked += 1
    assert checked == len([1 for _, p in pm.named_parameters() if p.requires_grad])


def test_hf_trainer_trains_expert_and_peft_lora(base, tmp_path, device, monkeypatch):
    # failure-modes row 9: the real HF Trainer, PEFT and the Trainer's model.to(device) on a
    # small DeepSeek-V2, against what the kernel tests cannot see.
    from transformers import Trainer, TrainingArguments

    moves = []  # the Trainer's model.to(device) reaches the ktrs layers (and stops there)
    apply = ktrs.KtrsExperts._apply
    monkeypatch.setattr(ktrs.KtrsExperts, "_apply", lambda self, fn, recurse=True: moves.append(self) or apply(self, fn, recurse))
    pm = patched_peft(base, seed=3, device=device)
    moves.clear()
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
        learning_rate=3e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=device == "cpu", max_grad_norm=1.0,
        lr_scheduler_type="constant", seed=0, disable_tqdm=True,
    )
    trainer = Trainer(model=pm, args=args, train_dataset=data)
    trainer.train()
    experts = ktrs.peft._ktrs_experts(pm)
    assert {id(m) for m in moves} >= {id(m) for m in experts}, "the Trainer never moved the model"
    # failure-modes row 1: after the Trainer's move and 30 steps the parameters the
    # optimizer updates are still the kernel's own buffers.
    opt_params = {p.data_ptr() for g in trainer.optimizer.param_groups for p in g["params"]}
    for ex in experts:
        for n in LORA_NAMES:
            assert ex.lora[n].data_ptr() == ex.experts.lora_weight(n).data_ptr() and ex.lora[n].data_ptr() in opt_params, n
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5, losses
    # failure-modes row 10: every expert that received tokens must have trained its LoRA
    # (zero_grad(set_to_none=True) every step, as the Trainer does).
    for layer in (1, 2):
        assert seen[layer], layer
        for n in LORA_NAMES:
            key = f"base_model.model.model.layers.{layer}.mlp.experts.lora_experts.{n}"
            now = dict(pm.named_parameters())[key].detach()
            assert now.device.type == "cpu"
            changed = (now - before[key]).flatten(1).abs().amax(1) > 0
            for e in seen[layer]:
                assert changed[e], (layer, n, e)


def randomize_b(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or (".lora_experts." in n and n.endswith("_B")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def logits(model, seed=7):
    with torch.no_grad():
        return model(**batch(seed=seed)).logits


EXPERT_CFG = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj", "o_proj"], target_parameters=["gate_up_proj", "down_proj"])


def test_saved_adapter_loads_in_stock_peft_on_the_unpatched_model(base, tmp_path):
    model = ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2)
    pm = ktrs.get_peft_model(model, LoraConfig(**EXPERT_CFG))
    randomize_b(pm, 11)
    want = logits(pm)
    pm.save_pretrained(str(tmp_path))  # what the Trainer calls; writes expert LoRA too
    with open(tmp_path / "adapter_config.json") as f:
        assert "gate_up_proj" in f.read()
    stock = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path))
    assert rel_l2(logits(stock), want) < 1e-2
    # and back into a patched model, in memory
    again = ktrs.load_adapter(ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2), str(tmp_path))
    assert rel_l2(logits(again), want) < 1e-5
    with torch.no_grad():  # the check is sensitive: the expert LoRA alone moves the logits
        for p in ktrs.expert_lora_parameters(pm):
            p.zero_()
    assert rel_l2(logits(pm), want) > 3e-2


_RECORDED: List[list] = []  # the lists of the recordings in progress
_WRITE_EVENTS = ("os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.link", "os.symlink", "os.truncate", "os.chmod")


def _audit(event, args):
    if not _RECORDED:
        return
    import os

    if event == "open":
        path, mode, flags = args
        writes = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
        what = "write" if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (mode is None and isinstance(flags, int) and flags & writes) else "read"
        _RECORDED[-1].append((f"open for {what}", path))
    elif event in _WRITE_EVENTS or event.startswith(("shutil.", "tempfile.")):
        _RECORDED[-1].append((event, args[0] if args else None))


@contextlib.contextmanager
def recorded_file_access():
    """Lists what the code in the block does to files from Python (audit events): opens
    for reading or writing, new directories, temp files, copies, renames, removals."""
    import sys

    if _audit not in _HOOKED:  # an audit hook cannot be removed: installed once
        sys.addaudithook(_audit)
        _HOOKED.append(_audit)
    _RECORDED.append([])
    try:
        yield _RECORDED[-1]
    finally:
        _RECORDED.pop()


_HOOKED: list = []


def test_adapter_trained_by_stock_peft_loads_into_patched_model(base, tmp_path, monkeypatch):
    # failure-modes row 7: ktrs.load_adapter reads the adapter's config itself and splits
    # its targets between PEFT and ktrs in memory: no temp dir, no edited copy on disk.
    import os
    import tempfile

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stock = peft.get_peft_model(copy.deepcopy(base), LoraConfig(**EXPERT_CFG))
    randomize_b(stock, 12)  # PEFT's fused gate_up LoRA: gate and up share A
    want = logits(stock)
    adapter = tmp_path / "adapter"
    stock.save_pretrained(str(adapter))
    files = {f: (adapter / f).read_bytes() for f in os.listdir(adapter)}
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("TMPDIR", str(tmp))
    model = ktrs.patch_model(copy.deepcopy(base), device="cpu", threads=2)
    with recorded_file_access() as access:
        pm = ktrs.load_adapter(model, str(adapter))
    assert ("open for read", str(adapter / "adapter_config.json")) in access  # the recording sees ktrs' reads
    assert [a for a in access if a[0] != "open for read"] == []
    assert list(tmp.iterdir()) == [] and {f: (adapter / f).read_bytes() for f in os.listdir(adapter)} == files
    # the split, in memory: PEFT wraps the attention targets, ktrs holds the expert LoRA
    wrapped = {n.rsplit(".", 1)[-1] for n, m in pm.named_modules() if isinstance(m, peft.tuners.lora.LoraLayer)}
    assert wrapped == {"q_proj", "o_proj"}
    assert all(ex.experts.lora_rank == 4 for ex in ktrs.peft._ktrs_experts(pm))
    assert rel_l2(logits(pm), want) < 2e-2


def test_trainer_checkpoint_resume_reproduces_uninterrupted_run(base, tmp_path):
    from transformers import Trainer, TrainingArguments

    data = [{k: v[0] for k, v in batch(seed=s, n=1, t=12).items()} for s in range(8)]

    def run(out, max_steps, resume=None):
        torch.manual_seed(0)  # PEFT's LoRA-A init draws from the global generator
        pm = patched_peft(base, seed=5)
        args = TrainingArguments(
            output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=3e-3,
            logging_steps=1, save_steps=5, save_strategy="steps", report_to=[], use_cpu=True, seed=0,
            lr_scheduler_type="constant", disable_tqdm=True, data_seed=0,
        )
        tr = Trainer(model=pm, args=args, train_dataset=data)
        tr.train(resume_from_checkpoint=resume)
        return [h["loss"] for h in tr.state.log_history if "loss" in h], pm

    full, pm_full = run(tmp_path / "a", 10)
    run(tmp_path / "b", 5)
    resumed, pm_res = run(tmp_path / "c", 10, resume=str(tmp_path / "b" / "checkpoint-5"))
    assert len(full) == 10 and len(resumed) == 10  # the resumed history includes steps 1-5
    assert resumed[5:] == pytest.approx(full[5:], rel=1e-4)
    a = dict(pm_full.named_parameters())
    for n, p in pm_res.named_parameters():
        if ".lora_experts." in n:
            torch.testing.assert_close(p, a[n], rtol=1e-4, atol=1e-6)


def test_merge_and_export_give_a_checkpoint_stock_transformers_loads(base, tmp_path):
    # failure-modes row 5: merged expert weights exported as per-expert safetensors that stock HF loads.
    pm = patched_peft(base, seed=21)
    want = logits(pm)
    text = ktrs.describe(pm)
    assert "routed experts in ktrs" in text and "shared experts" in text and "attention" in text
    ktrs.export_merged(pm, str(tmp_path))
    stock = DeepseekV2ForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32).eval()
    assert rel_l2(logits(stock), want) < 2e-2
    assert rel_l2(logits(base), want) > 5e-2  # the adapters mattered


def test_inspect_reports_non_finite_tensors(base, tmp_path):
    # failure-modes row 3: `ktrs inspect` reports NaN/Inf tensors grouped by component.
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    pm = patched_peft(base, seed=22)
    pm.save_pretrained(str(tmp_path))
    r = subprocess.run([sys.executable, "-m", "ktrs", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0 and "routed experts" in r.stdout and "OK: all finite" in r.stdout
    f = tmp_path / "adapter_model.safetensors"
    w = load_file(str(f))
    key = next(k for k in w if "shared_experts.up_proj.lora_A" in k)
    w[key][0, 0] = float("nan")
    save_file(w, str(f))
    r = subprocess.run([sys.executable, "-m", "ktrs", "inspect", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 1 and "shared experts: " in r.stdout and "1 NaN" in r.stdout and "non-finite" in r.stdout


def test_hf_trainer_bf16_mixed_precision(base, tmp_path):
    # failure-modes row 2: under bf16 autocast the optimizer, its state and the kernel
    # agree on one dtype for the expert LoRA: float32, in the kernel's own buffers.
    from transformers import Trainer, TrainingArguments

    pm = patched_peft(base, seed=4)
    data = [{k: v[0] for k, v in batch(seed=s, n=1, t=12).items()} for s in range(8)]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=6, learning_rate=3e-3, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, bf16=True, seed=0, disable_tqdm=True,
    )
    tr = Trainer(model=pm, args=args, train_dataset=data)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 6 and all(l == l and l < 100 for l in losses)  # finite
    rust = {ex.experts.lora_weight(n).data_ptr() for ex in ktrs.peft._ktrs_experts(pm) for n in LORA_NAMES}
    for p in ktrs.expert_lora_parameters(pm):
        assert p.dtype == torch.float32 and torch.isfinite(p).all() and p.data_ptr() in rust
        assert {v.dtype for v in tr.optimizer.state[p].values() if v.dim()} == {torch.float32}  # AdamW's moments
