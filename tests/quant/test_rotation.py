"""Randomized Hadamard rotation (rotation.py), QuaRot-RTN and QVLA with rotated sensitivities."""
from __future__ import annotations

import pytest
import torch

from qvla.quant.apply import QuantLinear
from qvla.quant.packed import PackedLinear
from qvla.quant.rotation import (
    block_size,
    fwht,
    random_signs,
    rotate_inputs,
    rotate_weight,
)
from qvla.quant.sensitivity import output_errors
from qvla.quant.storage import validate_storage
from tests.quant.test_baselines import layer_and_inputs, out_err


@pytest.mark.parametrize("k, block", [(4, 4), (128, 128), (384, 128), (6, 2), (7, 1), (1024, 1024)])
def test_hadamard_is_orthogonal_and_the_rotated_layer_is_exact(k, block):
    assert block_size(k) == block
    h = fwht(torch.eye(k))
    assert torch.allclose(h @ h.T, torch.eye(k), atol=1e-5) and torch.allclose(h, h.T, atol=1e-6)
    s = random_signs(k, 3)
    w, x = torch.randn(5, k), torch.randn(9, k)
    assert torch.allclose(rotate_inputs(x, s) @ rotate_weight(w, s).T, x @ w.T, atol=1e-4)


@pytest.mark.parametrize("k", [64, 384, 1024])
def test_dense_and_butterfly_hadamard_agree(k, monkeypatch):
    """Small blocks multiply with the dense matrix, large ones run the butterfly: the same transform."""
    from qvla.quant import rotation

    x = torch.randn(3, 2, k)
    dense = fwht(x)
    monkeypatch.setattr(rotation, "DENSE_BLOCK", 0)  # every block as butterflies
    assert torch.allclose(dense, fwht(x), atol=1e-5)
    monkeypatch.setattr(rotation, "DENSE_BLOCK", 1 << 20)  # every block dense
    assert torch.allclose(dense, fwht(x), atol=1e-5)


def test_rotation_spreads_an_outlier_channel_and_helps_w4a4():
    lin, x = layer_and_inputs(k=64)
    s = random_signs(64, 0)
    peak = lambda t: float((t.abs().amax(-1) / t.pow(2).mean(-1).sqrt()).mean())
    assert peak(rotate_inputs(x, s)) < 0.5 * peak(x)
    exact = QuantLinear.from_linear(lin, torch.full((24,), 16), 16, {"in_signs": s})
    with torch.no_grad():
        assert out_err(lin, exact, x) / float(lin(x).pow(2).sum()) < 1e-10
    rtn = QuantLinear.from_linear(lin, torch.full((24,), 4), 4)
    rot = QuantLinear.from_linear(lin, torch.full((24,), 4), 4, {"in_signs": s})
    assert out_err(lin, rot, x) < 0.5 * out_err(lin, rtn, x)


@pytest.mark.parametrize("a_bits", [16, 8, 4])
def test_rotated_layer_runs_on_real_kernels_like_the_fake_quant_one(a_bits):
    lin, x = layer_and_inputs(n=40, k=128)
    bits = torch.tensor([8, 4, 2, 16, 0] * 8)
    t = {"in_signs": random_signs(128, 1), "in_scale": torch.rand(128) + 0.5}
    sim = QuantLinear.from_linear(lin, bits, a_bits, t)
    real = PackedLinear(sim.storage(), lin.weight.shape, sim.bias, a_bits)
    with torch.no_grad():
        ref, out = sim(x), real(x)
    assert 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()) > 25


def test_signs_that_are_not_plus_minus_one_are_refused():
    lin, _ = layer_and_inputs()
    storage = QuantLinear.from_linear(lin, torch.full((24,), 4), 16, {"in_signs": random_signs(32, 0)}).storage()
    validate_storage(storage, (24, 32), "ok")
    with pytest.raises(ValueError, match="in_signs must hold only"):
        validate_storage({**storage, "in_signs": storage["in_signs"] * 0.5}, (24, 32), "layer")


@pytest.mark.parametrize("a_bits", [16, 4])
def test_transformed_sensitivity_errors_are_the_transformed_layers_errors(a_bits):
    """output_errors under a transform is exactly what QuantLinear with that transform produces."""
    lin, x = layer_and_inputs(k=64)
    g = torch.Generator().manual_seed(2)
    t = {"in_signs": random_signs(64, 2), "in_scale": torch.rand(64, generator=g) + 0.5,
         "in_shift": torch.randn(64, generator=g)}
    with torch.no_grad():
        errs = output_errors(lin, x, a_bits, 1, t)
        for b in (8, 4, 2, 16):
            q = QuantLinear.from_linear(lin, torch.full((24,), b), a_bits, t)
            assert torch.allclose(errs[b][0], q(x) - lin(x), atol=1e-4)


def test_transformed_sensitivity_sees_that_rotation_helps_w4a4():
    """With 4-bit activations and an outlier input channel, the rotated errors the allocator sees are smaller."""
    lin, x = layer_and_inputs(k=64)
    with torch.no_grad():
        rotated = output_errors(lin, x, 4, 1, {"in_signs": random_signs(64, 2)})[4]
        plain = output_errors(lin, x, 4, 1)[4]
    assert float(rotated.pow(2).sum()) < 0.5 * float(plain.pow(2).sum())
