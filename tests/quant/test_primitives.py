"""Per-channel weight and per-token activation quantization: error, grids, code ranges, refusals."""
from __future__ import annotations

import pytest
import torch

from qvla.quant.primitives import (BITS, dequantize_rows, fake_quant_activation, fake_quant_mixed,
                                   fake_quant_rows, quantize_rows)


@pytest.fixture
def w() -> torch.Tensor:
    return torch.randn(32, 48, generator=torch.Generator().manual_seed(0))


def test_error_shrinks_as_bits_grow(w):
    err = {b: float((fake_quant_rows(w, b) - w).norm()) for b in BITS}
    assert err[0] > err[2] > err[4] > err[8] > err[16] == 0.0
    assert err[0] == pytest.approx(float(w.norm()))
    assert err[8] / float(w.norm()) < 0.01  # 8-bit per-channel rounding is well under 1 % on Gaussian rows


def test_16_bits_is_identity_and_0_bits_zeroes(w):
    kept = fake_quant_rows(w, 16)
    assert torch.equal(kept, w) and kept.data_ptr() != w.data_ptr()  # a copy, not an alias
    assert torch.count_nonzero(fake_quant_rows(w, 0)) == 0


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_quantize_dequantize_round_trip_is_fake_quant(w, bits):
    q, scale, zero = quantize_rows(w, bits)
    assert q.dtype == torch.int16 and scale.shape == zero.shape == (w.shape[0],)
    assert torch.equal(dequantize_rows(q, scale, zero), fake_quant_rows(w, bits))


@pytest.mark.parametrize("bits, lo, hi", [(8, -127, 127), (4, 0, 15), (2, 0, 3)])
def test_codes_lie_in_the_stated_range_and_use_it(w, bits, lo, hi):
    q, _, zero = quantize_rows(w, bits)
    assert int(q.min()) >= lo and int(q.max()) <= hi
    if bits == 8:  # symmetric: the largest magnitude of every row lands on +-127, no zero point
        assert torch.all(q.abs().amax(1) == 127) and torch.count_nonzero(zero) == 0
    else:  # asymmetric: every row spans the whole grid
        assert torch.all(q.amin(1) == lo) and torch.all(q.amax(1) == hi)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_exact_zeros_stay_zero(w, bits):
    # the grid always contains 0 (lo <= 0 <= hi), so pruned-by-training weights are not smeared
    w = w.clone()
    w[:, ::3] = 0.0
    assert torch.count_nonzero(fake_quant_rows(w, bits)[:, ::3]) == 0


def test_grid_has_at_most_2_to_the_bits_levels_per_row(w):
    for bits in (2, 4):
        levels = [len(row.unique()) for row in fake_quant_rows(w, bits)]
        assert max(levels) <= 2**bits


def test_fake_quant_mixed_applies_each_rows_bits(w):
    bits = torch.tensor([16, 8, 4, 2, 0] * 6 + [4, 2])
    out = fake_quant_mixed(w, bits)
    for i, b in enumerate(bits.tolist()):
        assert torch.equal(out[i], fake_quant_rows(w[i:i + 1], b)[0]), (i, b)
    assert not torch.equal(out[1], out[2])  # different rows really took different paths


def test_fake_quant_mixed_refuses_wrong_shape(w):
    with pytest.raises(ValueError, match=r"expected \(32,\)"):
        fake_quant_mixed(w, torch.full((31,), 4))


@pytest.mark.parametrize("bad", [1, 3, 6, 12, 32, -2])
def test_invalid_weight_bits_raise_naming_allowed_values(w, bad):
    with pytest.raises(ValueError, match=rf"\(0, 2, 4, 8, 16\), got {bad}"):
        fake_quant_rows(w, bad)
    with pytest.raises(ValueError, match=r"\(0, 2, 4, 8, 16\)"):
        fake_quant_mixed(w, torch.full((w.shape[0],), bad))


@pytest.mark.parametrize("bad", [2, 3, 6])
def test_invalid_activation_bits_raise(bad):
    with pytest.raises(ValueError, match=f"4, 8 or 16, got {bad}"):
        fake_quant_activation(torch.randn(2, 8), bad)


def test_activation_8_bit_per_token_error_is_small():
    x = torch.randn(64, 96, generator=torch.Generator().manual_seed(1))
    x[::2] *= 100.0  # rows of very different magnitude: a per-tensor scale would ruin the small ones
    err = (fake_quant_activation(x, 8) - x).norm(dim=-1) / x.norm(dim=-1)
    assert float(err.max()) < 0.01
    assert float(((fake_quant_activation(x, 4) - x).norm(dim=-1) / x.norm(dim=-1)).mean()) > float(err.mean())
    assert fake_quant_activation(x, 16) is x


def test_activation_4_bit_grid_is_asymmetric_with_zero_on_it():
    """A4: each token's grid spans its [min, max] (widened to hold 0) in 15 steps, 0 stays exact, and the
    codes (x / step) are integers in [-15, 15] (what the integer kernels multiply)."""
    g = torch.Generator().manual_seed(3)
    x = torch.cat([torch.randn(8, 64, generator=g), torch.rand(8, 64, generator=g) + 0.5])  # mixed / all positive
    x[:, 0] = 0.0
    q = fake_quant_activation(x, 4)
    lo, hi = x.amin(-1, keepdim=True).clamp_max(0), x.amax(-1, keepdim=True).clamp_min(0)
    step = (hi - lo) / 15
    codes = q / step
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 15 + 1e-4
    assert all(len(r.unique()) <= 16 for r in q) and torch.equal(q[:, 0], torch.zeros(16))
    assert ((q - x).abs() <= step / 2 + 1e-6).all()  # nothing saturates: the grid covers the token


def test_activation_4_bit_keeps_all_levels_on_a_skewed_input():
    """A post-ReLU input: the symmetric 4-bit grid would spend half its levels on values that never occur."""
    x = torch.relu(torch.randn(256, 128, generator=torch.Generator().manual_seed(4)))
    asym = ((fake_quant_activation(x, 4) - x).norm(dim=-1) / x.norm(dim=-1)).mean()
    step = x.abs().amax(-1, keepdim=True) / 7
    sym = ((torch.clamp(torch.round(x / step), -7, 7) * step - x).norm(dim=-1) / x.norm(dim=-1)).mean()
    assert float(asym) < 0.6 * float(sym)


def test_activation_rows_are_independent():
    x = torch.randn(3, 5, 16, generator=torch.Generator().manual_seed(2))
    q = fake_quant_activation(x, 8)
    y = x.clone()
    y[1, 2] *= 1000.0  # one token blows up: only that token's scale may change
    qy = fake_quant_activation(y, 8)
    changed = (qy != q).any(-1)
    assert changed[1, 2] and int(changed.sum()) == 1
    for i in range(3):
        assert torch.equal(q[i], fake_quant_activation(x[i], 8))
