"""Chat data for SFT: JSONL of {"messages": [...]}, the tokenizer's chat template, and
labels that train only the assistant's replies."""

from __future__ import annotations

import json
import os
from typing import Dict, List

import torch

from .._native import KtrsFileNotFoundError, KtrsValueError


def read_jsonl(path: str) -> List[List[Dict[str, str]]]:
    if not os.path.exists(path):
        raise KtrsFileNotFoundError(f"no data file {path!r}")
    convs = []
    with open(path) as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise KtrsValueError(f"{path}:{i}: not JSON ({exc.msg})") from exc
            msgs = row.get("messages") if isinstance(row, dict) else None
            if not msgs or not all(isinstance(m, dict) and {"role", "content"} <= set(m) for m in msgs):
                raise KtrsValueError(f'{path}:{i}: expected {{"messages": [{{"role": ..., "content": ...}}, ...]}}')
            if msgs[-1]["role"] != "assistant":
                raise KtrsValueError(f"{path}:{i}: the conversation does not end with an assistant reply (the part that is trained)")
            convs.append(msgs)
    if not convs:
        raise KtrsValueError(f"{path!r} holds no conversations")
    return convs


def encode(tokenizer, messages: List[Dict[str, str]], max_len: int) -> Dict[str, torch.Tensor]:
    """input_ids of the whole conversation; labels = input_ids on the last assistant reply
    and -100 on everything before it."""
    full = chat_ids(tokenizer, messages, add_generation_prompt=False)[:max_len]
    n_prompt = len(chat_ids(tokenizer, messages[:-1], add_generation_prompt=True))
    labels = [-100] * min(n_prompt, len(full)) + full[n_prompt:]
    return {"input_ids": torch.tensor(full), "labels": torch.tensor(labels)}


def chat_ids(tokenizer, messages: List[Dict[str, str]], add_generation_prompt: bool) -> List[int]:
    """Token ids of `messages` under the tokenizer's chat template."""
    out = tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=add_generation_prompt)
    if not isinstance(out, list):  # transformers 5 may return a BatchEncoding
        out = out["input_ids"]
    return list(out)


def collate(batch: List[Dict[str, torch.Tensor]], pad_id: int) -> Dict[str, torch.Tensor]:
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id)
    labels = torch.full((len(batch), n), -100)
    mask = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        k = len(b["input_ids"])
        ids[i, :k], labels[i, :k], mask[i, :k] = b["input_ids"], b["labels"], 1
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}
