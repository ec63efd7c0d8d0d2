"""What this machine offers ktrs."""

from __future__ import annotations

import os
from typing import Any, Dict, Optional

from . import _native


def info() -> Dict[str, Any]:
    """CPU features, available and selected ISA, thread defaults, AMX permission."""
    d = dict(_native.cpu_info())
    d["version"] = _native.__version__
    d["KTRS_ISA"] = os.environ.get("KTRS_ISA")
    d["KTRS_THREADS"] = os.environ.get("KTRS_THREADS")
    d["memory_gb"] = _meminfo_gb("MemTotal")
    d["memory_available_gb"] = _meminfo_gb("MemAvailable")
    from . import gpu_experts

    d["gpu_prefill_rows"] = gpu_experts.rows_threshold()
    d["gpu_prefill_model"] = gpu_experts.cost_model()
    return d


def _meminfo_gb(field: str) -> Optional[float]:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def format_info(d: Dict[str, Any]) -> str:
    rows = [
        ("ktrs version", d["version"]),
        ("CPU features", " ".join(d["features"]) or "(none relevant)"),
        ("available ISAs", ", ".join(d["available_isas"])),
        ("selected ISA", d["selected_isa"] + (f"  (KTRS_ISA={d['KTRS_ISA']})" if d.get("KTRS_ISA") else "")),
        ("what it means", d.get("isa_tiers", {}).get(d["selected_isa"], {}).get("speed", "")),
        *(
            (f"  tier {name}", "available" if t["status"] == "available" else t["status"])
            for name, t in d.get("isa_tiers", {}).items()
        ),
        ("physical cores", d["physical_cores"]),
        ("default threads", d["default_threads"] if not d.get("KTRS_THREADS") else f"{d['default_threads']}  (KTRS_THREADS)"),
        ("AMX permission", d["amx_permission"]),
        ("AMX kernels in build", "yes" if d["amx_kernels_built"] else "no"),
        ("memory", f"{d['memory_gb']} GB total, {d['memory_available_gb']} GB available" if d.get("memory_gb") else "unknown"),
        ("speed knobs", " ".join(f"{k}={v}" for k, v in d.get("tuning", {}).items())),
        ("GPU prefill", _gpu_prefill_line(d)),
    ]
    w = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{w}}  {v}" for k, v in rows)


def _gpu_prefill_line(d: Dict[str, Any]) -> str:
    rows = d.get("gpu_prefill_rows", 0)
    if not rows:
        return "off (KTRS_GPU_PREFILL_ROWS=0): every call on the CPU"
    pcie, dram, tf = d["gpu_prefill_model"]
    return (f"CUDA inference calls with >= {rows} rows per expert split experts with the GPU "
            f"(model: PCIe {pcie:g} GB/s, CPU {dram:g} GB/s and {tf:g} TFLOPS)")


def tuning() -> Dict[str, int]:
    """The kernels' speed knobs (named by their environment variables) and current values.

    Knobs change speed; the two that pick another kernel for some experts
    (``KTRS_AMX_MIN_ROWS``, ``KTRS_BWD_DIRECT_ROWS``) also change rounding.
    ``KTRS_NB=0`` means "chosen per call".
    """
    return dict(_native.tuning())


def set_tuning(name: str, value: Optional[int]) -> None:
    """Overrides one speed knob for this process; ``None`` restores the environment's
    value or the measured default. Used by the benchmarks to sweep settings."""
    _native.set_tuning(name, value)
