"""ktrs.optim.AdamW (expert-LoRA step in Rust) against torch.optim.AdamW."""

import copy
import io
import warnings

import pytest
import torch

import ktrs
from ktrs import _native
from ktrs.experts import LORA_NAMES
from conftest import make_problem


def ktrs_experts(seed=0):
    """A real KtrsExperts (E=6, small), so its LoRA parameters view Rust buffers."""
    p = make_problem(E=6, H=32, I=24, k=2, T=5, r=4, seed=seed)
    ex = ktrs.KtrsExperts.from_weights(p.gate, p.up, p.down, lora_rank=4, lora_alpha=8, threads=2)
    with torch.no_grad():
        for n in LORA_NAMES:
            ex.lora[n].copy_(p.lora[n])
    return ex


def make_params(seed=0):
    """Expert LoRA (Rust views), a plain CPU f32 tensor, and a float64 one (stepped by torch)."""
    ex = ktrs_experts(seed)
    g = torch.Generator().manual_seed(seed + 1)
    extra = torch.nn.Parameter(torch.randn(17, 5, generator=g))
    dbl = torch.nn.Parameter(torch.randn(9, generator=g, dtype=torch.float64))
    return ex, [ex.lora[n] for n in LORA_NAMES], [extra, dbl]


def clone_params(ps):
    return [torch.nn.Parameter(p.detach().clone()) for p in ps]


def groups(a, b, lr=1e-2):
    # Two groups with different hyperparameters, as the Trainer's decay/no-decay split.
    return [
        {"params": a, "weight_decay": 0.1},
        {"params": b, "weight_decay": 0.0, "betas": (0.8, 0.99), "eps": 1e-3, "lr": lr * 2},
    ]


def grads_for(step, params, seed=0):
    g = torch.Generator().manual_seed(1000 * seed + step)
    out = []
    for i, p in enumerate(params):
        gr = torch.randn(p.shape, generator=g, dtype=p.dtype) * (0.5 + i)
        if p.dim() == 3:  # expert LoRA: experts 1 and 4 got no tokens this step
            gr[1] = 0
            gr[4] = 0
        out.append(gr.to(p.device))  # the same values wherever the parameter lives
    return out


def run(opt, params, steps, start=0, sched=None, clip=0.5, none_at=(3,)):
    for s in range(start, steps):
        for i, (p, g) in enumerate(zip(params, grads_for(s, params))):
            # one parameter without a gradient on some steps (skipped, step count stays)
            p.grad = None if (i == 1 and s in none_at) else g
        torch.nn.utils.clip_grad_norm_(params, clip)  # what the Trainer does before step
        opt.step()
        if sched is not None:
            sched.step()
        opt.zero_grad()


def lr_lambda(s):
    return min(1.0, (s + 1) / 3) * (1.0 - s / 20)  # warmup then linear decay


def assert_params_close(got, want):
    for i, (p, q) in enumerate(zip(got, want)):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7, msg=lambda m: f"param {i}: {m}")


def test_matches_torch_adamw_over_10_steps():
    ex, lora, rest = make_params()
    params = lora + rest
    ref = clone_params(params)
    ptrs = [p.data_ptr() for p in lora]
    opt = ktrs.optim.AdamW(groups(lora + rest[:1], rest[1:]), lr=1e-2, threads=2)
    ref_opt = torch.optim.AdamW(groups(ref[:7], ref[7:]), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    ref_sched = torch.optim.lr_scheduler.LambdaLR(ref_opt, lr_lambda)
    start = [p.detach().clone() for p in params]
    run(opt, params, 10, sched=sched)
    run(ref_opt, ref, 10, sched=ref_sched)
    assert_params_close(params, ref)
    # every parameter moved, by much more than the tolerance
    assert all((p.detach() - s).abs().max() > 1e-3 for p, s in zip(params, start))
    # the state is torch's, element for element, and the skipped step was not counted
    for p, q in zip(params, ref):
        st, rst = opt.state[p], ref_opt.state[q]
        assert float(st["step"]) == float(rst["step"])
        torch.testing.assert_close(st["exp_avg"], rst["exp_avg"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(st["exp_avg_sq"], rst["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    assert float(opt.state[lora[1]]["step"]) == 9.0
    # experts without tokens: no moments (torch agrees); only weight decay moved them
    assert opt.state[lora[0]]["exp_avg_sq"][1].abs().max() == 0
    # the LoRA parameters are still views of Rust memory, which holds the update
    assert [p.data_ptr() for p in lora] == ptrs
    for n, p in zip(LORA_NAMES, lora):
        assert torch.equal(ex.experts.lora_weight(n), p.detach())
    # the Rust state is what the optimizer state shows (zero-copy views)
    assert isinstance(opt._rust[lora[0]], _native.AdamWState)
    assert opt.state[lora[0]]["exp_avg"].data_ptr() == torch.from_dlpack(opt._rust[lora[0]].exp_avg()).data_ptr()


def test_the_test_can_fail():
    """The comparison above detects a wrong hyperparameter (here weight decay off)."""
    _, lora, rest = make_params()
    params = lora + rest
    ref = clone_params(params)
    opt = ktrs.optim.AdamW(groups(lora + rest[:1], rest[1:]), lr=1e-2, threads=2)
    bad = groups(ref[:7], ref[7:])
    bad[0]["weight_decay"] = 0.0
    run(opt, params, 10)
    run(torch.optim.AdamW(bad, lr=1e-2), ref, 10)
    with pytest.raises(AssertionError):
        assert_params_close(params, ref)


def test_state_dict_round_trip_mid_run_reproduces_uninterrupted_run():
    _, lora, rest = make_params(seed=3)
    params = lora + rest
    ref = clone_params(params)
    opt = ktrs.optim.AdamW(groups(lora + rest[:1], rest[1:]), lr=1e-2)
    run(opt, params, 5)
    buf = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "params": [p.detach().clone() for p in params]}, buf)
    run(opt, params, 10, start=5)  # uninterrupted

    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    _, lora2, rest2 = make_params(seed=7)  # other values: everything must come from the checkpoint
    resumed = lora2 + rest2
    with torch.no_grad():
        for p, v in zip(resumed, saved["params"]):
            p.copy_(v)
    opt2 = ktrs.optim.AdamW(groups(lora2 + rest2[:1], rest2[1:]), lr=1e-2)
    opt2.load_state_dict(saved["opt"])
    assert isinstance(opt2._rust[lora2[0]], _native.AdamWState)  # state went back into Rust
    run(opt2, resumed, 10, start=5)
    for p, q in zip(resumed, params):
        assert torch.equal(p.detach(), q.detach())

    # and both equal torch's uninterrupted run
    ref_opt = torch.optim.AdamW(groups(ref[:7], ref[7:]), lr=1e-2)
    run(ref_opt, ref, 10)
    assert_params_close(resumed, ref)


def test_state_dicts_move_between_torch_and_ktrs():
    """A torch AdamW checkpoint resumes under ktrs (and back), continuing torch's run."""
    _, lora, rest = make_params(seed=4)
    params = lora + rest
    ref = clone_params(params)
    ref_opt = torch.optim.AdamW(groups(ref[:7], ref[7:]), lr=1e-2)
    run(ref_opt, ref, 4)
    with torch.no_grad():
        for p, q in zip(params, ref):
            p.copy_(q)
    opt = ktrs.optim.AdamW(groups(lora + rest[:1], rest[1:]), lr=1e-2)
    opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))
    run(opt, params, 8, start=4)
    back = torch.optim.AdamW(groups(clone_params(params[:7]), clone_params(params[7:])), lr=1e-2)
    back_params = [p for g in back.param_groups for p in g["params"]]
    back.load_state_dict(copy.deepcopy(opt.state_dict()))
    run(back, back_params, 10, start=8)
    run(opt, params, 10, start=8)
    run(ref_opt, ref, 10, start=4)
    assert_params_close(params, ref)
    assert_params_close(back_params, ref)


def test_native_step_refuses_bad_input():
    st = _native.AdamWState([4, 3])
    p, g = torch.zeros(4, 3), torch.ones(4, 3)
    h = [(1e-3, 0.9, 0.999, 1e-8, 0.0)]
    with pytest.raises(TypeError, match=r"grads\[0\].*float32"):
        _native.adamw_step([st], [p], [g.double()], h)
    with pytest.raises(ValueError, match=r"params\[0\].*shape"):
        _native.adamw_step([st], [torch.zeros(12)], [torch.ones(12)], h)  # resized
    with pytest.raises(ValueError, match=r"params\[0\].*contiguous"):
        _native.adamw_step([st], [torch.zeros(3, 4).T], [g], h)
    with pytest.raises(ValueError, match=r"grads\[0\].*share memory"):
        _native.adamw_step([st], [p], [p], h)
    st2 = _native.AdamWState([4, 3])
    with pytest.raises(ValueError, match=r"params\[1\].*share memory.*params\[0\]"):
        _native.adamw_step([st, st2], [p, p], [g, g], h * 2)
    with pytest.raises(ValueError, match=r"params\[0\].*exp_avg of states\[0\]"):
        _native.adamw_step([st], [torch.from_dlpack(st.exp_avg())], [g], h)
    with pytest.raises(ValueError, match=r"states\[1\].*once"):
        _native.adamw_step([st, st], [p, torch.zeros(4, 3)], [g, g], h * 2)
    with pytest.raises(ValueError, match=r"betas\[1\]"):
        _native.adamw_step([st], [p], [g], [(1e-3, 0.9, 1.0, 1e-8, 0.0)])
    with pytest.raises(ValueError, match=r"must not require grad"):
        _native.adamw_step([st], [torch.nn.Parameter(p)], [g], h)
    assert st.step == 0 and p.abs().max() == 0  # nothing was written
    _native.adamw_step([st], [p], [g], h)
    assert st.step == 1 and p.abs().max() > 0
    with pytest.raises(ValueError, match=r"step"):
        st.load(torch.zeros(4, 3), torch.zeros(4, 3), 2.5)


def test_moved_parameter_is_refused_not_stale():
    p = torch.nn.Parameter(torch.randn(5))
    opt = ktrs.optim.AdamW([p], lr=1e-2)
    p.grad = torch.ones(5)
    opt.step()
    p.data = p.data.double()
    p.grad = torch.ones(5, dtype=torch.float64)
    with pytest.raises(ktrs.KtrsValueError, match="no longer a contiguous CPU float32"):
        opt.step()


def test_rebound_parameter_storage_is_what_gets_updated():
    """The step borrows each parameter's storage per call, so a rebound `.data` is
    updated (no pointer kept from an earlier step)."""
    p = torch.nn.Parameter(torch.randn(6))
    q = torch.nn.Parameter(p.detach().clone())
    opt, ref = ktrs.optim.AdamW([p], lr=1e-2), torch.optim.AdamW([q], lr=1e-2)
    for s in range(4):
        if s == 2:
            p.data = p.data.clone()  # new storage
        p.grad = torch.full((6,), 0.1 * (s + 1))
        q.grad = p.grad.clone()
        opt.step()
        ref.step()
    torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)")
@pytest.mark.parametrize("fused", [None, True])
def test_gpu_params_go_to_torch_in_the_same_step(fused):
    _, lora, rest = make_params(seed=5)
    gpu = [torch.nn.Parameter(torch.randn(33, 7, device="cuda")), torch.nn.Parameter(torch.randn(8, device="cuda"))]
    params = lora + rest[:1] + gpu
    ref = clone_params(params)
    opt = ktrs.optim.AdamW(groups(params[:7], params[7:]), lr=1e-2, fused=fused)
    ref_opt = torch.optim.AdamW(groups(ref[:7], ref[7:]), lr=1e-2, fused=fused)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda)
    run(opt, params, 5, sched=sched)
    sd = copy.deepcopy(opt.state_dict())
    opt.load_state_dict(sd)  # GPU steps go back where fused AdamW wants them
    run(opt, params, 10, start=5, sched=sched)
    run(ref_opt, ref, 10, sched=torch.optim.lr_scheduler.LambdaLR(ref_opt, lr_lambda))
    assert_params_close([p.cpu() for p in params], [q.cpu() for q in ref])


# -- the HF Trainer on a tiny patched DeepSeek-V2 -----------------------------------------

transformers = pytest.importorskip("transformers")
pytest.importorskip("peft")


@pytest.fixture(scope="module")
def base():
    from transformers import DeepseekV2ForCausalLM

    from test_patch_model import bf16_exact, tiny_config

    torch.manual_seed(0)
    return bf16_exact(DeepseekV2ForCausalLM(tiny_config())).eval()


def train(base, out, *, ktrs_optim, max_steps=10, resume=None, save_steps=None):
    from transformers import Trainer, TrainingArguments

    from test_finetune import batch, patched_peft

    data = [{k: v[0] for k, v in batch(seed=s, n=1, t=12).items()} for s in range(8)]
    torch.manual_seed(0)  # PEFT's LoRA-A init draws from the global generator
    pm = patched_peft(base, seed=5)
    args = TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=4, max_steps=max_steps, learning_rate=3e-3,
        weight_decay=0.1, max_grad_norm=0.5, lr_scheduler_type="linear", warmup_steps=3, logging_steps=1,
        save_strategy="steps" if save_steps else "no", save_steps=save_steps or 500, report_to=[], use_cpu=True,
        seed=0, data_seed=0, disable_tqdm=True,
    )
    kw = dict(optimizer_cls_and_kwargs=ktrs.optim.from_args(args)) if ktrs_optim else {}
    tr = Trainer(model=pm, args=args, train_dataset=data, **kw)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr.train(resume_from_checkpoint=resume)
    return tr, pm


def trained(pm):
    return {n: p.detach().clone() for n, p in pm.named_parameters() if p.requires_grad}


def test_trainer_with_ktrs_adamw_trains_like_torch_adamw(base, tmp_path):
    tr, pm = train(base, tmp_path / "k", ktrs_optim=True)
    assert isinstance(tr.optimizer.optimizer, ktrs.optim.AdamW)
    ref_tr, ref_pm = train(base, tmp_path / "t", ktrs_optim=False)
    assert not isinstance(ref_tr.optimizer.optimizer, ktrs.optim.AdamW)
    got, want = trained(pm), trained(ref_pm)
    n_expert = sum(".lora_experts." in n for n in got)
    assert n_expert == 12 and len(got) > n_expert
    # every trainable parameter was stepped in Rust (CPU run), with the Trainer's groups
    assert len(tr.optimizer.optimizer._rust) == len(got)
    assert [g["weight_decay"] for g in tr.optimizer.param_groups] == [0.1, 0.0]
    for n in got:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    ref_losses = [h["loss"] for h in ref_tr.state.log_history if "loss" in h]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    lrs = [h["learning_rate"] for h in tr.state.log_history if "learning_rate" in h]
    assert lrs == pytest.approx([h["learning_rate"] for h in ref_tr.state.log_history if "learning_rate" in h])
    assert len(set(lrs)) > 3  # the schedule did change the learning rate


def test_trainer_checkpoint_resume_reproduces_uninterrupted_run(base, tmp_path):
    full_tr, full = train(base, tmp_path / "a", ktrs_optim=True)
    train(base, tmp_path / "b", ktrs_optim=True, max_steps=10, save_steps=5)
    ckpt = tmp_path / "b" / "checkpoint-5"
    saved = torch.load(ckpt / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in saved["state"].values()} == {5.0}
    res_tr, resumed = train(base, tmp_path / "c", ktrs_optim=True, resume=str(ckpt))
    got, want = trained(resumed), trained(full)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-5, atol=1e-7, msg=lambda m, n=n: f"{n}: {m}")
    # optimizer state included
    o_full, o_res = full_tr.optimizer.optimizer, res_tr.optimizer.optimizer
    pf = [p for g in o_full.param_groups for p in g["params"]]
    pr = [p for g in o_res.param_groups for p in g["params"]]
    for a, b in zip(pf, pr):
        sa, sb = o_full.state[a], o_res.state[b]
        assert float(sa["step"]) == float(sb["step"]) == 10.0
        torch.testing.assert_close(sb["exp_avg"], sa["exp_avg"], rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(sb["exp_avg_sq"], sa["exp_avg_sq"], rtol=1e-5, atol=1e-12)
    assert len(o_res._rust) == len(pr)
