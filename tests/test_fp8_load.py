"""Block-wise fp8 checkpoints (DeepSeek-V3/R1, the "-FP8" Qwen3 releases): float8_e4m3fn
weights with a float32 `weight_scale_inv` per block, written here from tiny bf16 models
with the real key names, loaded by ktrs.from_pretrained and checked against the stock
model holding the dequantised weights. Block sizes that do not divide the tiny dims make
the last block of a row or column partial, as in DeepSeek-V3's kv_a_proj_with_mqa."""

import copy
import json
import math

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ktrs  # noqa: E402
from ktrs.families import FAMILIES  # noqa: E402

from conftest import rel_l2  # noqa: E402
from tiny_families import stock_model, tie_free_batch  # noqa: E402

E4M3_MAX = 448.0


def quantize(w: torch.Tensor, block):
    """(float8 weight, float32 scale_inv) as DeepSeek's and transformers' fp8 quantisers
    make them: per block, scale = amax / 448, w8 = w / scale."""
    n, k = w.shape
    bn, bk = block
    grid = (math.ceil(n / bn), math.ceil(k / bk))
    padded = torch.zeros(grid[0] * bn, grid[1] * bk)
    padded[:n, :k] = w.float()
    amax = padded.view(grid[0], bn, grid[1], bk).abs().amax(dim=(1, 3))
    scale = (amax / E4M3_MAX).clamp_min(1e-12)
    full = scale.repeat_interleave(bn, 0).repeat_interleave(bk, 1)[:n, :k]
    return (w.float() / full).to(torch.float8_e4m3fn), scale


def dequantize(q: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    """The reference dequantisation: every element times its block's scale, in float32."""
    n, k = q.shape
    rows = torch.arange(n)[:, None] // block[0]
    cols = torch.arange(k)[None, :] // block[1]
    return q.float() * scale[rows, cols]


def is_quantised(key: str, t: torch.Tensor) -> bool:
    # What the fp8 releases quantise: every linear projection (attention, dense and
    # shared MLPs, routed experts); embeddings, norms, router and lm_head stay bf16.
    return t.dim() == 2 and (key.endswith("_proj.weight") or key.endswith("_proj_with_mqa.weight"))


def write_fp8_checkpoint(stock, path, block, scales_apart=False, shard_size="200KB"):
    """Saves `stock` as a block-wise fp8 checkpoint; returns the state dict the stock
    model must hold to be its reference (dequantised weights, routed experts rounded to
    bf16 as ktrs packs them). `scales_apart` puts every scale in a shard of its own, so
    weights and scales never share a shard."""
    from safetensors.torch import load_file, save_file

    stock.save_pretrained(str(path), max_shard_size=shard_size)
    index_file = path / "model.safetensors.index.json"
    weight_map = json.loads(index_file.read_text())["weight_map"]
    reference = {}
    scales = {}
    for shard in sorted(set(weight_map.values())):
        tensors = load_file(str(path / shard))
        out = {}
        for key, t in tensors.items():
            if not is_quantised(key, t):
                out[key] = t
                continue
            q, s = quantize(t, block)
            out[key] = q
            (scales if scales_apart else out)[key + "_scale_inv"] = s
            weight_map[key + "_scale_inv"] = "model-scales.safetensors" if scales_apart else shard
            w = dequantize(q, s, block)
            reference[key] = w.to(torch.bfloat16).float() if ".experts." in key else w
        save_file(out, str(path / shard), metadata={"format": "pt"})
    if scales_apart:
        save_file(scales, str(path / "model-scales.safetensors"), metadata={"format": "pt"})
    index_file.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block)}
    (path / "config.json").write_text(json.dumps(config))
    return reference


def reference_model(stock, reference):
    """`stock` with the dequantised weights (checkpoint names: transformers' own loader
    folds per-expert keys into the fused experts)."""
    model = copy.deepcopy(stock)
    family = FAMILIES[model.config.model_type]
    with torch.no_grad():
        for name, block in ktrs.find_moe_blocks(model):
            ex = block.experts
            for x in range(ex.gate_up_proj.shape[0]):
                gate, up, down = (reference[family.expert_key(name, x, p)] for p in ("gate", "up", "down"))
                ex.gate_up_proj[x].copy_(torch.cat([gate, up]))
                ex.down_proj[x].copy_(down)
        params = dict(model.named_parameters())
        for key, w in reference.items():
            if ".experts." not in key:
                params[key].copy_(w)
    return model


CASES = [
    # DeepSeek-V3: square 32 blocks, partial in the expert width (48 = 32 + 16) and in
    # kv_a_proj_with_mqa's 24 rows; scales next to their weights.
    ("deepseek_v3", (32, 32), False),
    # Qwen3-MoE: non-square blocks, partial along both dims (48 = 32 + 16, 64 = 24+24+16),
    # every scale in another shard than its weight.
    ("qwen3_moe", (32, 24), True),
    # DeepSeek's real block size: one partial block per tiny matrix.
    ("deepseek_v3", (128, 128), False),
]


@pytest.mark.parametrize("family,block,apart", CASES)
def test_fp8_checkpoint_loads_dequantised(family, block, apart, tmp_path):
    stock = stock_model(family)
    reference = write_fp8_checkpoint(stock, tmp_path, block, scales_apart=apart)
    want_model = reference_model(stock, reference).eval()
    loaded = ktrs.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32, threads=2)
    # Routed experts: bf16 of (fp8 value * its block's scale), bit for bit.
    checked = 0
    for (name, got), (_, want) in zip(ktrs.find_moe_blocks(loaded), ktrs.find_moe_blocks(want_model)):
        i = want.experts.down_proj.shape[-1]
        for x in range(got.experts.experts.num_experts):
            g, u, d = got.experts.experts.get_expert(x)
            wgu, wd = want.experts.gate_up_proj[x].to(torch.bfloat16), want.experts.down_proj[x].to(torch.bfloat16)
            assert torch.equal(g, wgu[:i]) and torch.equal(u, wgu[i:]) and torch.equal(d, wd), f"{name} expert {x}"
            checked += 1
    assert checked >= 16
    # The rest: the dequantised weights in the model's dtype (as transformers' own
    # dequantising loader gives them).
    params = dict(loaded.named_parameters())
    for key, w in reference.items():
        if ".experts." not in key:
            assert torch.equal(params[key], w), key
    # Nothing of the fp8 scheme is left: the model and its config are unquantised.
    assert not any("scale_inv" in n for n in params)
    assert "quantization_config" not in loaded.config.to_dict()
    ids = tie_free_batch(want_model)["input_ids"]
    with torch.no_grad():
        assert rel_l2(loaded(ids).logits, want_model(ids).logits) < 2e-2


def test_fp8_in_bf16_rounds_once(tmp_path):
    # In a bf16 model every dequantised weight (experts and the rest: Rust) is the f32
    # product rounded once to bf16, as `(w.float() * scale).to(torch.bfloat16)` gives it.
    stock = stock_model("qwen3_moe")
    reference = write_fp8_checkpoint(stock, tmp_path, (32, 24))
    loaded = ktrs.from_pretrained(str(tmp_path), device="cpu", dtype=torch.bfloat16, threads=2)
    params = dict(loaded.named_parameters())
    rest = [key for key in reference if ".experts." not in key]
    assert len(rest) >= 8
    for key in rest:
        assert params[key].dtype == torch.bfloat16 and torch.equal(params[key], reference[key].to(torch.bfloat16)), key


def test_fp8_matches_transformers_dequantising_loader(tmp_path):
    # Where the blocks divide every dim, transformers' own fp8 loader (dequantize=True)
    # is an independent reference for the whole model. (With partial blocks it derives
    # the block size from the scale grid and scales wrongly; ktrs does not.)
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM, FineGrainedFP8Config

    stock = stock_model("deepseek_v3")
    write_fp8_checkpoint(stock, tmp_path, (8, 8))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32,
                                              quantization_config=FineGrainedFP8Config(dequantize=True)).eval()
    loaded = ktrs.from_pretrained(str(tmp_path), device="cpu", dtype=torch.float32, threads=2)
    hf_params = dict(hf.named_parameters())
    for name, p in loaded.named_parameters():
        if ".experts." not in name:
            assert torch.equal(p, hf_params[name]), name
    for name, block in ktrs.find_moe_blocks(loaded):
        ref = hf.get_submodule(name).experts
        i = ref.down_proj.shape[-1]
        for x in range(ref.gate_up_proj.shape[0]):
            g, u, d = block.experts.experts.get_expert(x)
            assert torch.equal(g, ref.gate_up_proj[x, :i].to(torch.bfloat16)) and torch.equal(d, ref.down_proj[x].to(torch.bfloat16))
            assert torch.equal(u, ref.gate_up_proj[x, i:].to(torch.bfloat16))
    ids = tie_free_batch(hf)["input_ids"]
    with torch.no_grad():
        assert rel_l2(loaded(ids).logits, hf(ids).logits) < 2e-2


def drop(path, key):
    """Removes tensor `key` from the checkpoint at `path` (its shard and the index)."""
    from safetensors.torch import load_file, save_file

    index_file = path / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    shard = index["weight_map"].pop(key)
    tensors = load_file(str(path / shard))
    del tensors[key]
    save_file(tensors, str(path / shard), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))


@pytest.fixture(scope="module")
def fp8_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("fp8_v3")
    write_fp8_checkpoint(stock_model("deepseek_v3"), path, (32, 32))
    return path


def copy_of(src, dst):
    import shutil

    shutil.copytree(src, dst)
    return dst


@pytest.mark.parametrize("key", ["model.layers.1.mlp.experts.5.down_proj.weight_scale_inv",
                                 "model.layers.0.self_attn.kv_a_proj_with_mqa.weight_scale_inv"])
def test_missing_scale_is_named(fp8_dir, tmp_path, key):
    path = copy_of(fp8_dir, tmp_path / "ckpt")
    drop(path, key)
    with pytest.raises(ktrs.KtrsValueError, match=key.replace(".", r"\.")):
        ktrs.from_pretrained(str(path), device="cpu", threads=2)


def set_quantization(path, **fields):
    config = json.loads((path / "config.json").read_text())
    config["quantization_config"].update(fields)
    (path / "config.json").write_text(json.dumps(config))


def test_wrong_block_size_is_named(fp8_dir, tmp_path):
    path = copy_of(fp8_dir, tmp_path / "ckpt")
    set_quantization(path, weight_block_size=[16, 16])  # the scales are per 32 x 32
    with pytest.raises(ktrs.KtrsValueError, match=r"model\.layers\.\d+\.[\w.]+\.weight_scale_inv: shape \[\d+, \d+\] does not fit "
                                                  r"weight \[\d+, \d+\] in blocks of \[16, 16\].*weight_block_size"):
        ktrs.from_pretrained(str(path), device="cpu", threads=2)
    set_quantization(path, weight_block_size=[32])
    with pytest.raises(ktrs.KtrsValueError, match=r"weight_block_size must be two positive integers .*got \[32\]"):
        ktrs.from_pretrained(str(path), device="cpu", threads=2)


def test_fp8_without_or_with_other_quantization_config(fp8_dir, tmp_path):
    path = copy_of(fp8_dir, tmp_path / "ckpt")
    config = json.loads((path / "config.json").read_text())
    del config["quantization_config"]
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ktrs.KtrsValueError, match=r"model\.layers\.\d+\..*weight is float8, but config\.json has no quantization_config"):
        ktrs.from_pretrained(str(path), device="cpu", threads=2)
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ktrs.KtrsValueError, match=r"quant_method 'gptq' is not supported"):
        ktrs.from_pretrained(str(path), device="cpu", threads=2)
