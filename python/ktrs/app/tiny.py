"""A small DeepSeek-V2 built from scratch for the demo and the tests: a word-level
tokenizer trained on a bundled corpus, random weights, saved as a real checkpoint."""

from __future__ import annotations

import os
from typing import Iterable

import torch

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} </s> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def train_tokenizer(texts: Iterable[str]):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>", "<|user|>", "<|assistant|>", "<|system|>"]
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok.train_from_iterator(list(texts), trainers.WordLevelTrainer(special_tokens=specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def bundled_texts():
    from .chat_data import read_jsonl

    with open(os.path.join(DATA, "demo_corpus.txt")) as f:
        yield f.read()
    for conv in read_jsonl(os.path.join(DATA, "demo_chat.jsonl")):
        for m in conv:
            yield m["content"]


def build_checkpoint(path: str, seed: int = 0) -> str:
    """Writes config, random weights (safetensors shards) and tokenizer to `path`."""
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    tok = train_tokenizer(bundled_texts())
    cfg = DeepseekV2Config(
        vocab_size=len(tok), hidden_size=128, intermediate_size=256, moe_intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, kv_lora_rank=32, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=16, v_head_dim=16, max_position_embeddings=256, routed_scaling_factor=1.0,
        topk_method="greedy", n_group=1, topk_group=1, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        initializer_range=0.1,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(path, max_shard_size="2MB")
    tok.save_pretrained(path)
    return path
