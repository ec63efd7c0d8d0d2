"""ktrs: routed experts of Mixture-of-Experts models on the CPU, with LoRA.

The expert weights, the expert LoRA weights and their gradients live in Rust memory;
Python sees zero-copy views. Start with :class:`MoeExperts` (one layer, forward and
backward) or :class:`KtrsExperts` (an ``nn.Module`` with autograd), and :func:`info`.
"""

from ._native import (
    MAX_THREADS,
    IsaUnavailableError,
    KtrsError,
    KtrsFileNotFoundError,
    KtrsAttributeError,
    KtrsInternalError,
    KtrsMemoryError,
    KtrsSystemError,
    KtrsTypeError,
    KtrsValueError,
    NonFiniteError,
    StaleHandleError,
    __version__,
)
from . import decode, optim
from .adapters import load_adapter, save_adapter
from .experts import ForwardHandle, MoeExperts
from .hf import find_moe_blocks, from_pretrained, patch_model
from .resident import count_routing, place_experts_on_gpu
from .info import info, set_tuning, tuning
from .module import KtrsExperts, experts_function
from .peft import expert_lora_parameters, get_peft_model
from .tools import describe, export_merged, inspect_adapter, merge_and_unload, merge_expert_lora

__all__ = [
    "decode",
    "optim",
    "describe",
    "export_merged",
    "inspect_adapter",
    "merge_and_unload",
    "merge_expert_lora",
    "ForwardHandle",
    "IsaUnavailableError",
    "KtrsError",
    "KtrsFileNotFoundError",
    "KtrsAttributeError",
    "KtrsInternalError",
    "KtrsMemoryError",
    "KtrsSystemError",
    "KtrsTypeError",
    "KtrsValueError",
    "MAX_THREADS",
    "NonFiniteError",
    "StaleHandleError",
    "KtrsExperts",
    "MoeExperts",
    "__version__",
    "experts_function",
    "expert_lora_parameters",
    "get_peft_model",
    "find_moe_blocks",
    "from_pretrained",
    "info",
    "load_adapter",
    "patch_model",
    "place_experts_on_gpu",
    "count_routing",
    "save_adapter",
    "set_tuning",
    "tuning",
]
