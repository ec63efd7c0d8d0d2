"""The transposed expert weights the backward keeps across calls (KTRS_TRANSPOSED_CACHE_MB):
filled by a backward, bounded by the knob, freed by set_expert and with the layer, and
never changing a result."""

from __future__ import annotations

import gc

import pytest
import torch

import ktrs
from ktrs.experts import LORA_NAMES

from conftest import build, make_problem, reference, rel_l2

KNOB = "KTRS_TRANSPOSED_CACHE_MB"
MIB = 1 << 20


@pytest.fixture
def knob():
    """Sets the knob for one test, restores the environment's value or default after."""
    yield lambda v: ktrs.set_tuning(KNOB, v)
    ktrs.set_tuning(KNOB, None)


def train_call(ex, p):
    out, h = ex.forward(p.hidden, p.ids, p.weights, save_for_backward=True)
    grads = [torch.zeros(ex.lora_shape(n)) for n in LORA_NAMES]
    gh, gw = ex.backward(h, p.grad_out, lora_grads=grads)
    return [out, gh, gw, *grads]


def assert_same(a, b, what):
    for i, (x, y) in enumerate(zip(a, b)):
        assert torch.equal(x, y), (what, i)


# ~60 rows per expert (more than KTRS_BWD_DIRECT_ROWS): every expert takes transposed
# blocks. Per expert: gate/up 2*I*H*2 = 512 KiB, down 256 KiB.
SHAPE = dict(E=6, H=256, I=512, k=2, T=180, r=4)


def test_cache_fills_in_backward_and_changes_no_result(isa, knob):
    p = make_problem(**SHAPE, seed=3)
    knob(0)
    off = build(p, isa=isa)
    want = train_call(off, p)
    assert off.transposed_cache_bytes == 0
    ref = reference(p)
    assert rel_l2(want[1], ref["grad_hidden"]) < 1e-2

    knob(1 << 20)  # 1 TiB: whatever other layers of this process hold, this one fits
    ex = build(p, isa=isa)
    ex.forward(p.hidden, p.ids, p.weights)  # inference never fills the cache
    assert ex.transposed_cache_bytes == 0
    assert_same(train_call(ex, p), want, "cold")
    full = ex.transposed_cache_bytes
    assert full == ex.weight_bytes  # every expert has tokens
    assert_same(train_call(ex, p), want, "warm")
    assert ex.transposed_cache_bytes == full

    # set_expert drops that expert's blocks; the next backward uses the new weights.
    g = torch.Generator().manual_seed(9)
    new = [(torch.randn(t.shape[1:], generator=g) * t.float().std()).to(torch.bfloat16) for t in (p.gate, p.up, p.down)]
    ex.set_expert(2, *new)
    assert ex.transposed_cache_bytes == full - full // SHAPE["E"]
    got = train_call(ex, p)
    p.gate[2], p.up[2], p.down[2] = new
    knob(0)
    assert_same(got, train_call(build(p, isa=isa), p), "after set_expert")

    ex.clear_transposed_cache()
    assert ex.transposed_cache_bytes == 0


def test_cache_stays_within_the_knob(knob):
    p = make_problem(**SHAPE, seed=4)
    knob(0)
    want = train_call(build(p), p)
    knob(1)  # 1 MiB: one expert's gate/up and down (768 KiB) at most, from all layers
    ex = build(p)
    for _ in range(2):
        assert_same(train_call(ex, p), want, "1 MiB budget")
        assert ex.transposed_cache_bytes <= MIB
    knob(2)
    ex2 = build(p)
    assert_same(train_call(ex2, p), want, "2 MiB budget")
    assert ex.transposed_cache_bytes + ex2.transposed_cache_bytes <= 2 * MIB
    # Dropped layers give their bytes back (counted in Rust: moe::tests); a new layer
    # under the same knob still computes the same bits.
    del ex, ex2
    gc.collect()
    knob(1)
    ex3 = build(p)
    assert_same(train_call(ex3, p), want, "after drops")
    assert ex3.transposed_cache_bytes <= MIB


def test_knob_is_listed_with_a_default():
    assert KNOB in ktrs.tuning()
