"""ktrs.patch_model / ktrs.from_pretrained on small DeepSeek-V2 models (CPU; random
weights saved as real safetensors shards with the checkpoint's per-expert key names)."""

import copy
import gc
import json
import os
import weakref

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM  # noqa: E402

import ktrs  # noqa: E402
from ktrs import KtrsExperts  # noqa: E402

from conftest import rel_l2  # noqa: E402


def tiny_config(**over):
    kw = dict(
        vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=48, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, first_k_dense_replace=1, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=1, kv_lora_rank=16, q_lora_rank=None, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, max_position_embeddings=128, routed_scaling_factor=1.0,
        topk_method="greedy", n_group=1, topk_group=1, initializer_range=0.1,
    )
    kw.update(over)
    return DeepseekV2Config(**kw)


def bf16_exact(model):
    """Round every weight to bf16 (kept in fp32), so ktrs' bf16 experts see the same values."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    return model


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model = bf16_exact(DeepseekV2ForCausalLM(tiny_config())).eval()
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, reference):
    path = str(tmp_path_factory.mktemp("tiny_dsv2"))
    reference.save_pretrained(path, max_shard_size="100KB")
    return path


def test_checkpoint_uses_real_per_expert_keys(checkpoint):
    with open(os.path.join(checkpoint, "model.safetensors.index.json")) as f:
        keys = json.load(f)["weight_map"]
    assert "model.layers.1.mlp.experts.7.gate_proj.weight" in keys
    assert "model.layers.2.mlp.experts.0.down_proj.weight" in keys
    assert "model.layers.0.mlp.gate_proj.weight" in keys  # layer 0 is dense
    assert len(set(keys.values())) > 1  # really sharded


DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (runs on the GPU machine)"))]


@pytest.fixture(params=DEVICES)
def device(request):
    return request.param


def inputs(n=2, t=9, vocab=160, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, t), generator=g)


def test_patched_logits_match_unpatched_model(reference, device):
    model = copy.deepcopy(reference)
    ref = copy.deepcopy(reference).to(device)
    ids = inputs().to(device)
    with torch.no_grad():
        want = ref(ids).logits
        ktrs.patch_model(model, device=device, threads=2)
        got = model(ids).logits
    assert got.device.type == device
    assert rel_l2(got, want) < 2e-2
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.95


def test_moe_blocks_found_by_structure_and_placement(reference, device):
    # failure-modes row 4: MoE layers found by structure; dense layer 0 is left to the device.
    model = copy.deepcopy(reference)
    layer0_mlp = model.model.layers[0].mlp
    ktrs.patch_model(model, device=device, threads=2)
    assert all(p.device.type == device for p in layer0_mlp.parameters())
    blocks = [n for n, _ in ktrs.find_moe_blocks(model)]
    assert blocks == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert model.model.layers[0].mlp is layer0_mlp and not isinstance(getattr(layer0_mlp, "experts", None), KtrsExperts)
    for name in blocks:
        block = model.get_submodule(name)
        assert isinstance(block.experts, KtrsExperts)
        # router, shared experts and everything else are ordinary parameters on `device`
        assert block.gate.weight.device.type == device and not block.gate.weight.is_meta
        assert all(p.device.type == device for p in block.shared_experts.parameters())
        assert all(p.device.type == "cpu" for p in block.experts.parameters())
        # HF-shaped zero-byte placeholders; nothing of the experts in the state dict
        assert block.experts.gate_up_proj.shape == (8, 96, 64) and block.experts.gate_up_proj.is_meta
        assert block.experts.down_proj.shape == (8, 64, 48)
    assert not any(".mlp.experts." in k for k in model.state_dict())
    ktrs.patch_model(model, device=device)  # idempotent
    assert [n for n, _ in ktrs.find_moe_blocks(model)] == blocks


def test_original_expert_memory_is_released(reference):
    # failure-modes row 8: after patching nothing keeps the original expert weights alive.
    from torch.multiprocessing.reductions import StorageWeakRef

    model = copy.deepcopy(reference)
    weights = [getattr(model.get_submodule(f"model.layers.{i}.mlp.experts"), n) for i in (1, 2) for n in ("gate_up_proj", "down_proj")]
    refs = [weakref.ref(w) for w in weights]
    # The storage itself: freed only once no tensor, Python or C++ (autograd graph, a
    # tensor kept by the extension), refers to it.
    storages = [StorageWeakRef(w.untyped_storage()) for w in weights]
    assert sum(w.untyped_storage().nbytes() for w in weights) == sum(w.numel() * 4 for w in weights)  # fp32, not shared
    del weights
    assert not any(s.expired() for s in storages)
    ktrs.patch_model(model, device="cpu", threads=2)
    gc.collect()
    assert all(r() is None for r in refs), "a Python object still holds the original expert weights"
    assert all(s.expired() for s in storages), "the original expert storage was not freed"


def test_to_and_half_after_patching_leave_experts_alone(reference):
    # failure-modes row 1: model.to()/half() on a whole patched model leave the expert memory alone.
    model = copy.deepcopy(reference)
    ktrs.patch_model(model, device="cpu", threads=2, lora_rank=4)
    ex = model.model.layers[1].mlp.experts
    ptrs = {n: p.data_ptr() for n, p in ex.lora.items()}
    expert0 = ex.experts.get_expert(0)
    model.half()
    model.to(torch.bfloat16)
    model.to("cpu")
    model.float()
    assert all(p.dtype == torch.float32 and p.data_ptr() == ptrs[n] for n, p in ex.lora.items())
    assert all(torch.equal(a, b) for a, b in zip(expert0, ex.experts.get_expert(0)))
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32  # the rest did move


def test_greedy_generation_matches_reference(reference, device):
    model = copy.deepcopy(reference)
    ktrs.patch_model(model, device=device, threads=2)
    prompt = inputs(n=1, t=6, seed=3).to(device)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    want = copy.deepcopy(reference).to(device).generate(prompt, **kw)
    got = model.generate(prompt, **kw)
    assert torch.equal(got, want)
    sampled = model.generate(prompt, max_new_tokens=5, do_sample=True, top_k=20, pad_token_id=0)
    assert sampled.shape == (1, 11)


def test_from_pretrained_streams_experts_and_equals_patch_model(checkpoint, reference, device):
    loaded = ktrs.from_pretrained(checkpoint, device=device, dtype=torch.float32, threads=2)
    patched = ktrs.patch_model(copy.deepcopy(reference), device=device, threads=2)
    ids = inputs(seed=5).to(device)
    with torch.no_grad():
        a, b = loaded(ids).logits, patched(ids).logits
    assert torch.equal(a, b)
    for layer in (1, 2):
        ea = loaded.model.layers[layer].mlp.experts.experts
        eb = patched.model.layers[layer].mlp.experts.experts
        for x in range(8):
            assert all(torch.equal(p, q) for p, q in zip(ea.get_expert(x), eb.get_expert(x)))
    assert not any(p.is_meta for p in loaded.parameters())
    assert not any(b.is_meta for b in loaded.buffers())


def test_from_pretrained_reads_fused_expert_names(tmp_path, reference):
    from safetensors.torch import save_file

    sd = {k: v.contiguous() for k, v in reference.state_dict().items()}
    with open(tmp_path / "config.json", "w") as f:
        f.write(reference.config.to_json_string())
    save_file(sd, str(tmp_path / "model.safetensors"))  # fused names, one shard
    assert "model.layers.1.mlp.experts.gate_up_proj" in sd
    loaded = ktrs.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32, threads=2)
    ids = inputs(seed=6)
    with torch.no_grad():
        assert rel_l2(loaded(ids).logits, reference(ids).logits) < 2e-2


def test_errors_a_user_can_act_on(tmp_path, reference):
    with pytest.raises(ValueError, match="no MoE block"):
        ktrs.patch_model(torch.nn.Sequential(torch.nn.Linear(2, 2)), device="cpu")
    with pytest.raises(FileNotFoundError, match="safetensors"):
        with open(tmp_path / "config.json", "w") as f:
            f.write(reference.config.to_json_string())
        ktrs.from_pretrained(str(tmp_path), device="cpu")
    other = tmp_path / "llama"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="deepseek_v2"):
        ktrs.from_pretrained(str(other), device="cpu")

    class RemoteStyleMoe(torch.nn.Module):  # what trust_remote_code builds
        def __init__(self):
            super().__init__()
            mlp = lambda: torch.nn.ModuleDict(  # noqa: E731
                {n: torch.nn.Linear(4, 4) for n in ("gate_proj", "up_proj", "down_proj")}
            )
            self.experts = torch.nn.ModuleList([_Attr(mlp()) for _ in range(2)])
            self.gate = torch.nn.Linear(4, 2)

    with pytest.raises(TypeError, match="trust_remote_code"):
        ktrs.patch_model(RemoteStyleMoe(), device="cpu")


class _Attr(torch.nn.Module):
    def __init__(self, d):
        super().__init__()
        for k, v in d.items():
            setattr(self, k, v)
