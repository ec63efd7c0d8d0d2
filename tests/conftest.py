"""Shared helpers: random MoE problems and an independent float64 torch reference."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from typing import Dict, Optional

import pytest
import torch
import torch.nn.functional as F

import ktrs
from ktrs.experts import LORA_NAMES

ISAS = ktrs.info()["available_isas"]


@dataclass
class Problem:
    gate: torch.Tensor  # [E, I, H] bf16
    up: torch.Tensor
    down: torch.Tensor  # [E, H, I] bf16
    hidden: torch.Tensor  # [T, H] bf16
    ids: torch.Tensor  # [T, k] int64
    weights: torch.Tensor  # [T, k] f32
    grad_out: torch.Tensor  # [T, H] bf16
    lora: Dict[str, torch.Tensor]  # f32, LORA_NAMES
    rank: int
    alpha: float

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank if self.rank else 0.0


def make_problem(E: int, H: int, I: int, k: int, T: int, r: int, seed: int = 0, used_experts: Optional[int] = None) -> Problem:
    g = torch.Generator().manual_seed(seed)
    bf = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(torch.bfloat16)
    used = used_experts or E
    ids = torch.stack([torch.randperm(used, generator=g)[:k] for _ in range(T)]) if k <= used else torch.randint(0, used, (T, k), generator=g)
    lora = {}
    if r:
        dims = {"gate_A": (r, H), "gate_B": (I, r), "up_A": (r, H), "up_B": (I, r), "down_A": (r, I), "down_B": (H, r)}
        for n in LORA_NAMES:
            rows, cols = dims[n]
            lora[n] = torch.randn(E, rows, cols, generator=g) * (0.3 / cols**0.5)
    return Problem(
        gate=bf(E, I, H, scale=H**-0.5),
        up=bf(E, I, H, scale=H**-0.5),
        down=bf(E, H, I, scale=I**-0.5),
        hidden=bf(T, H),
        ids=ids.to(torch.int64),
        weights=torch.rand(T, k, generator=g) * 0.5 + 0.1,
        grad_out=bf(T, H),
        lora=lora,
        rank=r,
        alpha=2.0 * r if r else 0.0,
    )


def reference(p: Problem, lora: Optional[Dict[str, torch.Tensor]] = None):
    """float64 autograd of the same math, expert by expert (no code shared with ktrs)."""
    lora = p.lora if lora is None else lora
    d = torch.float64
    x = p.hidden.to(d).requires_grad_(True)
    w = p.weights.to(d).requires_grad_(True)
    L = {n: t.to(d).requires_grad_(True) for n, t in lora.items()}
    s = p.scaling
    out = torch.zeros_like(x)
    T, k = p.ids.shape
    for e in p.ids.unique().tolist():
        tok, slot = (p.ids == e).nonzero(as_tuple=True)
        xe = x[tok]
        gt = F.linear(xe, p.gate[e].to(d))
        ut = F.linear(xe, p.up[e].to(d))
        if L:
            gt = gt + s * (xe @ L["gate_A"][e].T) @ L["gate_B"][e].T
            ut = ut + s * (xe @ L["up_A"][e].T) @ L["up_B"][e].T
        a = F.silu(gt) * ut
        y = F.linear(a, p.down[e].to(d))
        if L:
            y = y + s * (a @ L["down_A"][e].T) @ L["down_B"][e].T
        out = out.index_add(0, tok, y * w[tok, slot].unsqueeze(1))
    out.backward(p.grad_out.to(d))
    return {
        "out": out.detach(),
        "grad_hidden": x.grad,
        "grad_weights": w.grad,
        **{f"grad_{n}": (L[n].grad if L[n].grad is not None else torch.zeros_like(L[n])) for n in L},
    }


def rel_l2(got: torch.Tensor, want: torch.Tensor) -> float:
    got = got.detach().to(torch.float64)
    want = want.detach().to(torch.float64)
    return float((got - want).norm() / want.norm().clamp_min(1e-30))


def build(p: Problem, isa: Optional[str] = None, threads: int = 2, **kw) -> ktrs.MoeExperts:
    ex = ktrs.MoeExperts(p.gate, p.up, p.down, lora_rank=p.rank, lora_alpha=p.alpha or None, isa=isa, threads=threads, **kw)
    for n, t in p.lora.items():
        ex.set_lora_weight(n, t)
    return ex


@pytest.fixture(params=ISAS)
def isa(request) -> str:
    return request.param


def run_triton_case(code: str, device: str) -> None:
    """Runs a Triton kernel check (`code`, with DEVICE for the device and printing "ok")
    in a child process: on "cpu" in Triton's interpreter (chosen at import, hence the
    child), on "cuda" on the GPU."""
    env = {**os.environ, "TRITON_INTERPRET": "1"} if device == "cpu" else None
    r = subprocess.run([sys.executable, "-c", code.replace("DEVICE", repr(device))], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout[-3000:] + r.stderr[-3000:]
