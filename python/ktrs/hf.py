"""HF transformers integration: put the routed experts of transformers-5 MoE models on ktrs.

`patch_model` swaps every MoE block's ``experts`` for a :class:`ktrs.KtrsExperts` whose
weights live in Rust, frees the originals and moves everything else to ``device``.
`from_pretrained` builds the model without ever materialising the experts in torch:
their weights stream from the safetensors shards straight into Rust packing.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import math
import os
import re
import types
from typing import Callable, Dict, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn

from . import _native, decode
from ._native import KtrsFileNotFoundError, KtrsTypeError, KtrsValueError
from .experts import MoeExperts
from .families import _PROJ, family_for, ignored_keys
from .module import KtrsExperts
from .resident import parse_bytes, place_experts_on_gpu

__all__ = ["find_moe_blocks", "patch_model", "from_pretrained"]


def _fused_expert_shapes(experts: nn.Module) -> Optional[Tuple[int, int, int]]:
    """(E, H, I) if `experts` holds HF's fused expert tensors, else None."""
    gu = experts._parameters.get("gate_up_proj")
    dn = experts._parameters.get("down_proj")
    if gu is None or dn is None or gu.dim() != 3 or dn.dim() != 3:
        return None
    e, two_i, h = gu.shape
    if two_i % 2 or tuple(dn.shape) != (e, h, two_i // 2):
        return None
    return e, h, two_i // 2


def _is_module_list_experts(experts: nn.Module) -> bool:
    return isinstance(experts, nn.ModuleList) and len(experts) > 0 and all(
        isinstance(getattr(m, n, None), nn.Linear) for m in experts for n in ("gate_proj", "up_proj", "down_proj")
    )


def _custom_gate(experts: nn.Module) -> bool:
    """Whether the experts class replaces transformers' SwiGLU gate (`act(gate) * up`)
    with its own `_apply_gate` (GPT-OSS's clamped SwiGLU, for one)."""
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # a transformers without the experts interface
        return False
    own = getattr(type(experts), "_apply_gate", _default_apply_gate)
    return own is not _default_apply_gate


def _unsupported(experts: nn.Module) -> Optional[str]:
    """Why ktrs cannot run this experts module (its SwiGLU with fused, untransposed,
    bias-free weights), or None. Transformers' experts interface
    (`use_experts_implementation`) declares the layout on the module; modules without
    it are judged by their parameters."""
    names = set(experts._parameters)
    if any(n.endswith("_bias") for n in names) or getattr(experts, "has_bias", False):
        return "its experts have biases"
    if hasattr(experts, "limit") or hasattr(experts, "alpha") or _custom_gate(experts):
        return "its experts use their own gate function (e.g. GPT-OSS's clamped SwiGLU), ktrs runs SiLU(gate) * up"
    if getattr(experts, "is_transposed", False):
        return "its expert weights are stored transposed"
    if getattr(experts, "has_gate", True) is False:
        return "its experts are not gated (no SwiGLU)"
    if getattr(experts, "is_concatenated", True) is False:
        return "its gate and up rows are interleaved, not concatenated [gate; up]"
    if getattr(experts, "has_post_expert_norm", False):
        return "its experts normalise their outputs (post-expert norm)"
    act = getattr(experts, "act_fn", None)
    if act is not None:
        probe = torch.tensor([-3.0, -0.5, 0.25, 2.0])
        if not torch.allclose(act(probe), torch.nn.functional.silu(probe)):
            return f"its experts use {type(act).__name__}, ktrs runs SiLU"
    if _fused_expert_shapes(experts) is None:
        shapes = {n: list(p.shape) for n, p in experts._parameters.items() if p is not None}
        return f"its expert weights {shapes} are not fused gate_up_proj [E, 2I, H] and down_proj [E, H, I]"
    return None


def find_moe_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """MoE blocks of `model`, found by structure: a module whose ``experts`` child holds
    fused 3-D expert weights (or is already a KtrsExperts) and which also has a router
    (``gate``). Dense MLPs (e.g. DeepSeek-V2's layer 0) are never matched. A block whose
    experts ktrs cannot run raises, naming the model class and the reason, so nothing is
    patched that would fail at the first forward."""
    found = []
    for name, mod in model.named_modules():
        experts = mod._modules.get("experts")
        router = mod._modules.get("gate", mod._modules.get("router"))
        if experts is None or router is None:
            continue
        if isinstance(experts, KtrsExperts):
            found.append((name, mod))
        elif _is_module_list_experts(experts):
            raise KtrsTypeError(
                f"{name}.experts is a ModuleList of per-expert MLPs: this model was loaded with "
                "trust_remote_code. ktrs supports the native transformers classes: load the "
                "checkpoint without trust_remote_code (transformers >= 5 converts the per-expert keys "
                "itself), e.g. AutoModelForCausalLM.from_pretrained(path), or use ktrs.from_pretrained(path)."
            )
        elif (reason := _unsupported(experts) or (None if "gate" in mod._modules else "its router is not a `gate` module")) is not None:
            raise KtrsTypeError(f"{type(model).__name__}: {name}.experts ({type(experts).__name__}) cannot run in ktrs: {reason}")
        else:
            found.append((name, mod))
    return found


#: Always-on experts of a MoE block: DeepSeek's `shared_experts`, Qwen2-MoE's
#: `shared_expert` with its sigmoid `shared_expert_gate`.
SHARED_EXPERT_NAMES = ("shared_experts", "shared_expert", "shared_expert_gate")


def shared_experts_of(block: nn.Module) -> List[nn.Module]:
    """The block's shared-expert modules (empty for Qwen3-MoE, Mixtral)."""
    return [m for n in SHARED_EXPERT_NAMES if (m := getattr(block, n, None)) is not None]


def _shared_output(block: nn.Module, flat: torch.Tensor, hidden_states: torch.Tensor) -> Optional[torch.Tensor]:
    """The block's always-on experts, shaped like `hidden_states`: DeepSeek's
    ``shared_experts``, Qwen2-MoE's sigmoid-gated ``shared_expert``, or None (Qwen3-MoE,
    Mixtral)."""
    if getattr(block, "shared_experts", None) is not None:
        return block.shared_experts(hidden_states)
    if getattr(block, "shared_expert", None) is not None:
        out = block.shared_expert(flat)
        gate = getattr(block, "shared_expert_gate", None)
        if gate is not None:
            out = torch.sigmoid(gate(flat)) * out
        return out.view(hidden_states.shape)
    return None


def _moe_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    """The MoE block's forward (DeepSeek-V2/V3, Qwen2/3-MoE, Mixtral, GLM-4-MoE: router,
    routed experts, optional shared experts) with the routed experts in ktrs, overlapped
    with the GPU's shared experts."""
    orig_shape = hidden_states.shape
    jitter = getattr(self, "jitter_noise", 0) or 0
    if self.training and jitter > 0:  # Mixtral's router jitter, as its block applies it
        hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(1.0 - jitter, 1.0 + jitter)
    flat = hidden_states.view(-1, hidden_states.shape[-1])
    _, topk_weights, topk_indices = self.gate(flat)
    experts: KtrsExperts = self.experts
    needs_grad = torch.is_grad_enabled() and (flat.requires_grad or any(p.requires_grad for p in experts.parameters()))
    if flat.is_cuda and not needs_grad and decode.host_node_mode():
        # Decode graphs: the experts become stream work, no Python per step; the GPU runs
        # the shared experts (and resident routed ones) while the CPU runs the routed ones.
        res = experts.resident if experts.resident is not None and experts.resident.serves(flat.device) else None
        if res is not None and res.count == experts.num_experts:
            routed = res.decode_forward(flat, topk_indices, topk_weights, experts.lora_active, experts.experts.lora_scaling).to(flat.dtype)
            shared = _shared_output(self, flat, hidden_states)
        else:
            finish = decode.submit_on_stream(experts, flat, topk_indices if res is None else res.cpu_ids(topk_indices), topk_weights)
            shared = _shared_output(self, flat, hidden_states)
            on_gpu = res.decode_forward(flat, topk_indices, topk_weights, experts.lora_active, experts.experts.lora_scaling) if res is not None else None
            routed = finish()
            if on_gpu is not None:
                routed = (routed.float() + on_gpu).to(flat.dtype)
    elif flat.is_cuda and not needs_grad:
        pending = experts.submit(flat, topk_indices, topk_weights)
        shared = _shared_output(self, flat, hidden_states)
        routed = pending.result()
    else:
        routed = experts(flat, topk_indices, topk_weights)
        shared = _shared_output(self, flat, hidden_states)
    routed = routed.view(*orig_shape)
    return routed if shared is None else routed + shared


def _install(block: nn.Module, experts: MoeExperts, name: str = "") -> None:
    block.experts = KtrsExperts(experts)
    block.experts.where = f"{name}.experts" if name else "experts"
    block.forward = types.MethodType(_moe_forward, block)


#: Largest relative L2 difference between a block's own forward and ktrs' on the probe:
#: bf16 experts differ by ~1e-2; a block whose math ktrs does not reproduce (a dropped
#: extra MLP, a scaling factor, a projection around the experts) by far more.
PROBE_TOLERANCE = 5e-2


def _probe_and_install(model: nn.Module, name: str, block: nn.Module, rust: MoeExperts) -> None:
    """Installs ktrs in `block` if its own forward and ktrs' agree on a probe input; else
    puts the block back as it was and raises, naming the model class and the reason.

    The replacement forward runs router, routed experts and shared experts (the
    structure every MoE block shares); a family whose block does more (Hunyuan's
    `shared_mlp`, latent projections, block-level scaling) would run silently wrong.
    The router sees the same input in both runs, so routing is the same; only the
    experts' arithmetic differs."""
    old = block.experts
    x = torch.randn(1, 8, rust.hidden_size, generator=torch.Generator().manual_seed(0)).to(old.gate_up_proj)
    training = block.training
    block.eval()  # no router jitter
    reason = None
    try:
        with torch.no_grad():
            want = type(block).forward(block, x)
    except Exception as exc:  # noqa: BLE001 - reported with the model class below
        block.train(training)
        raise KtrsTypeError(f"{type(model).__name__}: {name} ({type(block).__name__}): its own forward fails on a probe input "
                            f"({type(exc).__name__}: {exc}); ktrs checks each MoE block against it before patching") from exc
    try:
        with torch.no_grad():
            _install(block, rust, name)
            got = block.forward(x)
        if not isinstance(want, torch.Tensor) or want.shape != got.shape:
            reason = f"its forward returns {type(want).__name__} {list(getattr(want, 'shape', []))}, not the hidden states"
        else:
            err = float((got.double() - want.double()).norm() / want.double().norm().clamp_min(1e-30))
            if not err <= PROBE_TOLERANCE:
                reason = (f"its forward does more than router, routed experts and shared experts "
                          f"(ktrs' replacement differs by {err:.1%} on a probe input)")
    except Exception as exc:  # noqa: BLE001 - any failure of the replacement is a refusal
        reason = f"the block forward ktrs runs fails on it ({type(exc).__name__}: {exc})"
    finally:
        block.train(training)
    if reason is not None:
        block.experts = old
        block.__dict__.pop("forward", None)
        raise KtrsTypeError(f"{type(model).__name__}: {name} ({type(block).__name__}) cannot run in ktrs: {reason}")


def default_threads(device: torch.device, threads: Optional[int] = None) -> Optional[int]:
    """The kernels' threads of a model on `device`: as asked, or KTRS_THREADS; else on CUDA
    one per physical core but one, which is left to the Python thread that drives the
    GPU while the experts run (it launches the GPU's share of each split call, routers and
    attention). Reference machine, V2-Lite LoRA SFT 2048 with the GPU split: 1,510 tok/s
    with 15 of 16 cores against 1,258 with 16 (2026-12-03, same host)."""
    if threads is not None or device.type != "cuda" or os.environ.get("KTRS_THREADS"):
        return threads
    return max(1, _native.resolve_threads(None) - 1)


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def patch_model(
    model: nn.Module,
    *,
    device: Optional[Union[str, torch.device]] = None,
    threads: Optional[int] = None,
    isa: Optional[str] = None,
    lora_rank: int = 0,
    lora_alpha: Optional[float] = None,
    use_rslora: bool = False,
    seed: int = 0,
    gpu_expert_memory: Union[int, str, None] = None,
) -> nn.Module:
    """Moves the routed experts of every MoE block of `model` into ktrs and the rest to `device`.

    Works on transformers-5 MoE models whose experts are a SwiGLU with fused
    ``gate_up_proj [E, 2I, H]`` and ``down_proj [E, H, I]`` and whose block is router,
    routed experts and optional shared experts (DeepSeek-V2/V3, Qwen2/3-MoE, Mixtral,
    GLM-4-MoE, tested; others such as OLMoE pass the same checks). Anything else is
    refused before it is patched, naming the model class and the reason: the experts'
    declared layout, and a probe of each block class against its own forward. The
    original expert tensors are freed: nothing in Python keeps them. Attention, router, shared experts, dense MLPs, norms, embeddings and ``lm_head``
    go to `device` (default: CUDA when available, else CPU). Patching twice is a no-op.

    Args:
        device: where everything but the routed experts runs.
        threads: ktrs worker threads (default: one per physical core, or ``KTRS_THREADS``).
        isa: ``"amx"``, ``"avx512"`` or ``"scalar"`` (default: the best, or ``KTRS_ISA``).
        lora_rank, lora_alpha, use_rslora: expert LoRA owned by ktrs (0: none).
        gpu_expert_memory: GPU memory (bytes, or a size such as ``"12GiB"``) for routed
            experts kept on `device` as well, the most used first; see
            :func:`ktrs.place_experts_on_gpu`.
    """
    device = torch.device(device or _default_device())
    opts = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, use_rslora=use_rslora, isa=isa, threads=default_threads(device, threads), seed=seed)
    blocks = find_moe_blocks(model)
    if not blocks:
        raise KtrsValueError(f"{type(model).__name__} has no MoE block with fused experts; ktrs patches transformers-5 MoE models with fused SwiGLU experts (DeepSeek-V2/V3, Qwen2/3-MoE, Mixtral, GLM-4-MoE)")
    probed = set()
    for name, block in blocks:
        if isinstance(block.experts, KtrsExperts):
            continue
        old = block.experts
        e, h, i = _fused_expert_shapes(old)
        if old.gate_up_proj.is_meta:
            raise KtrsValueError(f"{name}.experts has no weights (meta tensors); use ktrs.from_pretrained(path) to stream them from disk")
        rust = MoeExperts.empty(e, h, i, **opts)
        with torch.no_grad():
            gu, dn = old.gate_up_proj, old.down_proj
            for x in range(e):  # one expert at a time: no second full copy in torch
                rust.set_expert(x, gu[x, :i], gu[x, i:], dn[x])
        del gu, dn
        if type(block) not in probed:
            _probe_and_install(model, name, block, rust)
            probed.add(type(block))
        else:
            _install(block, rust, name)
        # Free the originals now, not at the next GC: their storage may be tens of GB.
        for p in ("gate_up_proj", "down_proj"):
            old._parameters[p] = None
        del old
    gc.collect()
    model.to(device)
    model._ktrs_device = device
    decode.enable(model)
    _place(model, gpu_expert_memory, device)
    return model


def _place(model: nn.Module, memory: Union[int, str, None], device: torch.device) -> None:
    if memory is not None and parse_bytes(memory) > 0:
        place_experts_on_gpu(model, memory=memory, device=device)


# -- streaming load ------------------------------------------------------------------------
#: Model-side fused expert names (what transformers 5 itself writes with
#: ``save_original_format=False``, and what `state_dict()` holds).
_FUSED = re.compile(r"^(?:model\.)?layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")


#: safetensors' float8 dtypes (block-wise fp8 checkpoints, see `_Fp8`).
_FP8_DTYPES = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}


def _is_fp8(t: torch.Tensor) -> bool:
    return t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)

#: The per-block scale of float8 tensor ``X.weight`` is ``X.weight`` + this.
_SCALE = "_scale_inv"


class _Fp8:
    """Block-wise fp8 checkpoints (``quantization_config.quant_method == "fp8"``:
    DeepSeek-V3/R1 and the "-FP8" Qwen3/GLM releases). Each float8 ``X.weight`` [n, k]
    comes with a float32 ``X.weight_scale_inv`` holding one multiplier per
    ``weight_block_size`` block (the last block of a dimension that is not a multiple of
    the block is partial); w = w8 * scale_inv[block].

    ktrs dequantises everything on load: the routed experts to bf16 on their way into
    packing, the rest to the model's dtype. transformers' own ways do not fit: its fp8
    GPU kernels come from the `kernels` hub package (a download), and its
    ``dequantize=True`` path (5.17 to 5.24) derives the block from the scale grid
    (rows // grid rows), which mis-scales partial last blocks or refuses them (e.g.
    DeepSeek-V3's kv_a_proj_with_mqa, 576 rows in 5 blocks of 128).
    """

    def __init__(self, block: Optional[Tuple[int, int]]) -> None:
        self.block = block

    @classmethod
    def of(cls, config, what: str) -> Optional["_Fp8"]:
        """The checkpoint's fp8 scheme from `config`, None when it is not quantised;
        another quantisation raises `KtrsValueError`."""
        q = getattr(config, "quantization_config", None)
        if q is None:
            return None
        q = q if isinstance(q, dict) else q.to_dict()
        method = q.get("quant_method")
        if method != "fp8":
            raise KtrsValueError(f"{what}: quantization_config.quant_method {method!r} is not supported; ktrs loads "
                                 "bf16/fp16/fp32 checkpoints and block-wise fp8 ones (quant_method 'fp8')")
        if q.get("scale_fmt", "float") != "float":
            raise KtrsValueError(f"{what}: quantization_config.scale_fmt {q.get('scale_fmt')!r} is not supported; "
                                 "ktrs reads float32 weight_scale_inv tensors (scale_fmt 'float')")
        block = q.get("weight_block_size")
        ok = block is None or (isinstance(block, (list, tuple)) and len(block) == 2
                               and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block))
        if not ok:
            raise KtrsValueError(f"{what}: quantization_config.weight_block_size must be two positive integers "
                                 f"(or null: one scale per tensor), got {block!r}")
        return cls(tuple(block) if block is not None else None)

    def block_of(self, weight_shape: List[int], scale_shape: List[int], key: str) -> Tuple[int, int]:
        """The block size of float8 tensor `key` ([..., n, k]); a scale whose shape does
        not fit its blocks' grid raises, naming `key`."""
        if len(weight_shape) < 2:
            raise KtrsValueError(f"{key}: shape {list(weight_shape)}; float8 weights are matrices")
        n, k = weight_shape[-2:]
        bn, bk = self.block or (n, k)
        grid = [*weight_shape[:-2], -(-n // bn), -(-k // bk)]
        per_tensor = self.block is None and math.prod(scale_shape) == 1
        if not per_tensor and list(scale_shape) != grid:
            raise KtrsValueError(
                f"{key}{_SCALE}: shape {list(scale_shape)} does not fit weight {list(weight_shape)} in blocks of "
                f"{[bn, bk]} (quantization_config.weight_block_size), which need scales {grid}")
        return bn, bk

    def grid(self, weight: torch.Tensor, scale: torch.Tensor, key: str) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """`scale` shaped as its blocks' grid over `weight` ([..., n, k]) and the block
        size; a scale that does not fit raises, naming `key`."""
        bn, bk = self.block_of(list(weight.shape), list(scale.shape), key)
        n, k = weight.shape[-2:]
        return scale.reshape(*weight.shape[:-2], -(-n // bn), -(-k // bk)), (bn, bk)

    def dequantize(self, weight: torch.Tensor, scale: torch.Tensor, key: str) -> torch.Tensor:
        """The float32 values of the float8 tensor `key` ([..., n, k]) and its scales: for
        weights outside the experts of a model not in bf16 (rounding to bf16 on the way
        would lose precision); bf16 results come from `_native.dequantize_fp8`."""
        scale, (bn, bk) = self.grid(weight, scale, key)
        n, k = weight.shape[-2:]
        values = torch.empty(weight.shape, dtype=torch.float32)
        # A lookup in a 256-entry table (made by torch's own conversion, so the same
        # values) with int32 indices: 5x faster than torch's float8 -> float32 cast on the CPU.
        index = weight.view(torch.uint8).to(torch.int32)
        torch.index_select(_fp8_table(weight.dtype), 0, index.view(-1), out=values.view(-1))
        # Scales expanded over rows only ([n, k / bk], small); columns broadcast.
        rows = scale.float().repeat_interleave(bn, -2)[..., :n, :]
        full = k // bk
        if full:
            values[..., : full * bk].unflatten(-1, (full, bk)).mul_(rows[..., :full, None])
        if k % bk:
            values[..., full * bk :].mul_(rows[..., full:])
        return values


@functools.lru_cache(maxsize=None)
def _fp8_table(dtype: torch.dtype) -> torch.Tensor:
    """float32 value of each of the 256 bit patterns of the float8 `dtype`."""
    return torch.arange(256, dtype=torch.uint8).view(dtype).float()


def _not_fp8(key: str, what: str) -> KtrsValueError:
    return KtrsValueError(f"{what}: {key} is float8, but config.json has no quantization_config with "
                          "quant_method 'fp8' (which gives its weight_block_size)")


def _shards(path: str) -> List[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, x) for x in files]
    single = os.path.join(path, "model.safetensors")
    if os.path.exists(single):
        return [single]
    raise KtrsFileNotFoundError(f"no model.safetensors or model.safetensors.index.json in {path!r}")


class _Shard:
    """The header of one safetensors file: where each tensor's bytes lie. Routed experts
    are read by Rust (`_native.load_experts`) from these byte ranges; the rest through
    safetensors."""

    def __init__(self, path: str, index: int) -> None:
        """`index`: the shard's place in the list of paths handed to Rust."""
        self.path, self.index = path, index
        if not os.path.isfile(path):
            raise KtrsFileNotFoundError(f"{path}: listed in model.safetensors.index.json, but missing")
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            self.header = json.loads(f.read(n))
        self.header.pop("__metadata__", None)
        self.base = 8 + n  # the data section starts after the header

    def keys(self) -> List[str]:
        return list(self.header)

    def source(self, key: str, scale: Optional[tuple] = None, part: Tuple[int, int] = (0, 1),
               shape: Optional[List[int]] = None) -> tuple:
        """Where tensor `key` lies, as `_native.load_experts` takes it: the `part[0]`-th of
        `part[1]` equal pieces of its bytes (an expert's slice of a fused tensor), with
        `shape` (default: the header's) and the float8 `scale` source."""
        meta = self.header[key]
        start, end = meta["data_offsets"]
        size = (end - start) // part[1]
        return (key, self.index, self.base + start + part[0] * size, size, meta["dtype"],
                list(meta["shape"] if shape is None else shape), scale)


def _progress(total: int, desc: str):
    try:
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit="expert", disable=os.environ.get("KTRS_NO_PROGRESS") == "1")
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        return None


def from_pretrained(
    path: str,
    *,
    device: Optional[Union[str, torch.device]] = None,
    dtype: torch.dtype = torch.bfloat16,
    threads: Optional[int] = None,
    isa: Optional[str] = None,
    lora_rank: int = 0,
    lora_alpha: Optional[float] = None,
    use_rslora: bool = False,
    seed: int = 0,
    gpu_expert_memory: Union[int, str, None] = None,
) -> nn.Module:
    """Loads a checkpoint of a family in :data:`ktrs.families.FAMILIES` (DeepSeek-V2/V3,
    Qwen2/3-MoE, Mixtral, GLM-4-MoE) with the routed experts streamed into ktrs.

    The model skeleton is built on the meta device; routed-expert weights go from the
    safetensors shards (the family's per-expert keys, or transformers 5's fused names)
    straight into Rust, many experts at once on the ktrs threads; everything else is
    loaded onto `device` in `dtype`. Host memory stays near the packed expert bytes
    plus one expert projection per thread.

    Block-wise fp8 checkpoints (``quantization_config.quant_method == "fp8"``, e.g.
    DeepSeek-V3/R1) are dequantised on load: routed experts to bf16, the rest to
    `dtype`; the model (and its config) is then an unquantised one.

    ``gpu_expert_memory``: as in :func:`patch_model`, routed experts also kept on `device`.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    what = f"ktrs.from_pretrained({path!r})"
    config = AutoConfig.from_pretrained(path)
    family = family_for(getattr(config, "model_type", None), what)
    fp8 = _Fp8.of(config, what)
    if fp8 is not None:
        # The model holds dequantised weights: save_pretrained/export_merged must not
        # describe it as fp8.
        del config.quantization_config
    device = torch.device(device or _default_device())
    opts = dict(lora_rank=lora_rank, lora_alpha=lora_alpha, use_rslora=use_rslora, isa=isa, threads=default_threads(device, threads), seed=seed)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    blocks = {}
    for name, block in find_moe_blocks(model):
        layer = int(re.search(r"layers\.(\d+)\.", name + ".").group(1))
        e, h, i = _fused_expert_shapes(block.experts)
        rust = MoeExperts.empty(e, h, i, **opts)
        _install(block, rust, name)
        blocks[layer] = (rust, i, name)
    # HF keeps some weights in fp32 whatever the dtype (the router's, for DeepSeek-V2).
    keep_fp32 = tuple(getattr(model, "_keep_in_fp32_modules_strict", None) or ())
    total = sum(r.num_experts for r, _, _ in blocks.values())
    bar = _progress(total, "ktrs: loading experts")
    state: Dict[str, torch.Tensor] = {}
    per_expert = family.expert_pattern()
    expert_scale = family.expert_pattern(re.escape(".weight" + _SCALE))
    ignored = ignored_keys(model)
    from safetensors import safe_open

    shards = [_Shard(shard, n) for n, shard in enumerate(_shards(path))]
    # Sort every tensor: routed-expert weights and scales by (layer, expert), fused
    # expert tensors by layer, the rest by shard.
    where: Dict[str, _Shard] = {}
    experts: Dict[Tuple[int, int], Dict[str, str]] = {}
    fused: Dict[int, Dict[str, str]] = {}
    rest: Dict[str, List[str]] = {}
    for shard in shards:
        for key in shard.keys():
            if any(p.search(key) for p in ignored):
                continue  # never read: layers the model does not build
            where[key] = shard
            m, suffix = per_expert.match(key), ""
            if m is None and (m := expert_scale.match(key)) is not None:
                suffix = _SCALE
            if m and int(m.group(2)) in blocks:
                experts.setdefault((int(m.group(2)), int(m.group(3))), {})[family.proj(m.group(4)) + suffix] = key
            elif (m := _FUSED.match(family.to_model(key))) and int(m.group(1)) in blocks:
                if shard.header[key]["dtype"] in _FP8_DTYPES:
                    raise KtrsValueError(f"{what}: {key} is a float8 fused expert tensor; ktrs streams float8 experts "
                                         "under the original per-expert keys (experts.N.gate_proj.weight and its scale)")
                fused.setdefault(int(m.group(1)), {})[m.group(2)] = key
            else:
                rest.setdefault(shard.path, []).append(key)

    def expert_key(layer: int, x: int, proj: str) -> str:
        return family.expert_key(blocks[layer][2], x, proj)

    missing = [(layer, x) for layer, (rust, _, _) in sorted(blocks.items()) if layer not in fused
               for x in range(rust.num_experts) if (layer, x) not in experts]
    if missing:
        layer, x = missing[0]
        raise KtrsValueError(f"{what}: the checkpoint lacks {len(missing)} of {total} routed experts, "
                             f"e.g. {expert_key(layer, x, 'gate')}")

    # Where each expert's projections lie, by layer; Rust reads and packs them.
    sources: Dict[int, List[tuple]] = {}
    for (layer, x), keys in sorted(experts.items()):
        fp8_weights = [p for p in _PROJ if p in keys and where[keys[p]].header[keys[p]]["dtype"] in _FP8_DTYPES]
        gap = [expert_key(layer, x, p) for p in _PROJ if p not in keys]
        gap += [expert_key(layer, x, p) + _SCALE for p in fp8_weights if p + _SCALE not in keys]
        if gap:
            raise KtrsValueError(f"{what}: routed expert {x} of layer {layer} is incomplete: missing {', '.join(gap)}")
        if fp8_weights and fp8 is None:
            raise _not_fp8(keys[fp8_weights[0]], what)
        projections = []
        for p in _PROJ:
            scale = None
            if p in fp8_weights:
                w, sk = keys[p], keys[p + _SCALE]
                block = fp8.block_of(where[w].header[w]["shape"], where[sk].header[sk]["shape"], w)
                scale = where[sk].source(sk)[:4] + (block,)
            projections.append(where[keys[p]].source(keys[p], scale))
        sources.setdefault(layer, []).append((x, *projections))
    for layer, parts in sorted(fused.items()):
        if len(parts) != 2:
            raise KtrsValueError(f"{what}: layer {layer} has fused experts {sorted(parts)} only; it needs gate_up_proj and down_proj")
        rust, i, _ = blocks[layer]
        e, h = rust.num_experts, rust.hidden_size
        for name, want in (("gate_up_proj", [e, 2 * i, h]), ("down_proj", [e, h, i])):
            key = parts[name]
            if where[key].header[key]["shape"] != want:
                raise KtrsValueError(f"{what}: {key} has shape {where[key].header[key]['shape']}, the model needs {want}")
        gu, dn = parts["gate_up_proj"], parts["down_proj"]
        # Expert x's gate and up are the halves of its slice of gate_up_proj.
        sources[layer] = [(x, where[gu].source(gu, part=(2 * x, 2 * e), shape=[i, h]),
                           where[gu].source(gu, part=(2 * x + 1, 2 * e), shape=[i, h]),
                           where[dn].source(dn, part=(x, e), shape=[h, i])) for x in range(e)]
    paths = [shard.path for shard in shards]
    for layer, layer_sources in sorted(sources.items()):
        _native.load_experts(blocks[layer][0]._native, paths, layer_sources,
                             progress=None if bar is None else bar.update)
    if bar is not None:
        bar.close()
    scales = {k for k in where if k.endswith(_SCALE)} if fp8 is not None else set()
    with contextlib.ExitStack() as scale_shards:
        # Opening a shard parses its whole header (milliseconds for a real checkpoint),
        # too slow once per scale: a scale in another shard than its weight is read
        # through a handle kept open. Only scale bytes of those get mapped; the shard
        # being loaded is closed after it, so one shard is mapped at a time.
        opened: Dict[str, object] = {}

        def scale_of(key: str, shard: str, f) -> torch.Tensor:
            path = where[key].path
            if path == shard:
                return f.get_tensor(key)
            if path not in opened:
                opened[path] = scale_shards.enter_context(safe_open(path, framework="pt", device="cpu"))
            return opened[path].get_tensor(key)

        for shard, keys in rest.items():
            with safe_open(shard, framework="pt", device="cpu") as f:
                for key in keys:
                    if key in scales and key[: -len(_SCALE)] in where:
                        continue  # read with its weight
                    if fp8 is not None and key.endswith(".activation_scale"):
                        continue  # static activation scales: meaningless for dequantised weights
                    name = family.to_model(key)
                    want = torch.float32 if any(name.endswith(k) for k in keep_fp32) else dtype
                    t = _dequantized(f.get_tensor(key), key, where, fp8, what, want, threads,
                                     functools.partial(scale_of, shard=shard, f=f))
                    if t.is_floating_point():
                        t = t.to(want)
                    state[name] = t.to(device)
    _load_rest(model, state, device)
    model._ktrs_device = device
    decode.enable(model)
    _place(model, gpu_expert_memory, device)
    return model


def _dequantized(t: torch.Tensor, key: str, where: Dict[str, _Shard], fp8: Optional[_Fp8], what: str,
                 dtype: torch.dtype, threads: Optional[int], scale_of: Callable[[str], torch.Tensor]) -> torch.Tensor:
    """Tensor `key` of the rest of the model, float8 ones dequantised with their scale
    (`scale_of` reads it from whichever shard holds it): to bf16 in Rust (on `threads`
    threads) when `dtype` is bf16, else to float32."""
    if not _is_fp8(t):
        return t
    if fp8 is None:
        raise _not_fp8(key, what)
    if key + _SCALE not in where:
        raise KtrsValueError(f"{what}: {key} is float8 but the checkpoint has no {key + _SCALE}")
    scale = scale_of(key + _SCALE)
    if dtype == torch.bfloat16 and t.dim() == 2:
        scale, block = fp8.grid(t, scale.float(), key)
        out = torch.empty(t.shape, dtype=torch.bfloat16)
        _native.dequantize_fp8(t.contiguous(), scale.contiguous(), out, block, threads=threads)
        return out
    return fp8.dequantize(t, scale, key)


def _load_rest(model: nn.Module, state: Dict[str, torch.Tensor], device: torch.device) -> None:
    """Loads the non-expert weights (assigning the tensors) and materialises what the
    checkpoint does not hold (tied weights, non-persistent buffers such as rotary tables)."""
    expected = {k for k in model.state_dict().keys()}
    unexpected = sorted(set(state) - expected)
    if unexpected:
        raise KtrsValueError(f"checkpoint has tensors the model does not expect, e.g. {unexpected[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if getattr(model.config, "tie_word_embeddings", False) or "lm_head.weight" not in state:
        model.tie_weights()
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing:
        raise KtrsValueError(f"checkpoint lacks weights for {missing[:5]} ({len(missing)} in all)")
    for name, mod in model.named_modules():
        metas = [b for b, t in mod._buffers.items() if t is not None and t.is_meta]
        if not metas:
            continue
        # Non-persistent buffers (rotary frequency tables) are rebuilt as __init__ builds them.
        cfg = getattr(mod, "config", None) or model.config
        try:
            with torch.device("cpu"):
                fresh = type(mod)(cfg)
        except TypeError as exc:
            raise KtrsValueError(f"cannot materialise buffers {metas} of {name or type(mod).__name__}") from exc
        for b in metas:
            mod._buffers[b] = fresh._buffers[b].to(device)
        for k, v in vars(fresh).items():
            if k not in mod.__dict__ and not k.startswith("_"):
                setattr(mod, k, v)
    model.to(device)
    model.eval()
