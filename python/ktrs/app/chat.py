"""`ktrs chat`: a DeepSeek-V2 checkpoint (plus an optional adapter) in a REPL or one shot."""

from __future__ import annotations

import os
import time
from typing import Dict, List, Optional, Tuple

import torch

from .._native import KtrsFileNotFoundError


def load_chat_model(model_path: str, adapter: Optional[str] = None, device: Optional[str] = None, dtype: Optional[torch.dtype] = None,
                    gpu_expert_memory: Optional[str] = None):
    """(model, tokenizer) with routed experts in ktrs and the adapter, if any, loaded;
    `dtype` of the non-expert weights (default: bf16 on CUDA, else float32)."""
    from transformers import AutoTokenizer

    import ktrs

    from .train import check_checkpoint, resolve_device

    check_checkpoint(model_path)
    if adapter is not None and not os.path.exists(os.path.join(adapter, "adapter_config.json")):
        raise KtrsFileNotFoundError(f"{adapter!r} is not an adapter directory (no adapter_config.json)")
    device = resolve_device(device)
    tok_src = adapter if adapter and os.path.exists(os.path.join(adapter, "tokenizer_config.json")) else model_path
    tok = AutoTokenizer.from_pretrained(tok_src)
    if dtype is None:
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    model = ktrs.from_pretrained(model_path, device=device, dtype=dtype, gpu_expert_memory=gpu_expert_memory)
    if adapter:
        model = ktrs.load_adapter(model, adapter)
    model.eval()
    return model, tok


@torch.no_grad()
def reply(model, tok, history: List[Dict[str, str]], max_new_tokens: int = 64, stream: bool = False) -> Tuple[str, float]:
    """The assistant's next message (greedy) and the generation speed in tokens/s."""
    from transformers import TextStreamer

    from .chat_data import chat_ids

    device = next(p.device for p in model.parameters())
    ids = torch.tensor([chat_ids(tok, history, add_generation_prompt=True)], device=device)
    if tok.unk_token_id is not None and (ids == tok.unk_token_id).any():
        import sys

        n = int((ids == tok.unk_token_id).sum())
        print(f"ktrs chat: warning: {n} words are not in the tokenizer's vocabulary and became {tok.unk_token!r}", file=sys.stderr)
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if stream else None
    t0 = time.perf_counter()
    out = model.generate(
        ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens, do_sample=False, streamer=streamer,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    dt = time.perf_counter() - t0
    new = out[0, ids.shape[1] :]
    return tok.decode(new, skip_special_tokens=True).strip(), len(new) / max(dt, 1e-9)


def repl(model, tok, max_new_tokens: int = 64) -> None:
    print("ktrs chat: type a message; /reset clears the history, /exit (or Ctrl-D) leaves.")
    history: List[Dict[str, str]] = []
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            print()
            return
        if line in ("/exit", "/quit"):
            return
        if line == "/reset":
            history = []
            continue
        if not line:
            continue
        history.append({"role": "user", "content": line})
        print("bot> ", end="", flush=True)
        text, speed = reply(model, tok, history, max_new_tokens, stream=True)
        print(f"     [{speed:.1f} tok/s]")
        history.append({"role": "assistant", "content": text})
