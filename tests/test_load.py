"""ktrs.from_pretrained's routed experts, read and packed in Rust (`_native.load_experts`):
the weights `set_expert` packs from the same tensors, for every layout (per-expert keys
spread over shards, transformers 5's fused tensors) and dtype a checkpoint may hold
them in; the progress bar; errors that name the tensor and what was expected."""

import copy
import json
import os

import pytest
import torch

transformers = pytest.importorskip("transformers")

import ktrs  # noqa: E402
from ktrs import hf  # noqa: E402

from conftest import rel_l2  # noqa: E402
from tiny_families import stock_model, tie_free_batch  # noqa: E402


def not_bf16_exact(model):
    """`model` with routed-expert values that bf16 must round (so the conversion's
    rounding is compared too)."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".experts." in name:
                p.add_(torch.randn(p.shape, generator=g) * 1e-3)
    return model


def assert_same_experts(loaded, reference):
    pairs = list(zip(ktrs.find_moe_blocks(loaded), ktrs.find_moe_blocks(reference)))
    assert pairs and all(a == b for (a, _), (b, _) in pairs)
    for (name, a), (_, b) in pairs:
        for x in range(a.experts.experts.num_experts):
            got, want = a.experts.experts.get_expert(x), b.experts.experts.get_expert(x)
            assert all(torch.equal(p, q) for p, q in zip(got, want)), f"{name} expert {x}"


def load(path, **kw):
    return ktrs.from_pretrained(str(path), device="cpu", dtype=torch.float32, threads=2, **kw)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_each_dtype_packs_what_set_expert_packs(dtype, tmp_path):
    stock = not_bf16_exact(stock_model("qwen3_moe")).to(dtype)
    stock.save_pretrained(str(tmp_path), max_shard_size="100KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        shard_of = json.load(f)["weight_map"]
    # Some expert's projections lie in different shards.
    assert any(len({shard_of[k] for k in shard_of if f".experts.{x}." in k and ".layers.1." in k}) > 1 for x in range(8))
    loaded = load(tmp_path)
    assert_same_experts(loaded, ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2))
    ids = tie_free_batch(stock.float())["input_ids"]
    with torch.no_grad():
        assert rel_l2(loaded(ids).logits, stock.float()(ids).logits) < 2e-2


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_fused_expert_tensors_pack_what_set_expert_packs(dtype, tmp_path):
    stock = not_bf16_exact(stock_model("mixtral")).to(dtype)
    stock.save_pretrained(str(tmp_path), save_original_format=False, max_shard_size="200KB")
    with open(tmp_path / "model.safetensors.index.json") as f:
        assert "model.layers.1.mlp.experts.gate_up_proj" in json.load(f)["weight_map"]
    assert_same_experts(load(tmp_path), ktrs.patch_model(copy.deepcopy(stock), device="cpu", threads=2))


class Bar:
    """Stands in for tqdm: counts what the load reports."""

    def __init__(self, total, desc):
        self.total, self.n, self.closed = total, 0, False

    def update(self, n):
        self.n += n

    def close(self):
        self.closed = True


def test_progress_bar_counts_every_expert(tmp_path, monkeypatch):
    stock = stock_model("deepseek_v2")
    stock.save_pretrained(str(tmp_path), max_shard_size="200KB")
    bars = []
    monkeypatch.setattr(hf, "_progress", lambda total, desc: bars.append(Bar(total, desc)) or bars[-1])
    load(tmp_path)
    (bar,) = bars
    experts = sum(b.experts.gate_up_proj.shape[0] for _, b in ktrs.find_moe_blocks(stock))
    assert bar.total == bar.n == experts and bar.closed

    class Stop(Exception):
        pass

    def stopping(total, desc):
        bar = Bar(total, desc)
        bar.update = lambda n: (_ for _ in ()).throw(Stop("interrupted"))
        return bar

    monkeypatch.setattr(hf, "_progress", stopping)
    with pytest.raises(Stop):
        load(tmp_path)


# -- errors ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def single_shard(tmp_path_factory):
    path = tmp_path_factory.mktemp("dsv2_one_shard")
    stock_model("deepseek_v2").to(torch.bfloat16).save_pretrained(str(path))
    assert os.path.exists(path / "model.safetensors")
    return path


def copy_with_header(src, dst, change):
    """A copy of the checkpoint `src` whose model.safetensors header went through `change`
    (the data section as it was)."""
    import shutil

    shutil.copytree(src, dst)
    shard = dst / "model.safetensors"
    raw = shard.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    shard.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n :])
    return dst


KEY = "model.layers.1.mlp.experts.3.up_proj.weight"


def test_wrong_dtype_shape_and_byte_count_are_named(single_shard, tmp_path):
    def dtype(name):
        return lambda h: h[KEY].update(dtype=name)

    path = copy_with_header(single_shard, tmp_path / "f64", dtype("F64"))
    with pytest.raises(ktrs.KtrsValueError, match=rf"{KEY}: dtype F64 is not supported for routed experts \(ktrs reads BF16, F16, F32"):
        load(path)
    path = copy_with_header(single_shard, tmp_path / "f32", dtype("F32"))  # the bytes of a bf16 tensor
    with pytest.raises(ktrs.KtrsValueError, match=rf"{KEY}: 6144 bytes on disk, shape \[48, 64\] F32 needs 12288"):
        load(path)
    path = copy_with_header(single_shard, tmp_path / "shape", lambda h: h[KEY].update(shape=[64, 48]))
    with pytest.raises(ktrs.KtrsValueError, match=rf"{KEY}: shape \[64, 48\], the layer needs \[48, 64\]"):
        load(path)


def test_missing_shard_is_named(tmp_path):
    stock_model("deepseek_v2").save_pretrained(str(tmp_path), max_shard_size="200KB")
    shard = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))[-1]
    os.remove(tmp_path / shard)
    with pytest.raises(ktrs.KtrsFileNotFoundError, match=rf"{shard}: listed in model\.safetensors\.index\.json, but missing"):
        load(tmp_path)


def test_truncated_shard_is_named(single_shard, tmp_path):
    import shutil

    shutil.copytree(single_shard, tmp_path / "ckpt")
    shard = tmp_path / "ckpt" / "model.safetensors"
    with open(shard, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    last = max((k for k in header if ".experts." in k), key=lambda k: header[k]["data_offsets"][1])
    os.truncate(shard, 8 + n + header[last]["data_offsets"][0] + 10)
    with pytest.raises(ktrs.KtrsValueError, match=rf"{last}: needs bytes \d+\.\.\d+ of .*model\.safetensors, which has \d+: the shard is truncated"):
        load(tmp_path / "ckpt")
