"""`ktrs train`, `ktrs chat` and `ktrs export-merged` on a tiny checkpoint of every family
(each family's stock key names, a tokenizer with a chat template): the family's default
LoRA targets, an adapter that loads back, a merged checkpoint stock transformers loads."""

import json
import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

import ktrs  # noqa: E402
from ktrs.app.chat import load_chat_model  # noqa: E402
from ktrs.app.cli import main  # noqa: E402
from ktrs.families import FAMILIES  # noqa: E402
from ktrs.app.tiny import DATA, bundled_texts, train_tokenizer  # noqa: E402
from ktrs.app.train import TrainConfig, train  # noqa: E402

from conftest import rel_l2  # noqa: E402
from tiny_families import BUILDERS, stock_model, tie_free_batch  # noqa: E402


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(bundled_texts())


@pytest.mark.parametrize("family", list(BUILDERS))
def test_train_chat_and_export_every_family(family, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    monkeypatch.setenv("KTRS_NO_PROGRESS", "1")
    ckpt, out, merged = (str(tmp_path / d) for d in ("model", "adapter", "merged"))
    stock = stock_model(family, vocab_size=max(len(tokenizer), 160))  # room for tie_free_batch's ids
    stock.save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    m = train(TrainConfig(model=ckpt, data=os.path.join(DATA, "demo_chat.jsonl"), output=out, steps=3, batch_size=4,
                          max_len=64, lora_rank=4, lora_alpha=8, device="cpu"), progress=False)
    assert len(m["losses"]) == 3 and all(l == l for l in m["losses"])
    with open(os.path.join(out, "adapter_config.json")) as f:
        cfg = json.load(f)
    assert set(cfg["target_modules"]) == set(FAMILIES[family].lora_targets)
    assert {"gate_up_proj", "down_proj"} <= set(cfg["target_parameters"])
    # The trained adapter, back on a streamed model, moves the logits.
    model, _ = load_chat_model(ckpt, out, "cpu")
    assert main(["export-merged", "--model", ckpt, "--adapter", out, "--output", merged]) == 0
    stock_merged = AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval()
    ids = tie_free_batch(stock_merged)["input_ids"]
    with torch.no_grad():
        want = model(ids).logits
        assert rel_l2(want, stock(ids).logits) > 1e-3  # training moved the model
        assert rel_l2(stock_merged(ids).logits, want) < 2e-2
