"""Load speed and peak host memory of ktrs.from_pretrained.

Writes a checkpoint of DeepSeek-V2-Lite's or DeepSeek-V3's shape (--model; any shape of
bench_model.py) with a few layers: random bf16 weights under the original key names (one
tensor per routed expert and projection), 1 GB shards. Then, in a fresh process, reads
the shards once plainly (sequential 64 MB reads: the file's read speed, from the page
cache when the files were just written or read) and loads them with ktrs: GB/s of the
routed-expert bytes and of the whole checkpoint next to the plain read, and peak
resident memory next to what ktrs must hold (packed experts) and one shard. Imports are
not timed.

The checkpoint is streamed to disk shard by shard (the model exists only on the meta
device, for its tensor names and shapes), so writing needs about one shard of memory
(V3: its 1.8 GB embedding): a 2-layer V3 (1 dense + 1 MoE layer, 28 GB; 16 GB in fp8)
is written on a machine with less memory than that.
An existing checkpoint (its config.json, written last) is reused.

    python benchmarks/bench_load.py --layers 4 --dir /tmp/v2lite-4l
    python benchmarks/bench_load.py --layers 4 --fp8 --dir /tmp/v2lite-4l-fp8
    python benchmarks/bench_load.py --model v3 --layers 2 --dir /tmp/v3-2l            # 28 GB
    python benchmarks/bench_load.py --model v3 --layers 2 --fp8 --dir /tmp/v3-2l-fp8
    python benchmarks/bench_load.py --model v3 --tiny --layers 2    # the structure at toy sizes, in seconds

`--fp8` writes the checkpoint block-wise fp8 (float8_e4m3fn projections with float32
scales per 128x128 block, as DeepSeek-V3/R1 ship). `--breakdown` also times one more
load's phases: the routed experts (read, converted and packed in Rust) and the rest.
`--cold` evicts the checkpoint's files from the page cache (posix_fadvise DONTNEED, those
files only) before the plain read and before each load, so both read from the disk.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import os
import subprocess
import sys
import time
import unittest.mock
from typing import Dict, List, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402

from bench_model import MODELS, meta_model, model_config  # noqa: E402

#: One checkpoint tensor: its key, shape and dtype.
Spec = Tuple[str, Tuple[int, ...], torch.dtype]


def checkpoint_tensors(model) -> List[Spec]:
    """Every tensor of the meta `model`'s checkpoint as the original checkpoints (and
    transformers' save_pretrained) hold it: the model's fused routed experts
    (gate_up_proj [E, 2I, H], down_proj [E, H, I]) as one tensor per expert and
    projection under the family's names, expert by expert, which is what ktrs streams
    and --fp8 quantises; the rest under its checkpoint name."""
    from ktrs.families import family_of

    family = family_of(model)
    state = model.state_dict()
    specs: List[Spec] = []
    for name, t in state.items():
        if name.endswith(".experts.down_proj"):
            continue  # listed with its gate_up_proj
        if not name.endswith(".experts.gate_up_proj"):
            specs.append((family.to_checkpoint(name), tuple(t.shape), t.dtype))
            continue
        block = name[: -len(".experts.gate_up_proj")]
        down = state[block + ".experts.down_proj"]
        e, h, i = down.shape
        for x in range(e):
            specs += [(family.expert_key(block, x, "gate"), (i, h), t.dtype),
                      (family.expert_key(block, x, "up"), (i, h), t.dtype),
                      (family.expert_key(block, x, "down"), (h, i), down.dtype)]
    return specs


#: Block of the fp8 scales (--fp8), as DeepSeek-V3/R1 ship.
FP8_BLOCK = (128, 128)


def quantized(key: str, shape: Tuple[int, ...]) -> bool:
    """Whether --fp8 quantises tensor `key`: every 2-D projection weight, as DeepSeek's do."""
    return len(shape) == 2 and (key.endswith("_proj.weight") or key.endswith("_proj_with_mqa.weight"))


def nbytes(spec: Spec, fp8: bool = False) -> int:
    """Bytes of the tensor `spec` on disk (one byte a weight where --fp8 quantises it)."""
    key, shape, dtype = spec
    return math.prod(shape) * (1 if fp8 and quantized(key, shape) else dtype.itemsize)


def plan_shards(specs: List[Spec], shard_bytes: int, fp8: bool = False) -> List[List[Spec]]:
    """`specs` in order, cut into shards of at most `shard_bytes` on disk (a larger
    tensor gets a shard of its own), as save_pretrained's max_shard_size does."""
    shards: List[List[Spec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + nbytes(spec, fp8) > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += nbytes(spec, fp8)
    return shards


class RandomFill:
    """Fills tensors with normal(0, 0.02) values: windows, at random offsets, of one pool
    of random bf16 values made once. torch's generator makes ~0.1 GB/s of bf16 per
    core, minutes of CPU time for a V3 checkpoint; copying windows runs at memory speed.
    Weights of different experts are thus shifted windows of one sequence: different
    matrices, which is all a load benchmark needs."""

    def __init__(self, seed: int = 0, pool: int = 1 << 24) -> None:
        self.generator = torch.Generator().manual_seed(seed)
        # Twice the window: every window [start, start + pool) is one slice.
        self.pool = torch.randn(2 * pool, dtype=torch.bfloat16, generator=self.generator).mul_(0.02)
        self.window = pool

    def __call__(self, t: torch.Tensor, key: str) -> torch.Tensor:
        if key.endswith("norm.weight"):
            # RMSNorm weights are 1 (HF's init): random 0.02 ones would shrink every
            # hidden state 50-fold, and the experts' inputs with it.
            return t.fill_(1.0)
        flat = t.view(-1)
        for pos in range(0, flat.numel(), self.window):
            n = min(self.window, flat.numel() - pos)
            start = int(torch.randint(self.window, (1,), generator=self.generator))
            flat[pos:pos + n].copy_(self.pool[start:start + n])  # converts to fp32 where HF keeps that
        return t


def quantize(key: str, t: torch.Tensor, block=FP8_BLOCK) -> Dict[str, torch.Tensor]:
    """`t` block-wise fp8 as DeepSeek's quantiser makes it: per block scale = amax / 448,
    w8 = w / scale; the weight and its float32 scale (`key` + "_scale_inv")."""
    bn, bk = block
    n, k = t.shape
    gn, gk = -(-n // bn), -(-k // bk)
    padded = torch.zeros(gn * bn, gk * bk)
    padded[:n, :k] = t
    blocks = padded.view(gn, bn, gk, bk)
    scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
    q = (blocks / scale[:, None, :, None]).view(gn * bn, gk * bk)[:n, :k]
    return {key: q.to(torch.float8_e4m3fn).contiguous(), key + "_scale_inv": scale}


def write_shard(file: str, specs: List[Spec], fill: RandomFill, fp8: bool) -> Dict[str, int]:
    """Writes one shard (projections fp8 with `fp8`); returns the bytes of each tensor.
    Its tensors are freed on return, before the next shard's are made."""
    from safetensors.torch import save_file

    tensors: Dict[str, torch.Tensor] = {}
    for key, shape, dtype in specs:
        t = fill(torch.empty(shape, dtype=dtype), key)
        tensors.update(quantize(key, t) if fp8 and quantized(key, shape) else {key: t})
    save_file(tensors, file, metadata={"format": "pt"})
    return {key: t.numel() * t.element_size() for key, t in tensors.items()}


def release_freed_memory() -> None:
    """Hands the freed heap back to the system. glibc serves tensors below its (adaptive,
    up to 32 MB) mmap threshold, such as V3's 29 MB experts, from a heap it keeps once
    they are freed: the next shard reuses it, but a larger one after (V3's 1.8 GB
    lm_head) would come on top of it, 1 GB more than one shard."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back this way
        pass


def write_checkpoint(path: str, meta, fp8: bool = False, shard_gb: float = 1.0, seed: int = 0) -> int:
    """Writes a random checkpoint of the meta-device model `meta` to `path`, shard by
    shard (about one shard of memory), laid out as save_pretrained does: shards,
    model.safetensors.index.json, config.json (last: a checkpoint with one is
    complete). With `fp8`, block-wise fp8 projections, each quantised as it is made.
    Returns the bytes of its tensors."""
    shards = plan_shards(checkpoint_tensors(meta), int(shard_gb * 1e9), fp8)
    fill = RandomFill(seed)
    os.makedirs(path, exist_ok=True)
    weight_map: Dict[str, str] = {}
    total = 0
    for n, specs in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        sizes = write_shard(os.path.join(path, name), specs, fill, fp8)
        release_freed_memory()
        weight_map.update(dict.fromkeys(sizes, name))
        total += sum(sizes.values())
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    config = copy.copy(meta.config)  # the caller's model stays unquantised
    if fp8:
        config.quantization_config = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                      "weight_block_size": list(FP8_BLOCK)}
    config.save_pretrained(path)
    return total


def evict(files) -> None:
    """Drops `files` from the page cache (clean pages only: they were written long ago)."""
    for name in files:
        fd = os.open(name, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def plain_read(files) -> float:
    """Seconds to read `files` sequentially in 64 MB chunks."""
    buf = memoryview(bytearray(64 << 20))
    t0 = time.perf_counter()
    for name in files:
        with open(name, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass
    return time.perf_counter() - t0


def expert_bytes(files) -> int:
    """Bytes of routed-expert tensors in the safetensors `files`."""
    total = 0
    for name in files:
        with open(name, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        total += sum(m["data_offsets"][1] - m["data_offsets"][0] for k, m in header.items() if ".experts." in k)
    return total


def breakdown(path: str) -> dict:
    """Seconds of one more load's two phases: `experts` (Rust reading, converting and
    packing every routed expert on the ktrs threads, `_native.load_experts`) and `rest`
    (headers, the non-expert weights, building the model)."""
    import ktrs
    from ktrs import hf

    took = {"experts": 0.0}
    native = hf._native.load_experts

    def timed(*args, **kwargs):
        t0 = time.perf_counter()
        native(*args, **kwargs)
        took["experts"] += time.perf_counter() - t0

    with unittest.mock.patch.object(hf._native, "load_experts", timed):
        t0 = time.perf_counter()
        ktrs.from_pretrained(path, device="cpu", dtype=torch.bfloat16)
    took["rest"] = time.perf_counter() - t0 - took["experts"]
    return took


def peak_rss() -> int:
    """Peak resident bytes of this process (VmHWM; ru_maxrss would carry over the peak of
    the parent that wrote the checkpoint, across exec)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def load(path: str, repeat: int, phases: bool, cold: bool) -> None:
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import ktrs

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]  # imports the model code: not timed
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    if cold:
        evict(files)
    read_s = plain_read(files)
    times, cpu, reads = [], [], []
    for _ in range(repeat):
        model = None
        gc.collect()
        if cold:
            # The disk's speed drifts (a VM's disk is a file in the host's cache):
            # each load is compared with a cold read just before it.
            evict(files)
            reads.append(plain_read(files))
            evict(files)
        t0, c0 = time.perf_counter(), time.process_time()
        model = ktrs.from_pretrained(path, device="cpu", dtype=torch.bfloat16)
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
    secs = times[0]
    packed = sum(b.experts.experts.weight_bytes for _, b in ktrs.find_moe_blocks(model))
    peak = peak_rss()
    sizes = [os.path.getsize(f) for f in files]
    model = None  # the breakdown's load reuses its memory rather than faulting in fresh pages
    gc.collect()
    took = breakdown(path) if phases else None
    print(json.dumps({"phases": took, "load_s": secs, "again_s": times[1:], "cpu_s": cpu, "cold": cold, "read_s": read_s, "reads_s": reads or [read_s] * repeat, "expert_gb": expert_bytes(files) / 1e9,
                      "peak_rss_gb": peak / 2**30, "packed_experts_gb": packed / 2**30,
                      "largest_shard_gb": max(sizes) / 2**30, "checkpoint_gb": sum(sizes) / 2**30,
                      "checkpoint_bytes": sum(sizes), "threads": ktrs.info()["default_threads"],
                      "cpus": os.cpu_count()}))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=sorted(MODELS), default="v2-lite",
                    help="the checkpoint's shape (bench_model.MODELS; v3: the first layer dense)")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default=None,
                    help="where the checkpoint is (written unless it has a config.json); default: "
                         "/tmp/ktrs-MODEL[-tiny]-LAYERSl[-fp8]")
    ap.add_argument("--load-only", action="store_true")
    ap.add_argument("--tiny", action="store_true",
                    help="the model's structure at toy sizes (v2-lite: 16 experts of 256x128): per-expert overhead, not bytes")
    ap.add_argument("--fp8", action="store_true", help="write the checkpoint block-wise fp8 (128x128 blocks)")
    ap.add_argument("--shard-gb", type=float, default=1.0, help="shard size when writing (GB on disk)")
    ap.add_argument("--breakdown", action="store_true", help="also time one more load's expert and non-expert phases")
    ap.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each read")
    ap.add_argument("--repeat", type=int, default=2,
                    help="loads in the same process; the later ones reuse memory the process already touched, "
                         "which shows ktrs' own rate where first-touching fresh memory is slow (VMs)")
    args = ap.parse_args()
    if args.dir is None:
        # The shape is in the name: an existing checkpoint is reused, so a default
        # shared across shapes would load the wrong one.
        args.dir = f"/tmp/ktrs-{args.model}{'-tiny' * args.tiny}-{args.layers}l{'-fp8' * args.fp8}"
    if args.load_only:
        load(args.dir, args.repeat, args.breakdown, args.cold)
        return 0
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        meta = meta_model(model_config(args.model, args.layers, tiny=args.tiny))  # imports the model code: not timed
        t0, c0 = time.perf_counter(), time.process_time()
        total = write_checkpoint(args.dir, meta, args.fp8, args.shard_gb)
        secs = time.perf_counter() - t0
        print(f"wrote {args.dir}: {total / 1e9:.2f} GB in {secs:.1f} s ({total / 1e9 / secs:.2f} GB/s; "
              f"CPU {time.process_time() - c0:.1f} s)", flush=True)
    extra = ["--breakdown"] * args.breakdown + ["--cold"] * args.cold
    r = subprocess.run([sys.executable, __file__, "--load-only", "--dir", args.dir, "--repeat", str(args.repeat), *extra], capture_output=True, text=True, env={**os.environ, "KTRS_NO_PROGRESS": "1"})
    if r.returncode:
        print(r.stderr)
        return r.returncode
    res = json.loads(r.stdout.strip().splitlines()[-1])
    gb = res["checkpoint_bytes"] / 1e9
    print(f"checkpoint {res['checkpoint_gb']:.2f} GiB ({res['expert_gb']:.2f} GB routed experts), largest shard "
          f"{res['largest_shard_gb']:.2f} GiB; {res['cpus']} CPUs, {res['threads']} ktrs threads")
    where = "cold: from the disk" if res["cold"] else "page cache"
    print(f"plain sequential read ({where}) {gb / res['read_s']:.2f} GB/s")
    for n, (secs, read) in enumerate(zip([res["load_s"], *res["again_s"]], res["reads_s"])):
        print(f"{'ktrs.from_pretrained' if n == 0 else '  again in the same process:'} {secs:.2f} s, "
              f"{res['expert_gb'] / secs:.2f} GB/s of experts, {gb / secs:.2f} GB/s of checkpoint "
              f"({read / secs:.0%} of the plain read at {gb / read:.2f} GB/s)")
    # CPU seconds of all threads: on a shared machine, steadier than the wall clock.
    print("CPU time of each load (all threads): " + ", ".join(f"{c:.2f} s" for c in res["cpu_s"]))
    print(f"packed experts {res['packed_experts_gb']:.2f} GiB; peak RSS while loading {res['peak_rss_gb']:.2f} GiB "
          f"(includes torch and the non-expert weights)")
    if res["phases"]:
        took = res["phases"]
        print(f"phases of one more load: routed experts {took['experts']:.2f} s "
              f"({res['expert_gb'] / took['experts']:.2f} GB/s), the rest {took['rest']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
