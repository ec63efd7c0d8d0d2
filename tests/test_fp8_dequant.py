"""ktrs._native.dequantize_fp8 (rust/ktrs/src/fp8.rs) against torch's own float8 cast:
`(w.float() * scale).to(torch.bfloat16)` with each block's scale, bit for bit, over
every float8 bit pattern (NaN and infinities included), both encodings, and shapes that
leave the last block of a dimension partial."""

import pytest
import torch

from ktrs import _native
from ktrs._native import KtrsTypeError, KtrsValueError

FORMATS = [torch.float8_e4m3fn, torch.float8_e5m2]


def torch_reference(w: torch.Tensor, scale: torch.Tensor, block) -> torch.Tensor:
    n, k = w.shape
    full = scale.repeat_interleave(block[0], 0).repeat_interleave(block[1], 1)[:n, :k]
    return (w.float() * full).to(torch.bfloat16)


def assert_same_bits(got: torch.Tensor, want: torch.Tensor) -> None:
    # torch's own NaN payload depends on its code path (0x7fc0 scalar, 0xffff
    # vectorised): NaN must stay NaN, every other value must match bit for bit.
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got.view(torch.int16)[~nan], want.view(torch.int16)[~nan])


def random_fp8(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    bits = torch.randint(0, 256, (n, k), dtype=torch.uint8, generator=g)
    bits.view(-1)[:256] = torch.arange(256, dtype=torch.uint8)[: bits.numel()]
    return bits.view(dtype)


@pytest.mark.parametrize("dtype", FORMATS)
@pytest.mark.parametrize("n,k,block", [(256, 256, (128, 128)), (200, 300, (128, 128)), (48, 64, (32, 24)),
                                       (7, 5, (7, 5)), (1408, 2048, (128, 128)), (3, 1, (1, 1))])
def test_matches_torch_bit_for_bit(dtype, n, k, block):
    w = random_fp8(n, k, dtype, seed=n * 7 + k)
    grid = (-(-n // block[0]), -(-k // block[1]))
    g = torch.Generator().manual_seed(1)
    # DeepSeek's scales are amax / 448: small positive numbers; zero and tiny ones too.
    scale = torch.rand(grid, generator=g) * 1e-2
    scale.view(-1)[0] = 0.0
    scale.view(-1)[-1] = 1e-12
    out = torch.full((n, k), 7.0, dtype=torch.bfloat16)
    _native.dequantize_fp8(w, scale, out, block)
    assert_same_bits(out, torch_reference(w, scale, block))


def test_special_values_and_threads():
    # e5m2's infinities times a positive, zero and negative scale; e4m3fn's NaNs.
    w = torch.tensor([[0x7C, 0xFC, 0x7D, 0x7C], [0x7C, 0xFC, 0x01, 0x80]], dtype=torch.uint8).view(torch.float8_e5m2)
    scale = torch.tensor([[2.0, 0.0], [-1.0, 3.0]])
    for threads in (1, 2):
        out = torch.empty(2, 4, dtype=torch.bfloat16)
        _native.dequantize_fp8(w, scale, out, (1, 2), threads=threads)
        assert_same_bits(out, torch_reference(w, scale, (1, 2)))
    assert out[0, 0] == float("inf") and out[1, 0] == float("-inf")
    assert out[0, 2].isnan() and out[0, 3].isnan()  # a NaN, and inf * 0
    w8 = torch.tensor([[0x7F, 0xFF, 0x7E]], dtype=torch.uint8).view(torch.float8_e4m3fn)
    out = torch.empty(1, 3, dtype=torch.bfloat16)
    _native.dequantize_fp8(w8, torch.ones(1, 1), out, (128, 128))
    assert out[0, :2].isnan().all() and out[0, 2] == 448.0


def test_bad_arguments_name_the_argument():
    w = torch.zeros(4, 6, dtype=torch.float8_e4m3fn)
    scale = torch.ones(2, 2)
    out = torch.empty(4, 6, dtype=torch.bfloat16)
    _native.dequantize_fp8(w, scale, out, (2, 3))
    with pytest.raises(KtrsTypeError, match="`weight` must have dtype torch.float8_e4m3fn or torch.float8_e5m2, got torch.bfloat16"):
        _native.dequantize_fp8(out, scale, out, (2, 3))
    with pytest.raises(KtrsValueError, match=r"`weight` must have shape \[\*, \*\]"):
        _native.dequantize_fp8(w.view(24), scale, out, (2, 3))
    with pytest.raises(KtrsValueError, match="`weight` must be contiguous"):
        _native.dequantize_fp8(w.t(), scale, out, (2, 3))
    with pytest.raises(KtrsValueError, match=r"`scale` must have shape \[2, 2\] \(one per block of weight \[4, 6\] in blocks of \[2, 3\]\), got \[2, 1\]"):
        _native.dequantize_fp8(w, torch.ones(2, 1), out, (2, 3))
    with pytest.raises(KtrsTypeError, match="`scale` must have dtype torch.float32"):
        _native.dequantize_fp8(w, scale.double(), out, (2, 3))
    with pytest.raises(KtrsValueError, match=r"`out` must have shape \[4, 6\]"):
        _native.dequantize_fp8(w, scale, out[:3], (2, 3))
    with pytest.raises(KtrsTypeError, match="`out` must have dtype torch.bfloat16"):
        _native.dequantize_fp8(w, scale, out.float(), (2, 3))
    for block in [(0, 3), (-2, 3), (2, 3, 1), "23", (2, 3.0)]:
        with pytest.raises((KtrsValueError, KtrsTypeError), match="`block` must be"):
            _native.dequantize_fp8(w, scale, out, block)
    for threads in (0, -1, 10**6):
        with pytest.raises(KtrsValueError, match="`threads` must be an integer from 1"):
            _native.dequantize_fp8(w, scale, out, (2, 3), threads=threads)
    _native.dequantize_fp8(w, torch.ones(1, 1), out, [2**64 - 1, 2**64 - 1])  # one scale per tensor
