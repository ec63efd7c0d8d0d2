"""AdamW with the expert-LoRA step in Rust.

:class:`AdamW` is a ``torch.optim.Optimizer`` with ``torch.optim.AdamW``'s arguments,
update and ``state_dict`` layout. Parameters that are CPU float32 tensors (ktrs' expert
LoRA, which views Rust memory) are updated by one fused, multi-threaded Rust step whose
moments and step counts live in Rust (``state[p]`` holds zero-copy views of them);
every other parameter (PEFT's LoRA on the GPU) goes to a ``torch.optim.AdamW`` in the
same :meth:`AdamW.step`, launched first so the CPU update overlaps the GPU's.

With the HF Trainer, one line::

    Trainer(model=model, args=args, train_dataset=data,
            optimizer_cls_and_kwargs=ktrs.optim.from_args(args))

keeps the Trainer's weight-decay grouping, learning-rate schedule and gradient clipping
(the Trainer clips before ``step``); its checkpoints carry the Rust state and resume
exactly. ``Trainer(..., optimizers=(ktrs.optim.AdamW(model.parameters(), lr=...), None))``
works too.
"""

from __future__ import annotations

from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch

from . import _native
from ._native import KtrsTypeError, KtrsValueError

__all__ = ["AdamW", "from_args"]

_HYPER_KEYS = ("lr", "betas", "eps", "weight_decay")


def _in_rust(p: torch.Tensor) -> bool:
    """Whether ``p`` is stepped in Rust: CPU float32 dense contiguous tensors."""
    return p.device.type == "cpu" and p.dtype == torch.float32 and p.layout == torch.strided and p.is_contiguous()


class AdamW(torch.optim.Optimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, bias correction) with CPU float32
    parameters stepped in Rust.

    Args:
        params: parameters or parameter groups, as for any torch optimizer.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW`` (same defaults).
        foreach, fused: passed to the ``torch.optim.AdamW`` that steps the parameters
            not on the CPU in float32 (GPU parameters).
        threads: threads of the Rust step (default ``KTRS_THREADS`` or one per physical
            core, the same pool the expert kernels use).

    ``amsgrad`` and ``maximize`` are not implemented for the Rust-stepped parameters.
    ``state_dict()`` has ``torch.optim.AdamW``'s layout (``step``, ``exp_avg``,
    ``exp_avg_sq`` per parameter), so checkpoints move between the two optimizers.
    """

    def __init__(
        self,
        params: Iterable[Any],
        lr: float = 1e-3,
        betas: Tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        *,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        threads: Optional[int] = None,
    ) -> None:
        if not 0.0 <= float(lr):
            raise KtrsValueError(f"Invalid learning rate: {lr}")
        if not 0.0 <= eps:
            raise KtrsValueError(f"Invalid epsilon value: {eps}")
        for i, b in enumerate(betas):
            if not 0.0 <= b < 1.0:
                raise KtrsValueError(f"Invalid beta parameter at index {i}: {b}")
        if not 0.0 <= weight_decay:
            raise KtrsValueError(f"Invalid weight_decay value: {weight_decay}")
        if threads is not None and threads < 1:
            raise KtrsValueError(f"`threads` must be at least 1, got {threads}")
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, amsgrad=False, maximize=False, foreach=foreach,
            capturable=False, differentiable=False, fused=fused, decoupled_weight_decay=True,
        )
        self._threads = threads
        #: Rust state per Rust-stepped parameter; ``self.state[p]`` holds views of it.
        self._rust: Dict[torch.Tensor, Any] = {}
        self._torch: Optional[torch.optim.AdamW] = None
        self._torch_key: Optional[Tuple[Tuple[int, ...], ...]] = None
        super().__init__(params, defaults)

    # -- state ---------------------------------------------------------------------------
    def _rust_state(self, p: torch.Tensor) -> Any:
        """The Rust state of ``p``, made on its first step, or adopted from torch tensors
        in ``self.state[p]`` (a loaded checkpoint) so nothing of it is lost."""
        st = self._rust.get(p)
        if st is not None:
            return st
        st = _native.AdamWState(list(p.shape))
        old = self.state.get(p)
        if old and "exp_avg" in old:
            step = old["step"]
            st.load(
                old["exp_avg"].detach().to("cpu", torch.float32).contiguous(),
                old["exp_avg_sq"].detach().to("cpu", torch.float32).contiguous(),
                float(step.item() if torch.is_tensor(step) else step),
            )
        self._rust[p] = st
        self.state[p] = {
            "step": torch.from_dlpack(st.step_tensor()),
            "exp_avg": torch.from_dlpack(st.exp_avg()),
            "exp_avg_sq": torch.from_dlpack(st.exp_avg_sq()),
        }
        return st

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """``torch.optim.Optimizer.load_state_dict``; the moments of Rust-stepped
        parameters are copied into Rust memory (torch's or ktrs' checkpoints alike)."""
        super().load_state_dict(state_dict)  # replaces self.state with loaded tensors
        self._rust.clear()
        if self._torch is not None:
            self._torch.state = self.state
        for group in self.param_groups:
            for p in group["params"]:
                if _in_rust(p) and "exp_avg" in self.state.get(p, {}):
                    self._rust_state(p)
        self._fix_torch_steps()

    def _fix_torch_steps(self) -> None:
        # torch's loader puts `step` on the parameter's device only when the *group* says
        # fused/capturable; those flags belong to the GPU optimizer here, so place it.
        for group in self.param_groups:
            on_device = bool(group.get("fused")) or bool(group.get("capturable"))
            for p in group["params"]:
                st = self.state.get(p)
                if _in_rust(p) or not st or not torch.is_tensor(st.get("step")):
                    continue
                want = p.device if on_device else torch.device("cpu")
                if st["step"].device != want:
                    st["step"] = st["step"].to(want, torch.float32)

    # -- the GPU part ----------------------------------------------------------------------
    def _torch_optimizer(self, others: List[List[torch.Tensor]]) -> Optional[torch.optim.AdamW]:
        """A ``torch.optim.AdamW`` over the parameters not stepped in Rust, sharing
        ``self.state``; rebuilt only when that set of parameters changes."""
        key = tuple(tuple(id(p) for p in ps) for ps in others)
        if key != self._torch_key:
            self._torch_key = key
            groups = [
                {**{k: v for k, v in g.items() if k != "params"}, "params": ps, "_ktrs_group": i}
                for i, (g, ps) in enumerate(zip(self.param_groups, others))
                if ps
            ]
            self._torch = torch.optim.AdamW(groups) if groups else None
            if self._torch is not None:
                self._torch.state = self.state
        if self._torch is not None:
            for g in self._torch.param_groups:  # the scheduler changed ours: mirror it
                for k, v in self.param_groups[g["_ktrs_group"]].items():
                    if k != "params":
                        g[k] = v
        return self._torch

    # -- step ------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        """One AdamW step: the GPU parameters' torch step is launched first (asynchronous
        on CUDA), then the Rust step runs on the CPU parameters with the GIL released.
        Parameters whose ``grad`` is None are skipped (their step count does not advance)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        states: List[Any] = []
        params: List[torch.Tensor] = []
        grads: List[torch.Tensor] = []
        hypers: List[Tuple[float, float, float, float, float]] = []
        others: List[List[torch.Tensor]] = []
        for group in self.param_groups:
            rest: List[torch.Tensor] = []
            others.append(rest)
            b1, b2 = group["betas"]
            hyper = (float(group["lr"]), float(b1), float(b2), float(group["eps"]), float(group["weight_decay"]))
            for p in group["params"]:
                if not _in_rust(p):
                    if p in self._rust:
                        raise KtrsValueError(
                            "ktrs.optim.AdamW: a parameter stepped in Rust is no longer a contiguous CPU float32 tensor "
                            f"(now {p.device}, {p.dtype}); move the model before creating the optimizer"
                        )
                    rest.append(p)
                    continue
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise KtrsTypeError("ktrs.optim.AdamW: sparse gradients are not supported")
                if group.get("amsgrad") or group.get("maximize"):
                    raise KtrsValueError("ktrs.optim.AdamW: amsgrad and maximize are not implemented for CPU parameters")
                states.append(self._rust_state(p))
                params.append(p.detach())
                grads.append(p.grad.detach().to(torch.float32).contiguous())
                hypers.append(hyper)
        gpu = self._torch_optimizer(others)
        if gpu is not None:
            gpu.step()
        if states:
            _native.adamw_step(states, params, grads, hypers, threads=self._threads)
            # Rust wrote the parameters in place behind torch's back: bump their version
            # counters as torch's optimizers do, so anything that checks them (autograd's
            # saved-tensor check, a checkpoint recompute's reuse of a kept expert forward)
            # sees the update.
            torch.autograd.graph.increment_version(params)
        return loss


def from_args(args: Any) -> Tuple[type, Dict[str, Any]]:
    """``(AdamW, kwargs)`` from HF ``TrainingArguments`` (learning rate, Adam betas and
    epsilon; ``fused`` for the GPU parameters when ``args.optim`` is
    ``adamw_torch_fused``), for ``Trainer(..., optimizer_cls_and_kwargs=from_args(args))``.
    The Trainer supplies the parameter groups and their weight decay."""
    kwargs: Dict[str, Any] = dict(lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon)
    optim = str(getattr(args.optim, "value", args.optim))
    if optim == "adamw_torch_fused" and torch.cuda.is_available():
        kwargs["fused"] = True
    return AdamW, kwargs
