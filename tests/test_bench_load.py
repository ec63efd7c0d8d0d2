"""benchmarks/bench_load.py's checkpoint writer, at tiny DeepSeek-V2-Lite and V3 shapes:
what it streams to disk from a meta-device model is what transformers' save_pretrained
writes (names, shapes, dtypes), its index describes its shards, stock transformers
loads it with nothing missing, and ktrs.from_pretrained gives the stock model's logits
(its --fp8 variant: close to them)."""

import json
import os
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))

import bench_load  # noqa: E402
import ktrs  # noqa: E402

from conftest import rel_l2  # noqa: E402

#: The tiny checkpoints are ~9 MB: 1 MB shards make several, some tensors alone in one.
SHARD_GB = 1e-3


def header(file):
    """{key: (shape, dtype, data bytes)} of the tensors in one safetensors file."""
    with open(file, "rb") as f:
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    meta.pop("__metadata__", None)
    return {k: (m["shape"], m["dtype"], m["data_offsets"][1] - m["data_offsets"][0]) for k, m in meta.items()}


def headers(path):
    """`header` of every safetensors file in `path`, merged."""
    return {k: v for name in sorted(os.listdir(path)) if name.endswith(".safetensors")
            for k, v in header(os.path.join(path, name)).items()}


def meta_model(model):
    return bench_load.meta_model(bench_load.model_config(model, 2, tiny=True))


@pytest.fixture(scope="module", params=["v2-lite", "v3"])
def written(request, tmp_path_factory):
    """(model, path, returned total bytes) of a 2-layer tiny checkpoint (one dense, one MoE layer)."""
    path = str(tmp_path_factory.mktemp(request.param))
    return request.param, path, bench_load.write_checkpoint(path, meta_model(request.param), shard_gb=SHARD_GB)


def test_tensors_are_those_save_pretrained_writes(written, tmp_path):
    model, path, _ = written
    meta = meta_model(model)
    stock = transformers.AutoModelForCausalLM.from_config(meta.config, dtype=torch.bfloat16)
    stock.save_pretrained(str(tmp_path))
    want = headers(str(tmp_path))
    assert any(".experts.0.gate_proj.weight" in k for k in want)  # per-expert keys, as DeepSeek ships them
    assert any(m[1] == "F32" for m in want.values())  # the router (and V3's correction bias) stay fp32
    assert headers(path) == want


def test_index_describes_the_shards(written):
    _, path, total = written
    with open(os.path.join(path, "model.safetensors.index.json")) as f:
        index = json.load(f)
    weight_map = index["weight_map"]
    files = sorted(set(weight_map.values()))
    assert len(files) > 2 and files == sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    for name in files:
        keys = {k for k, v in weight_map.items() if v == name}
        shard = header(os.path.join(path, name))
        assert set(shard) == keys
        size = sum(m[2] for m in shard.values())
        assert size <= SHARD_GB * 1e9 or len(shard) == 1, (name, size)
    tensors = headers(path)
    assert index["metadata"]["total_size"] == total == sum(m[2] for m in tensors.values())


def stock_and_ids(path):
    stock, info = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    # Every weight of the model (each expert's part of the fused tensors included) came
    # from the checkpoint, and nothing in it went unused.
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.randint(0, stock.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    return stock.eval(), ids


def test_ktrs_loads_what_stock_transformers_loads(written):
    _, path, _ = written
    stock, ids = stock_and_ids(path)
    model = ktrs.from_pretrained(path, device="cpu", dtype=torch.float32, threads=2)
    assert len(ktrs.find_moe_blocks(model)) == 1
    with torch.no_grad():
        want, got = stock(ids).logits, model(ids).logits
        # The routed experts matter: without them the logits move by 5% (V2-Lite's
        # unnormalised softmax weights) to 30% (V3), far more than the tolerance below,
        # so the comparison can fail. The MoE layer's router sees the same input in both
        # models (the layers before it are torch's in both): no token picks other experts.
        for name, p in stock.named_parameters():
            if ".experts." in name:
                p.zero_()
        assert rel_l2(stock(ids).logits, want) > 0.03
    assert rel_l2(got, want) < 5e-3


def test_fp8_checkpoint_loads_close_to_the_bf16_one(tmp_path):
    path = str(tmp_path)
    bench_load.write_checkpoint(path, meta_model("v3"), fp8=True, shard_gb=SHARD_GB)
    tensors = headers(path)
    fp8 = [k for k, m in tensors.items() if m[1] == "F8_E4M3"]
    assert any(".experts.0.down_proj.weight" in k for k in fp8) and any("self_attn.q_a_proj" in k for k in fp8)
    assert all(k + "_scale_inv" in tensors for k in fp8)
    with open(os.path.join(path, "config.json")) as f:
        assert json.load(f)["quantization_config"]["weight_block_size"] == [128, 128]
    bf16 = str(tmp_path / "bf16")
    bench_load.write_checkpoint(bf16, meta_model("v3"), shard_gb=SHARD_GB)  # the same random values, unquantised
    stock, ids = stock_and_ids(bf16)
    model = ktrs.from_pretrained(path, device="cpu", dtype=torch.float32, threads=2)
    with torch.no_grad():
        # fp8's 3 mantissa bits in every projection move the logits by ~10%; a wrong
        # scale, block or layout would move them by ~100%.
        assert rel_l2(model(ids).logits, stock(ids).logits) < 0.25
