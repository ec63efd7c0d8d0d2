"""Load speed and peak host memory of ktrs.from_pretrained.

Writes a DeepSeek-V2-Lite-shaped checkpoint with a few layers (random bf16 weights, real
per-expert key names, 1 GB shards), then, in a fresh process, reads the shards once
plainly (sequential 64 MB reads: the file's read speed, from the page cache when the
files were just written or read) and loads them with ktrs: GB/s of the routed-expert
bytes and of the whole checkpoint next to the plain read, and peak resident memory next
to what ktrs must hold (packed experts) and one shard. Imports are not timed.

    python benchmarks/bench_load.py --layers 4 --dir /tmp/v2lite-4l
    python benchmarks/bench_load.py --layers 4 --fp8 --dir /tmp/v2lite-4l-fp8

`--fp8` writes the checkpoint block-wise fp8 (float8_e4m3fn projections with float32
scales per 128x128 block, as DeepSeek-V3/R1 ship). `--breakdown` also times one more
load's phases: the routed experts (read, converted and packed in Rust) and the rest.
`--cold` evicts the checkpoint's files from the page cache (posix_fadvise DONTNEED, those
files only) before the plain read and before each load, so both read from the disk.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import time
import unittest.mock


def write_checkpoint(path: str, layers: int, tiny: bool = False) -> None:
    import torch
    from transformers import DeepseekV2ForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_model import tiny_config, v2_lite_config

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = DeepseekV2ForCausalLM((tiny_config if tiny else v2_lite_config)(layers)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="1GB")


def quantize_checkpoint(path: str, block=(128, 128)) -> None:
    """Rewrites the checkpoint at `path` block-wise fp8, as DeepSeek's quantiser does:
    per block scale = amax / 448, w8 = w / scale; every 2-D projection weight."""
    import torch
    from safetensors.torch import load_file, save_file

    index_file = os.path.join(path, "model.safetensors.index.json")
    index = {"weight_map": {}}
    if os.path.exists(index_file):
        with open(index_file) as f:
            index = json.load(f)
    weight_map = index["weight_map"]
    shards = sorted(set(weight_map.values())) or ["model.safetensors"]
    bn, bk = block
    for shard in shards:
        tensors = load_file(os.path.join(path, shard))
        out = {}
        for key, t in tensors.items():
            if t.dim() != 2 or not (key.endswith("_proj.weight") or key.endswith("_proj_with_mqa.weight")):
                out[key] = t
                continue
            n, k = t.shape
            gn, gk = -(-n // bn), -(-k // bk)
            padded = torch.zeros(gn * bn, gk * bk)
            padded[:n, :k] = t.float()
            blocks = padded.view(gn, bn, gk, bk)
            scale = (blocks.abs().amax(dim=(1, 3)) / 448.0).clamp_min(1e-12)
            q = (blocks / scale[:, None, :, None]).view(gn * bn, gk * bk)[:n, :k]
            out[key] = q.to(torch.float8_e4m3fn).contiguous()
            out[key + "_scale_inv"] = scale
            weight_map[key + "_scale_inv"] = shard
        save_file(out, os.path.join(path, shard), metadata={"format": "pt"})
    if weight_map:
        with open(index_file, "w") as f:
            json.dump(index, f)
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": list(block)}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f)


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
    import torch

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
    import torch
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/ktrs-v2lite-ckpt")
    ap.add_argument("--load-only", action="store_true")
    ap.add_argument("--tiny", action="store_true",
                    help="the tiny DeepSeek-V2 shape (16 experts of 256x128): per-expert overhead, not bytes")
    ap.add_argument("--fp8", action="store_true", help="write the checkpoint block-wise fp8 (128x128 blocks)")
    ap.add_argument("--breakdown", action="store_true", help="also time one more load's expert and non-expert phases")
    ap.add_argument("--cold", action="store_true", help="evict the checkpoint from the page cache before each read")
    ap.add_argument("--repeat", type=int, default=2,
                    help="loads in the same process; the later ones reuse memory the process already touched, "
                         "which shows ktrs' own rate where first-touching fresh memory is slow (VMs)")
    args = ap.parse_args()
    if args.load_only:
        load(args.dir, args.repeat, args.breakdown, args.cold)
        return 0
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        write_checkpoint(args.dir, args.layers, args.tiny)
        if args.fp8:
            quantize_checkpoint(args.dir)
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
