"""The `ktrs` command line on the small bundled model: train, chat, inspect, export-merged,
demo, and the errors a user can act on."""

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import ktrs  # noqa: E402
from ktrs.app.tiny import DATA, build_checkpoint  # noqa: E402

from conftest import rel_l2  # noqa: E402

CHAT_DATA = os.path.join(DATA, "demo_chat.jsonl")


def ktrs_cli(*args, input=None):
    env = {**os.environ, "KTRS_NO_PROGRESS": "1", "TQDM_DISABLE": "1"}
    return subprocess.run([sys.executable, "-m", "ktrs", *args], capture_output=True, text=True, input=input, env=env, timeout=600)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build_checkpoint(str(tmp_path_factory.mktemp("tiny") / "model"))


@pytest.fixture(scope="module")
def trained(ckpt, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("adapter") / "adapter")
    r = ktrs_cli("train", "--model", ckpt, "--data", CHAT_DATA, "--output", out, "--steps", "20", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "trained 20 steps" in r.stdout and "CPU experts" in r.stdout
    return out


def test_train_writes_adapter_plot_and_metrics(trained):
    for f in ("adapter_config.json", "adapter_model.safetensors", "loss_curve.png", "metrics.json"):
        assert os.path.exists(os.path.join(trained, f)), f
    with open(os.path.join(trained, "loss_curve.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    with open(os.path.join(trained, "metrics.json")) as f:
        m = json.load(f)
    assert len(m["losses"]) == 20 and m["final_loss"] < 0.5 * m["first_loss"]
    assert 0 < m["cpu_expert_seconds"] < m["train_seconds"]


def test_train_from_yaml_config(ckpt, tmp_path):
    cfg = tmp_path / "train.yaml"
    out = tmp_path / "a"
    cfg.write_text(f"model: {ckpt}\ndata: {CHAT_DATA}\noutput: {out}\nsteps: 3\nlora_rank: 4\ndevice: cpu\n")
    r = ktrs_cli("train", "--config", str(cfg))
    assert r.returncode == 0, r.stderr
    with open(out / "adapter_config.json") as f:
        assert json.load(f)["r"] == 4


def test_chat_one_shot_and_repl(ckpt, trained):
    r = ktrs_cli("chat", "--model", ckpt, "--adapter", trained, "--prompt", "What is the capital of Zorbia?", "--device", "cpu")
    assert r.returncode == 0, r.stderr
    assert "tok/s" in r.stdout and "Quellen" in r.stdout  # 20 steps are enough for this fact
    r = ktrs_cli("chat", "--model", ckpt, "--device", "cpu", input="What is the capital of Zorbia?\n/exit\n")
    assert r.returncode == 0, r.stderr
    assert "bot>" in r.stdout and "tok/s" in r.stdout


def test_inspect(trained):
    r = ktrs_cli("inspect", trained)
    assert r.returncode == 0 and "routed experts" in r.stdout and "OK: all finite" in r.stdout


def test_export_merged_loads_in_stock_transformers(ckpt, trained, tmp_path):
    from transformers import AutoModelForCausalLM

    out = str(tmp_path / "merged")
    r = ktrs_cli("export-merged", "--model", ckpt, "--adapter", trained, "--output", out)
    assert r.returncode == 0, r.stderr
    stock = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    from safetensors import safe_open

    from ktrs.app.chat import load_chat_model

    def dtype_of(d, key):
        for f in (f for f in os.listdir(d) if f.endswith(".safetensors")):
            with safe_open(os.path.join(d, f), "pt") as st:
                if key in st.keys():
                    return st.get_slice(key).get_dtype()

    # A bf16 base stays bf16, experts and the rest (not twice the size); only the router,
    # which transformers keeps in fp32, may differ.
    for key in ("model.embed_tokens.weight", "model.layers.1.mlp.experts.0.gate_proj.weight", "model.layers.1.self_attn.o_proj.weight"):
        assert dtype_of(out, key) == dtype_of(ckpt, key) == "BF16", key

    model, _ = load_chat_model(ckpt, trained, "cpu")
    ids = torch.randint(0, stock.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert rel_l2(stock(ids).logits, model(ids).logits) < 3e-2


def test_demo_end_to_end(tmp_path):
    r = ktrs_cli("demo", "--workdir", str(tmp_path / "demo"), "--steps", "60", "--device", "cpu")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "before fine-tuning" in r.stdout and "after fine-tuning" in r.stdout
    assert "3/3 after" in r.stdout and "CPU experts (ktrs" in r.stdout


def test_errors_a_user_can_act_on(ckpt, tmp_path):
    r = ktrs_cli("train", "--model", str(tmp_path / "nope"), "--data", CHAT_DATA, "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "not a model directory" in r.stderr
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text('{"model_type": "llama"}')
    r = ktrs_cli("chat", "--model", str(other), "--prompt", "hi")
    assert r.returncode == 2 and "deepseek_v2" in r.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ho"}]}\nnot json\n')
    r = ktrs_cli("train", "--model", ckpt, "--data", str(bad), "--output", str(tmp_path / "o"), "--device", "cpu")
    assert r.returncode == 2 and "bad.jsonl:2" in r.stderr
    r = ktrs_cli("train", "--model", ckpt, "--data", str(tmp_path / "missing.jsonl"), "--output", str(tmp_path / "o"))
    assert r.returncode == 2 and "no data file" in r.stderr
    r = ktrs_cli("inspect", str(tmp_path))
    assert r.returncode == 2 and "adapter_model.safetensors" in r.stderr
    if "amx" not in ktrs.info()["available_isas"]:
        env_r = subprocess.run(
            [sys.executable, "-m", "ktrs", "chat", "--model", ckpt, "--prompt", "hi", "--device", "cpu"],
            capture_output=True, text=True, env={**os.environ, "KTRS_ISA": "amx"}, timeout=600,
        )
        assert env_r.returncode == 2 and "amx" in env_r.stderr and "hint: unset KTRS_ISA" in env_r.stderr
    if not torch.cuda.is_available():
        r = ktrs_cli("train", "--model", ckpt, "--data", CHAT_DATA, "--output", str(tmp_path / "o"), "--device", "cuda")
        assert r.returncode == 2 and "no CUDA GPU" in r.stderr
