"""PEFT on a ktrs-patched model: routed-expert LoRA in ktrs, everything else in PEFT."""

from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Iterator, List, Optional, Tuple

from torch import nn

from ._native import KtrsAttributeError, KtrsValueError
from .families import known_family
from .hf import find_moe_blocks
from .module import KtrsExperts

__all__ = ["get_peft_model", "expert_lora_parameters"]

_EXPERT_PARAMS = {"gate_up_proj", "down_proj"}
_EXPERT_LEAVES = ("gate_proj", "up_proj", "down_proj")


@contextlib.contextmanager
def _no_moe_target_rewrite() -> Iterator[None]:
    """PEFT 0.21 rewrites gate_proj/up_proj/down_proj targets of transformers-5 MoE models
    into routed-expert `target_parameters`, silently dropping LoRA from the shared experts
    and dense MLPs (huggingface/peft#3711). ktrs owns the routed experts itself, so the
    rewrite is switched off while PEFT injects its adapters."""
    try:
        import peft.utils.transformers_weight_conversion as conv
    except ImportError:  # a PEFT without the rewrite
        yield
        return
    original = conv.convert_peft_config_for_transformers
    conv.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conv.convert_peft_config_for_transformers = original


# -- stock PEFT entry points on a ktrs model -------------------------------------------------
#
# `peft.get_peft_model(model, config)` and `PeftModel.from_pretrained(model, path)` on a
# patched model cannot give the routed experts LoRA: PEFT looks for `gate_up_proj`/
# `down_proj` parameters, which a KtrsExperts does not have (its weights are Rust's), and
# would drop those targets (with a RuntimeWarning when other targets matched, else an error
# about arguments the user did give). Stock PEFT's files of an expert adapter also need the
# layout conversion in `ktrs.adapters`. So PEFT's `BaseTuner.inject_adapter` (behind
# get_peft_model, PeftModel.from_pretrained/load_adapter/add_adapter, inject_adapter_in_model
# and transformers' model.add_adapter/load_adapter) refuses before it changes anything,
# naming the argument and the ktrs call that does it; ktrs' own calls never pass it expert
# targets. Installed once PEFT is imported (the rest of PEFT is untouched).


def _expert_targets_on_ktrs(peft_config, model: nn.Module) -> List[str]:
    targets = list(getattr(peft_config, "target_parameters", None) or [])
    if not targets:
        return []
    hits = []
    for name, module in model.named_modules():
        if isinstance(module, KtrsExperts):
            name = name.replace(".base_layer", "")
            for p in sorted(_EXPERT_PARAMS):
                key = f"{name}.{p}"
                if key in targets or any(key.endswith("." + t) for t in targets):
                    hits.append(key)
    return hits


def _as_peft_will_see_it(config, model: nn.Module):
    """`config` after PEFT's transformers-5 MoE target rewrite (which `inject_adapter` applies
    first), on a copy; `config` itself where the rewrite is off or does not apply."""
    if not any(isinstance(m, KtrsExperts) for m in model.modules()) or not hasattr(getattr(model, "config", None), "model_type"):
        return config
    try:
        from peft.utils import transformers_weight_conversion as conv

        seen = copy.deepcopy(config)
        conv.convert_peft_config_for_transformers(seen, model=model, conversions=conv.get_model_conversion_mapping(model))
        return seen
    except Exception:  # an older or newer PEFT: judge the config as given
        return config


def _install_stock_peft_guard(tuners_utils) -> None:
    base = tuners_utils.BaseTuner
    if getattr(base.inject_adapter, "_ktrs_guard", False):
        return
    original = base.inject_adapter

    def inject_adapter(self, model, adapter_name, *args, **kwargs):
        # Before PEFT changes anything (it wraps target_modules before target_parameters).
        config = getattr(self, "peft_config", {}).get(adapter_name) if isinstance(getattr(self, "peft_config", None), dict) else None
        seen = _as_peft_will_see_it(config, model) if config is not None else None
        hits = _expert_targets_on_ktrs(seen, model) if seen is not None else []
        if hits:
            raise KtrsValueError(
                f"PEFT was asked to put LoRA on ktrs' routed experts (target_parameters={sorted(seen.target_parameters)} "
                f"matches {hits[0]}, a ktrs.KtrsExperts whose weights live in Rust; PEFT's transformers-5 MoE rewrite also "
                "turns gate_proj/up_proj/down_proj in target_modules into these): stock peft.get_peft_model / "
                "PeftModel.from_pretrained / add_adapter cannot do that on a ktrs-patched model. Use "
                "ktrs.get_peft_model(model, config) or ktrs.load_adapter(model, adapter_dir), which take the same "
                "config and adapter files"
            )
        return original(self, model, adapter_name, *args, **kwargs)

    inject_adapter._ktrs_guard = True  # type: ignore[attr-defined]
    base.inject_adapter = inject_adapter


class _GuardOnImport:
    """Installs the guard when PEFT's tuner module is first imported (PEFT is optional and
    slow to import, so ktrs does not import it itself); removes itself after."""

    NAME = "peft.tuners.tuners_utils"

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.NAME:
            return None
        import importlib.util
        import sys

        if self in sys.meta_path:
            sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        loader = getattr(spec, "loader", None)
        if loader is None or not hasattr(loader, "exec_module"):
            return spec
        exec_module = loader.exec_module

        def exec_and_guard(module):
            exec_module(module)
            try:
                _install_stock_peft_guard(module)
            except Exception:  # never break importing PEFT
                pass

        loader.exec_module = exec_and_guard
        return spec


def _guard_stock_peft() -> None:
    import sys

    mod = sys.modules.get(_GuardOnImport.NAME)
    if mod is not None:
        _install_stock_peft_guard(mod)
    elif not any(isinstance(f, _GuardOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _GuardOnImport())


def _targets_expert_leaves(target_modules) -> bool:
    if target_modules is None:
        return False
    if isinstance(target_modules, str):
        return any(leaf in target_modules for leaf in _EXPERT_LEAVES)
    return any(t == leaf or t.endswith("." + leaf) for t in target_modules for leaf in _EXPERT_LEAVES)


def _split_config(config, expert_lora: Optional[bool] = None, routed_only: Tuple[str, ...] = (), model: Optional[nn.Module] = None):
    """(a copy of `config` without routed-expert targets, for PEFT; whether the routed
    experts get ktrs LoRA). `routed_only`: module names that can only mean the routed
    experts (Mixtral's w1/w2/w3), taken out of a list of `target_modules`. With `model`,
    `target_modules` that match none of its modules (gate_proj/up_proj/down_proj in a model
    without shared experts or dense MLPs) leave PEFT nothing to adapt, as if absent."""
    cfg = copy.deepcopy(config)
    params = set(cfg.target_parameters or [])
    modules = cfg.target_modules
    named_routed = False
    if routed_only and modules is not None and not isinstance(modules, str):
        kept = {t for t in modules if t.rsplit(".", 1)[-1] not in routed_only}
        named_routed = len(kept) < len(set(modules))
        cfg.target_modules = kept
    wants = expert_lora if expert_lora is not None else bool(params & _EXPERT_PARAMS) or named_routed or _targets_expert_leaves(cfg.target_modules)
    cfg.target_parameters = sorted(params - _EXPERT_PARAMS) or None
    if wants and model is not None and cfg.target_modules and not cfg.target_parameters:
        from peft.tuners.tuners_utils import check_target_module_exists

        if not any(check_target_module_exists(cfg, name) for name, _ in model.named_modules() if name):
            others = [] if isinstance(cfg.target_modules, str) else sorted(t for t in cfg.target_modules if t.rsplit(".", 1)[-1] not in _EXPERT_LEAVES)
            if others or isinstance(cfg.target_modules, str):
                # as stock PEFT does when only its routed-expert rewrite matched something
                warnings.warn(f"target_modules={sorted(others) or cfg.target_modules!r} matched no module; only the routed experts get LoRA", RuntimeWarning, stacklevel=3)
            cfg.target_modules = None
    if wants and not cfg.target_modules and not cfg.target_parameters:
        _expert_only(cfg)
    return cfg, wants


def _expert_only(cfg) -> None:
    """Makes `cfg` (which adapts nothing PEFT owns: the routed experts are ktrs') acceptable
    to PEFT: PEFT's own placeholder for an adapter that wraps no module (what X-LoRA uses),
    so PEFT keeps adapter names, activity and the config, and injects nothing. `save_adapter`
    writes the stock `target_modules: []` back into adapter_config.json."""
    from peft.utils.constants import DUMMY_TARGET_MODULES

    cfg.target_modules = DUMMY_TARGET_MODULES
    cfg.target_parameters = None


def expert_lora_parameters(model: nn.Module) -> Iterator[nn.Parameter]:
    """The routed-expert LoRA parameters (views of Rust memory) of a patched model."""
    for _, block in find_moe_blocks(model):
        if isinstance(block.experts, KtrsExperts):
            yield from block.experts.lora_experts.values()


def get_peft_model(model: nn.Module, config, *, expert_lora: Optional[bool] = None, adapter_name: str = "default", **kwargs):
    """`peft.get_peft_model` for a model patched by :func:`ktrs.patch_model`.

    Routed experts get LoRA owned by ktrs (rank ``config.r``, ``config.lora_alpha``,
    ``config.use_rslora``) when ``config`` targets them — ``target_parameters`` naming
    ``gate_up_proj``/``down_proj``, or ``gate_proj``/``up_proj``/``down_proj`` in
    ``target_modules`` (what PEFT would apply to the routed experts of a stock model) —
    or when ``expert_lora=True``. PEFT wraps only the GPU modules those targets match:
    attention, shared experts, dense MLPs; it never wraps ktrs' experts. A config that
    targets the routed experts alone is given to PEFT as an adapter without modules of its
    own (PEFT's ``DUMMY_TARGET_MODULES``), so PEFT still keeps its name and config.

    Afterwards each ktrs experts module is also a PEFT tuner layer (``BaseTunerLayer``,
    same object and path, see :func:`_tuner_layer_class`), so PEFT's walks over its layers
    (``get_model_status``, ``disable_adapter()``, ``merge_adapter``, ``peft.functional``'s
    ``set_adapter``/``set_requires_grad``/``delete_adapter``) reach the expert LoRA.
    """
    import peft

    blocks = find_moe_blocks(model)
    if not blocks or not all(isinstance(b.experts, KtrsExperts) for _, b in blocks):
        raise KtrsValueError("ktrs.get_peft_model needs a model patched by ktrs.patch_model (or loaded by ktrs.from_pretrained)")
    if getattr(config, "lora_dropout", 0.0) and expert_lora is not False:
        raise KtrsValueError("expert LoRA in ktrs has no dropout; set lora_dropout=0.0 (or expert_lora=False)")
    family = known_family(model)
    cfg, wants = _split_config(config, expert_lora, family.routed_only_names if family else (), model)
    if not cfg.target_modules and not cfg.target_parameters and not wants:
        raise KtrsValueError(
            "ktrs.get_peft_model: `config` targets nothing: give `target_modules` (e.g. ['q_proj', 'o_proj']) and/or "
            "`target_parameters=['gate_up_proj', 'down_proj']` (the routed experts), or pass expert_lora=True"
        )
    if wants:
        for _, block in blocks:
            ex = block.experts
            if (ex.experts.lora_rank, ex.experts.lora_alpha, ex.experts.use_rslora) != (cfg.r, cfg.lora_alpha, cfg.use_rslora):
                ex.enable_lora(cfg.r, alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora)
    with _no_moe_target_rewrite():
        pm = peft.get_peft_model(model, cfg, adapter_name=adapter_name, **kwargs)
    for p in expert_lora_parameters(pm):
        p.requires_grad_(bool(wants))
    _attach_save(pm)
    _attach_adapter_controls(pm, adapter_name)
    return pm


def _tuner_layer_class():
    """:class:`KtrsExperts` as a PEFT tuner layer (made on first use: PEFT is optional)."""
    global _TUNER_CLASS
    if _TUNER_CLASS is None:
        from peft.tuners.tuners_utils import BaseTunerLayer

        class KtrsTunerExperts(KtrsExperts, BaseTunerLayer):
            """A :class:`KtrsExperts` that PEFT recognises as one of its tuner layers
            (``BaseTunerLayer``), so PEFT's own walks over its layers reach the expert LoRA:
            ``get_model_status``/``disable_adapter()``, ``enable/disable_adapter_layers``,
            ``merge_adapter``/``unmerge_adapter``, and ``peft.functional``'s
            ``set_adapter``/``delete_adapter``/``set_requires_grad``. The LoRA stays the
            Rust-owned ``lora_experts`` of :class:`KtrsExperts`; PEFT holds no copy
            (``adapter_layer_names`` is empty, so PEFT's state dict, dtype casts and device
            moves never touch it). The module keeps its path (``...mlp.experts``), so the
            adapter files and everything that finds MoE blocks see the same names."""

            adapter_layer_names: Tuple[str, ...] = ()
            other_param_names: Tuple[str, ...] = ()

            # -- PEFT's state, mapped onto KtrsExperts' (kept in step by ktrs.peft) ------
            @property
            def active_adapters(self):  # type: ignore[override]
                return self.__dict__.get("_ktrs_active_adapters", ("default",))

            @active_adapters.setter
            def active_adapters(self, names) -> None:
                self.__dict__["_ktrs_active_adapters"] = (names,) if isinstance(names, str) else tuple(names)

            @property
            def active_adapter(self):  # type: ignore[override]
                names = self.active_adapters
                return names[0] if len(names) == 1 else list(names)

            @property
            def _disable_adapters(self) -> bool:  # type: ignore[override]
                return not self.adapters_enabled

            @_disable_adapters.setter
            def _disable_adapters(self, value: bool) -> None:
                self.adapters_enabled = not value

            @property
            def merged_adapters(self) -> List[str]:  # type: ignore[override]
                return [self.expert_adapter] if self.lora_merged and self.expert_adapter is not None else []

            # No base weight to show PEFT: the weights are in Rust (BaseTunerLayer's
            # `weight` would recurse into itself).
            @property
            def weight(self):  # type: ignore[override]
                raise KtrsAttributeError("KtrsExperts keeps its weights in Rust memory (see get_expert)")

            @property
            def bias(self):  # type: ignore[override]
                raise KtrsAttributeError("KtrsExperts has no bias")

            def _get_available_adapters(self) -> set:
                return set(self.adapter_names())

            def enable_adapters(self, enabled: bool) -> None:
                self.adapters_enabled = bool(enabled)

            def set_adapter(self, adapter_names, inference_mode: bool = False) -> None:
                names = [adapter_names] if isinstance(adapter_names, str) else list(adapter_names)
                stashed = [n for n in names if n in self._stash]
                if len(stashed) + (self.expert_adapter in names) > 1:
                    raise KtrsValueError(f"ktrs runs the expert LoRA of one adapter at a time; adapter_name={names} names several with expert LoRA")
                self.lora_merged = False  # PEFT unmerges before switching, too
                if stashed:
                    self.activate_adapter(stashed[0])
                self.active_adapters = tuple(names)
                for p in self.lora_experts.values():
                    p.requires_grad_(self.expert_adapter in names and not inference_mode)

            def set_requires_grad(self, adapter_names, requires_grad: bool = True) -> None:
                names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
                if self.expert_adapter in names:
                    for p in self.lora_experts.values():
                        p.requires_grad_(requires_grad)

            def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None) -> None:
                # ktrs keeps the expert LoRA unfused while "merged" (the outputs are those of
                # the merged weights, and unmerge is exact); merge_and_unload fuses for real.
                names = self.active_adapters if adapter_names is None else adapter_names
                if self.expert_adapter in names and len(self.lora_experts):
                    self.lora_merged = True

            def unmerge(self) -> None:
                self.lora_merged = False

            def delete_adapter(self, adapter_name: str) -> None:
                if self.lora_merged and self.expert_adapter == adapter_name:
                    raise KtrsValueError(f"cannot delete adapter {adapter_name!r} while it is merged; call unmerge_adapter() first")
                KtrsExperts.delete_adapter(self, adapter_name)
                if adapter_name in self.active_adapters:
                    left = [n for n in self.active_adapters if n != adapter_name] or self.adapter_names()[:1]
                    self.set_adapter(left)

        KtrsTunerExperts.__module__ = __name__
        KtrsTunerExperts.__qualname__ = "KtrsTunerExperts"
        _TUNER_CLASS = KtrsTunerExperts
    return _TUNER_CLASS


_TUNER_CLASS = None


def __getattr__(name: str):
    # `ktrs.peft.KtrsTunerExperts` (made on first use, as it subclasses PEFT's BaseTunerLayer).
    if name == "KtrsTunerExperts":
        return _tuner_layer_class()
    raise KtrsAttributeError(f"module {__name__!r} has no attribute {name!r}")


def _as_tuner_layers(model: nn.Module) -> None:
    """Makes every ktrs experts module of `model` a PEFT tuner layer (same object, state
    and path; only its class changes). Done after PEFT's injection: PEFT treats a model
    that already has tuner layers as adapted and would not freeze its base weights."""
    cls = _tuner_layer_class()
    for ex in _ktrs_experts(model):
        if type(ex) is KtrsExperts:
            active = ex.__dict__.pop("active_adapters", ("default",))
            ex.__class__ = cls
            ex.active_adapters = active


def _as_plain_experts(model: nn.Module) -> None:
    """Undoes :func:`_as_tuner_layers` (after PEFT's unload: the model is plain again)."""
    for ex in _ktrs_experts(model):
        if type(ex) is not KtrsExperts and type(ex) is _TUNER_CLASS:
            active = ex.active_adapters
            ex.__dict__.pop("_ktrs_active_adapters", None)
            ex.__class__ = KtrsExperts
            ex.active_adapters = active


def _ktrs_experts(model: nn.Module) -> List[KtrsExperts]:
    return [b.experts for _, b in find_moe_blocks(model) if isinstance(b.experts, KtrsExperts)]


def _sync_adapter_state(tuner) -> None:
    """Copies the tuner's active adapters and enablement onto every ktrs expert layer."""
    active = tuple(tuner.active_adapters)
    for ex in _ktrs_experts(tuner.model):
        ex.active_adapters = active


def _attach_adapter_controls(pm, adapter_name: str) -> None:
    """Makes PEFT's adapter controls reach the expert LoRA, which lives in ktrs, not in
    PEFT's layers (failure-modes row 11): ``disable_adapter()`` and
    ``enable/disable_adapter_layers``, ``set_adapter``, ``merge_adapter``/
    ``unmerge_adapter`` and ``delete_adapter``, on the PeftModel or its ``base_model``."""
    import types

    tuner = pm.base_model
    _as_tuner_layers(tuner.model)
    for ex in _ktrs_experts(tuner.model):
        if len(ex.lora_experts):
            ex.expert_adapter = adapter_name
    _sync_adapter_state(tuner)
    if getattr(tuner, "_ktrs_controls", False):
        return
    tuner._ktrs_controls = True
    cls = type(tuner)

    def _enable_adapter_layers(self, enabled: bool = True) -> None:
        cls._enable_adapter_layers(self, enabled)
        for ex in _ktrs_experts(self.model):
            ex.adapters_enabled = bool(enabled)

    def set_adapter(self, adapter_name, inference_mode: bool = False) -> None:
        names = [adapter_name] if isinstance(adapter_name, str) else list(adapter_name)
        for ex in _ktrs_experts(self.model):  # refuse before anything changes
            if sum(n in ex._stash for n in names) + (ex.expert_adapter in names) > 1:
                raise KtrsValueError(f"ktrs runs the expert LoRA of one adapter at a time; adapter_name={names} names several with expert LoRA")
        cls.set_adapter(self, adapter_name, inference_mode=inference_mode)
        # PEFT's set_adapter visits LoraLayers only; the ktrs layers are BaseTunerLayers.
        for ex in _ktrs_experts(self.model):
            ex.set_adapter(names, inference_mode=inference_mode)
        _sync_adapter_state(self)

    def _unload_and_optionally_merge(self, *args, **kwargs):
        result = cls._unload_and_optionally_merge(self, *args, **kwargs)
        _as_plain_experts(self.model)
        return result

    def merge_adapter(self, adapter_names: Optional[List[str]] = None, safe_merge: bool = False) -> None:
        cls.merge_adapter(self, adapter_names=adapter_names, safe_merge=safe_merge)
        names = self.active_adapters if adapter_names is None else adapter_names
        for ex in _ktrs_experts(self.model):
            if ex.expert_adapter in names and len(ex.lora_experts):
                ex.lora_merged = True

    def unmerge_adapter(self) -> None:
        cls.unmerge_adapter(self)
        for ex in _ktrs_experts(self.model):
            ex.lora_merged = False

    def delete_adapter(self, adapter_name: str) -> None:
        for ex in _ktrs_experts(self.model):
            if ex.lora_merged and ex.expert_adapter == adapter_name:
                raise KtrsValueError(f"cannot delete adapter {adapter_name!r} while it is merged; call unmerge_adapter() first")
        cls.delete_adapter(self, adapter_name)
        for ex in _ktrs_experts(self.model):
            ex.delete_adapter(adapter_name)
        _sync_adapter_state(self)
        # PEFT picked a new active adapter; if its expert LoRA is stashed, bring it in.
        for ex in _ktrs_experts(self.model):
            for n in self.active_adapters:
                ex.activate_adapter(n)

    for fn in (_enable_adapter_layers, set_adapter, merge_adapter, unmerge_adapter, delete_adapter, _unload_and_optionally_merge):
        setattr(tuner, fn.__name__, types.MethodType(fn, tuner))

    peft_add = pm.add_adapter

    def add_adapter(self, adapter_name: str, peft_config, *args, **kwargs):
        """PEFT's add_adapter; routed-expert targets become ktrs expert LoRA of the new
        adapter (PEFT would silently match nothing there)."""
        family = known_family(self)
        cfg, wants = _split_config(peft_config, None, family.routed_only_names if family else (), self.base_model.model)
        if wants and getattr(cfg, "lora_dropout", 0.0):
            raise KtrsValueError("expert LoRA in ktrs has no dropout; set lora_dropout=0.0")
        with _no_moe_target_rewrite():
            result = peft_add(adapter_name, cfg, *args, **kwargs)
        if wants:
            for ex in _ktrs_experts(self.base_model.model):
                ex.add_adapter_lora(adapter_name, cfg.r, alpha=cfg.lora_alpha, use_rslora=cfg.use_rslora)
        return result

    pm.add_adapter = types.MethodType(add_adapter, pm)


def _attach_save(pm) -> None:
    """Makes `pm.save_pretrained` and `pm.load_adapter` (what the HF Trainer calls to save
    and resume checkpoints) carry the expert LoRA too."""
    import types

    from .adapters import add_adapter_from_dir, restore_expert_lora, save_adapter

    if getattr(pm, "_ktrs_peft_save_pretrained", None) is not None:
        return
    pm._ktrs_peft_save_pretrained = pm.save_pretrained
    pm.save_pretrained = types.MethodType(lambda self, d, **kw: save_adapter(self, d, **kw), pm)
    peft_load = pm.load_adapter

    def load_adapter(self, model_id, adapter_name="default", *args, **kwargs):
        if adapter_name not in self.peft_config:
            # A further adapter: PEFT would read its config from disk, routed-expert
            # targets included (failure-modes row 7); ktrs splits it in memory instead.
            add_adapter_from_dir(self, model_id, adapter_name, is_trainable=kwargs.get("is_trainable", False))
            return None
        with warnings.catch_warnings():
            # The expert tensors are ktrs', not PEFT's: PEFT reports them as unexpected.
            warnings.filterwarnings("ignore", message=".*unexpected.*")
            with _no_moe_target_rewrite():
                result = peft_load(model_id, adapter_name, *args, **kwargs)
        restore_expert_lora(self, model_id, adapter_name)
        return result

    pm.load_adapter = types.MethodType(load_adapter, pm)
    from .tools import merge_and_unload

    pm._ktrs_peft_merge_and_unload = pm.merge_and_unload
    pm.merge_and_unload = types.MethodType(lambda self, *a, **kw: merge_and_unload(self), pm)


_guard_stock_peft()
