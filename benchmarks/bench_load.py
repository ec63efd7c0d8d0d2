"""Load speed and peak host memory of ktrs.from_pretrained.

Writes a DeepSeek-V2-Lite-shaped checkpoint with a few layers (random bf16 weights, real
per-expert key names, 1 GB shards), then, in a fresh process, reads the shards once
plainly (sequential 64 MB reads: the file's read speed, from the page cache when the
files were just written or read) and loads them with ktrs: GB/s of the routed-expert
bytes and of the whole checkpoint next to the plain read, and peak resident memory next
to what ktrs must hold (packed experts) and one shard. Imports are not timed.

    python benchmarks/bench_load.py --layers 4 --dir /tmp/v2lite-4l
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time


def write_checkpoint(path: str, layers: int) -> None:
    import torch
    from transformers import DeepseekV2ForCausalLM

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from bench_model import v2_lite_config

    torch.manual_seed(0)
    with torch.device("cpu"):
        model = DeepseekV2ForCausalLM(v2_lite_config(layers)).to(torch.bfloat16)
    model.save_pretrained(path, max_shard_size="1GB")


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


def load(path: str, repeat: int) -> None:
    import torch
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    import ktrs

    MODEL_FOR_CAUSAL_LM_MAPPING[type(AutoConfig.from_pretrained(path))]  # imports the model code: not timed
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".safetensors"))
    read_s = plain_read(files)
    times = []
    for _ in range(repeat):
        model = None
        gc.collect()
        t0 = time.perf_counter()
        model = ktrs.from_pretrained(path, device="cpu", dtype=torch.bfloat16)
        times.append(time.perf_counter() - t0)
    secs = times[0]
    packed = sum(b.experts.experts.weight_bytes for _, b in ktrs.find_moe_blocks(model))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    sizes = [os.path.getsize(f) for f in files]
    print(json.dumps({"load_s": secs, "again_s": times[1:], "read_s": read_s, "expert_gb": expert_bytes(files) / 1e9,
                      "peak_rss_gb": peak / 2**30, "packed_experts_gb": packed / 2**30,
                      "largest_shard_gb": max(sizes) / 2**30, "checkpoint_gb": sum(sizes) / 2**30,
                      "checkpoint_bytes": sum(sizes), "threads": ktrs.info()["default_threads"],
                      "cpus": os.cpu_count()}))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dir", default="/tmp/ktrs-v2lite-ckpt")
    ap.add_argument("--load-only", action="store_true")
    ap.add_argument("--repeat", type=int, default=2,
                    help="loads in the same process; the later ones reuse memory the process already touched, "
                         "which shows ktrs' own rate where first-touching fresh memory is slow (VMs)")
    args = ap.parse_args()
    if args.load_only:
        load(args.dir, args.repeat)
        return 0
    if not os.path.exists(os.path.join(args.dir, "config.json")):
        write_checkpoint(args.dir, args.layers)
    r = subprocess.run([sys.executable, __file__, "--load-only", "--dir", args.dir, "--repeat", str(args.repeat)], capture_output=True, text=True, env={**os.environ, "KTRS_NO_PROGRESS": "1"})
    if r.returncode:
        print(r.stderr)
        return r.returncode
    res = json.loads(r.stdout.strip().splitlines()[-1])
    gb = res["checkpoint_bytes"] / 1e9
    print(f"checkpoint {res['checkpoint_gb']:.2f} GiB ({res['expert_gb']:.2f} GB routed experts), largest shard "
          f"{res['largest_shard_gb']:.2f} GiB; {res['cpus']} CPUs, {res['threads']} ktrs threads")
    print(f"plain sequential read {gb / res['read_s']:.2f} GB/s; ktrs.from_pretrained {res['load_s']:.2f} s: "
          f"{res['expert_gb'] / res['load_s']:.2f} GB/s of experts, {gb / res['load_s']:.2f} GB/s of checkpoint "
          f"({gb / res['load_s'] / (gb / res['read_s']):.0%} of the plain read)")
    for secs in res["again_s"]:
        print(f"  again in the same process: {secs:.2f} s, {res['expert_gb'] / secs:.2f} GB/s of experts, "
              f"{gb / secs:.2f} GB/s of checkpoint ({gb / secs / (gb / res['read_s']):.0%} of the plain read)")
    print(f"packed experts {res['packed_experts_gb']:.2f} GiB; peak RSS while loading {res['peak_rss_gb']:.2f} GiB "
          f"(includes torch and the non-expert weights)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
