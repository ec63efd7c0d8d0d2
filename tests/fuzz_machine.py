"""Property-based fuzzing of the Python API (run by tests/test_fuzz.py in a child process,
so a crash shows as a failed test instead of a dead test run).

A hypothesis state machine drives one `ktrs.MoeExperts` through random call orders:
forward (valid or with a bad shape, dtype, stride, id or weight), backward of any live
handle, set_lora to another rank, zero grads, dropping handles, thread counts, LoRA
views written between calls. Every call either succeeds with results that match a
float64 torch reference, or raises a `ktrs.KtrsError`; a stale handle must be refused.
"""

import os

import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import ktrs
from ktrs.experts import LORA_NAMES

ISAS = ktrs.info()["available_isas"]
EXAMPLES = int(os.environ.get("KTRS_FUZZ_EXAMPLES", "40"))
#: Each case is logged before it runs, so a crash names the last one.
LOG = os.environ.get("KTRS_FUZZ_LOG")


def log(msg: str) -> None:
    if LOG:
        with open(LOG, "a") as f:
            f.write(msg + "\n")


def reference(ex: ktrs.MoeExperts, x, ids, w, use_lora=True, absolute=False):
    """float64 forward of the same math, expert by expert. `absolute` uses |weights|:
    the size of the terms that cancel, a scale for tolerances (ktrs rounds the SwiGLU
    activations to bf16, so a sum of cancelling terms has a larger relative error)."""
    d = torch.float64
    f = torch.abs if absolute else (lambda t: t)
    L = {n: f(ex.lora_weight(n).to(d)) for n in LORA_NAMES} if ex.lora_rank and use_lora else None
    s = ex.lora_scaling
    out = torch.zeros(x.shape, dtype=d)
    xd = x.to(d)
    for e in ids.unique().tolist():
        tok, slot = (ids == e).nonzero(as_tuple=True)
        g, u, dn = (f(t.to(d)) for t in ex.get_expert(e))
        xe = f(xd[tok])
        gt, ut = xe @ g.T, xe @ u.T
        if L:
            gt = gt + s * (xe @ L["gate_A"][e].T) @ L["gate_B"][e].T
            ut = ut + s * (xe @ L["up_A"][e].T) @ L["up_B"][e].T
        a = f(F.silu(gt) * ut)
        y = a @ dn.T
        if L:
            y = y + s * (a @ L["down_A"][e].T) @ L["down_B"][e].T
        out.index_add_(0, tok, y * w[tok, slot].to(d).unsqueeze(1))
    return out


def rel(got, want, scale):
    """Relative error, against the larger of the result and a tenth of `scale`."""
    want = want.to(torch.float64)
    return float((got.to(torch.float64) - want).norm() / torch.maximum(want.norm(), 0.1 * scale.norm()).clamp_min(1e-6))


BAD_FORWARDS = ["float_hidden", "strided_hidden", "short_hidden", "id_too_big", "id_negative", "nan_weight", "int32_ids", "k_zero", "wrong_weights_shape", "list_hidden"]


class ExpertsMachine(RuleBasedStateMachine):
    @initialize(
        e=st.integers(1, 9),
        h=st.integers(1, 72),
        i=st.integers(1, 60),
        rank=st.integers(0, 5),
        threads=st.integers(1, 3),
        isa=st.sampled_from(ISAS),
        seed=st.integers(0, 2**32),
    )
    def build(self, e, h, i, rank, threads, isa, seed):
        log(f"build E={e} H={h} I={i} r={rank} threads={threads} isa={isa} seed={seed}")
        g = torch.Generator().manual_seed(seed)
        gate = torch.randn(e, i, h, generator=g) * h**-0.5
        up = torch.randn(e, i, h, generator=g) * h**-0.5
        down = torch.randn(e, h, i, generator=g) * i**-0.5
        self.ex = ktrs.MoeExperts(gate, up, down, lora_rank=rank, isa=isa, threads=threads, seed=seed)
        self.gen = g
        self.handles = []  # (handle, generation, x, ids, w, used_lora, writes)
        self.writes = 0  # LoRA values written through views so far
        if rank:
            self._randomize_b()

    def _randomize_b(self):
        for n in ("gate_B", "up_B", "down_B"):
            self.ex.set_lora_weight(n, torch.randn(self.ex.lora_shape(n), generator=self.gen) * 0.1)

    def _inputs(self, t, k):
        e, h = self.ex.num_experts, self.ex.hidden_size
        x = torch.randn(t, h, generator=self.gen).bfloat16()
        ids = torch.randint(0, e, (t, k), generator=self.gen)
        w = torch.rand(t, k, generator=self.gen)
        return x, ids, w

    @rule(t=st.integers(0, 12), k=st.integers(1, 4), save=st.booleans(), use_lora=st.booleans())
    def forward(self, t, k, save, use_lora):
        log(f"forward T={t} k={k} save={save} use_lora={use_lora}")
        x, ids, w = self._inputs(t, k)
        out, handle = self.ex.forward(x, ids, w, save_for_backward=save, use_lora=use_lora)
        assert out.shape == x.shape and torch.isfinite(out.float()).all()
        if t:
            want = reference(self.ex, x, ids, w, use_lora)
            assert rel(out, want, reference(self.ex, x, ids, w, use_lora, absolute=True)) < 2e-2
        assert (handle is not None) == save
        if save:
            self.handles.append((handle, self.ex.lora_generation, x, ids, w, use_lora and self.ex.lora_rank > 0, self.writes))

    @rule(kind=st.sampled_from(BAD_FORWARDS), t=st.integers(1, 6), k=st.integers(1, 3))
    def bad_forward(self, kind, t, k):
        log(f"bad_forward {kind} T={t} k={k}")
        x, ids, w = self._inputs(t, k)
        e = self.ex.num_experts
        if kind == "float_hidden":
            x = x.float()
        elif kind == "strided_hidden":
            x = torch.cat([x, x], 1)[:, ::2]
            if x.is_contiguous():  # H = 1: a step over one column is still contiguous
                x = x.float()
        elif kind == "short_hidden":
            x = x[:, :-1] if x.shape[1] > 1 else torch.cat([x, x], 1)
        elif kind == "id_too_big":
            ids[0, 0] = e
        elif kind == "id_negative":
            ids[-1, -1] = -2  # -1 is "no expert"
        elif kind == "nan_weight":
            w[0, 0] = float("nan")
        elif kind == "int32_ids":
            ids = ids.int()
        elif kind == "k_zero":
            ids, w = ids[:, :0], w[:, :0]
        elif kind == "wrong_weights_shape":
            w = w[:1] if t > 1 else torch.cat([w, w])
        elif kind == "list_hidden":
            x = x.tolist()
        try:
            self.ex.forward(x, ids, w, save_for_backward=True)
        except ktrs.KtrsError:
            return
        raise AssertionError(f"{kind} was accepted")

    @precondition(lambda self: self.handles)
    @rule(pick=st.integers(0, 100), own_grads=st.booleans())
    def backward(self, pick, own_grads):
        handle, gen, x, ids, w, used_lora, writes = self.handles[pick % len(self.handles)]
        log(f"backward handle={pick % len(self.handles)} own_grads={own_grads} stale={gen != self.ex.lora_generation}")
        gout = torch.randn(x.shape, generator=self.gen).bfloat16()
        grads = [torch.full(self.ex.lora_shape(n), float("nan")) for n in LORA_NAMES] if own_grads and self.ex.lora_rank else None
        if gen != self.ex.lora_generation:
            try:
                self.ex.backward(handle, gout, lora_grads=grads)
            except ktrs.StaleHandleError:
                return
            raise AssertionError("a stale handle was accepted")
        gh, gw = self.ex.backward(handle, gout, lora_grads=grads)
        assert gh.shape == x.shape and gw.shape == ids.shape
        assert torch.isfinite(gh.float()).all() and torch.isfinite(gw).all()
        if grads is not None:
            assert all(torch.isfinite(g).all() for g in grads)
            if not used_lora:
                assert all((g == 0).all() for g in grads)
        if x.shape[0] and writes == self.writes:  # LoRA values as at the forward
            # The input gradient against float64 autograd of the reference.
            grads = []
            for absolute in (False, True):
                xr = x.double().requires_grad_()
                out = reference(self.ex, xr, ids, w, used_lora, absolute)
                grads.append(torch.autograd.grad(out, xr, gout.double().abs() if absolute else gout.double())[0])
            assert rel(gh, grads[0], grads[1]) < 5e-2

    @rule(rank=st.integers(0, 5), rslora=st.booleans())
    def set_lora(self, rank, rslora):
        log(f"set_lora r={rank} rslora={rslora}")
        self.ex.set_lora(rank, use_rslora=rslora)
        if rank:
            self._randomize_b()
        self.writes += 1

    @rule(rank=st.sampled_from([-1, 2**62, 10**15]))
    def bad_set_lora(self, rank):
        log(f"bad_set_lora r={rank}")
        try:
            self.ex.set_lora(rank)
        except ktrs.KtrsError:
            return
        raise AssertionError(f"set_lora({rank}) was accepted")

    @rule(seed=st.integers(0, 2**16))
    def rebuild(self, seed):
        """Drops the layer while handles of it live on; a new layer of the same shape must
        refuse them (their generation is not its own)."""
        log(f"rebuild seed={seed}")
        e, h, i = self.ex.num_experts, self.ex.hidden_size, self.ex.intermediate_size
        g = torch.Generator().manual_seed(seed)
        self.ex = ktrs.MoeExperts(torch.randn(e, i, h, generator=g), torch.randn(e, i, h, generator=g), torch.randn(e, h, i, generator=g), lora_rank=seed % 4, isa=self.ex.isa, threads=self.ex.threads, seed=seed)
        self.writes += 1

    @rule()
    def zero_grads(self):
        log("zero_grads")
        self.ex.zero_lora_grads()
        if self.ex.lora_rank:
            assert (self.ex.lora_grad("gate_A") == 0).all()

    @precondition(lambda self: self.handles)
    @rule(pick=st.integers(0, 100))
    def drop(self, pick):
        log("drop")
        self.handles.pop(pick % len(self.handles))

    @rule(threads=st.sampled_from([0, -1, 1, 2, 3, ktrs.MAX_THREADS + 1, 10**6]))
    def set_threads(self, threads):
        log(f"set_threads {threads}")
        before = self.ex.threads
        try:
            self.ex.threads = threads
        except ktrs.KtrsValueError:
            assert not 1 <= threads <= ktrs.MAX_THREADS and self.ex.threads == before
            return
        assert self.ex.threads == threads

    @precondition(lambda self: self.ex.lora_rank > 0)
    @rule(name=st.sampled_from(LORA_NAMES), scale=st.floats(-2, 2))
    def write_view(self, name, scale):
        log(f"write_view {name} {scale}")
        with torch.no_grad():
            self.ex.lora_weight(name).mul_(scale)  # the optimizer's way: in place on the view
        self.writes += 1

    @invariant()
    def views_are_whole(self):
        if getattr(self, "ex", None) is not None and self.ex.lora_rank:
            v = self.ex.lora_weight("down_B")
            assert list(v.shape) == self.ex.lora_shape("down_B")


class ModuleMachine(RuleBasedStateMachine):
    """`KtrsExperts` under autograd: forwards whose backward runs later, LoRA replaced in
    between (enable_lora), the expert LoRA switched off and on (PEFT's controls), the
    optimizer stepping and zero_grad(set_to_none=True)."""

    @initialize(e=st.integers(1, 6), h=st.integers(1, 40), i=st.integers(1, 40), rank=st.integers(0, 4), seed=st.integers(0, 2**16))
    def build(self, e, h, i, rank, seed):
        log(f"module build E={e} H={h} I={i} r={rank} seed={seed}")
        g = torch.Generator().manual_seed(seed)
        self.gen = g
        self.mod = ktrs.KtrsExperts.from_weights(torch.randn(e, i, h, generator=g), torch.randn(e, i, h, generator=g), torch.randn(e, h, i, generator=g), lora_rank=rank, threads=2, seed=seed)
        self.pending = []  # (output, generation at the forward)
        self.opt = torch.optim.SGD(self.mod.parameters(), lr=1e-3) if rank else None

    @rule(t=st.integers(1, 8), k=st.integers(1, 3), grad=st.booleans())
    def forward(self, t, k, grad):
        log(f"module forward T={t} k={k} grad={grad}")
        e, h = self.mod.num_experts, self.mod.experts.hidden_size
        x = torch.randn(t, h, generator=self.gen).requires_grad_(grad)
        ids = torch.randint(0, e, (t, k), generator=self.gen)
        w = torch.rand(t, k, generator=self.gen)
        with torch.set_grad_enabled(grad):
            out = self.mod(x, ids, w)
        assert out.shape == x.shape and out.dtype == x.dtype
        if out.requires_grad:
            self.pending.append((out, self.mod.experts.lora_generation))

    @precondition(lambda self: self.pending)
    @rule(pick=st.integers(0, 100))
    def backward(self, pick):
        out, gen = self.pending.pop(pick % len(self.pending))
        stale = gen != self.mod.experts.lora_generation
        log(f"module backward stale={stale}")
        try:
            out.float().pow(2).mean().backward()
        except ktrs.StaleHandleError:
            assert stale
            return
        except RuntimeError as exc:  # autograd's own refusal to run a graph twice
            assert "second time" in str(exc), exc
            return
        assert not stale, "a stale forward was back-propagated"
        for p in self.mod.parameters():
            assert p.grad is None or torch.isfinite(p.grad).all()

    @rule(rank=st.integers(0, 4))
    def enable_lora(self, rank):
        log(f"module enable_lora {rank}")
        self.mod.enable_lora(rank)
        self.opt = torch.optim.SGD(self.mod.parameters(), lr=1e-3) if rank else None

    @rule(on=st.booleans())
    def toggle_adapters(self, on):
        log(f"module adapters_enabled={on}")
        self.mod.adapters_enabled = on

    @precondition(lambda self: self.opt is not None)
    @rule()
    def step(self):
        log("module step")
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        for p in self.mod.parameters():
            assert p.data_ptr() == self.mod.experts.lora_weight(next(n for n, q in self.mod.lora_experts.items() if q is p)).data_ptr()


_SETTINGS = settings(
    max_examples=EXAMPLES,
    stateful_step_count=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=os.environ.get("KTRS_FUZZ_RANDOM") != "1",
    database=None,
)
ExpertsMachine.TestCase.settings = _SETTINGS
ModuleMachine.TestCase.settings = _SETTINGS
TestExpertsMachine = ExpertsMachine.TestCase
TestModuleMachine = ModuleMachine.TestCase
