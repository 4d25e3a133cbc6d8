"""Activation clipping (activation_clip.py): the ratio, where it is applied, how it is stored and asked for."""
from __future__ import annotations

import pytest
import torch

from qvla.quant.activation_clip import RATIOS, clip_activations, clip_ratios
from qvla.quant.apply import QuantLinear
from qvla.quant.methods import METHODS, QuantConfig, split_method
from qvla.quant.packed import PackedLinear
from qvla.quant.primitives import fake_quant_activation
from qvla.quant.rotation import random_signs
from qvla.quant.sensitivity import output_errors
from qvla.quant.storage import validate_storage
from tests.quant.test_baselines import layer_and_inputs


def test_clipped_activations_saturate_at_the_ratio_and_ratio_one_is_no_clipping():
    x = torch.tensor([[0.1, -0.2, 0.3, 7.0], [1.0, -1.0, 0.5, 0.0]])
    assert torch.equal(fake_quant_activation(x, 4, torch.tensor([1.0])), fake_quant_activation(x, 4))
    q = fake_quant_activation(x, 4, torch.tensor([0.5]))
    # A4 grid, halved: token 0 spans [-0.2, 7] (z = round(0.2 / 0.48) = 0: -0.2 rounds to 0), its top saturates
    # at 15 steps of 0.24; token 1 spans [-1, 1] (z = round(7.5), 7 or 8 as the float falls), its ends
    # saturate at -z and 15 - z steps of 1/15
    assert float(q[0].max()) == pytest.approx(15 * 0.24) and float(q[0, 1]) == 0.0
    z = float(torch.round(torch.tensor(1.0) / (torch.tensor(2.0) / 15)))
    assert float(q[1].max()) == pytest.approx((15 - z) / 15) and float(q[1].min()) == pytest.approx(-z / 15)


def test_the_chosen_ratio_lowers_a4_error_and_every_path_applies_it():
    """The defining property: clipping the rotated (near-Gaussian) A4 inputs of a layer lowers its output
    error; the ratio is then applied alike by the fake-quant layer, the sensitivity's error model and the
    real kernels."""
    lin, x = layer_and_inputs(n=40, k=128, rows=1024)
    t = {"in_signs": random_signs(128, 0)}
    layer = QuantLinear.from_linear(lin, torch.full((40,), 16), 4, t)
    errs = []
    with torch.no_grad():
        for r in RATIOS:
            layer.inp["a_clip"] = torch.tensor([r])
            errs.append(float((layer(x) - lin(x)).pow(2).sum()))
    assert min(errs) < 0.97 * errs[0]  # ~6% here: the asymmetric A4 grid is already finer than [-max, max]
    best = torch.tensor([RATIOS[errs.index(min(errs))]])
    clipped = QuantLinear.from_linear(lin, torch.tensor([8, 4, 2, 16, 0] * 8), 4, {**t, "a_clip": best})
    with torch.no_grad():
        sens = output_errors(lin, x, 4, 1, {**t, "a_clip": best})[4][0]
        exact4 = QuantLinear.from_linear(lin, torch.full((40,), 4), 4, {**t, "a_clip": best})
        assert torch.allclose(sens, exact4(x) - lin(x), atol=1e-4)
        real = PackedLinear(clipped.storage(), lin.weight.shape, clipped.bias, 4)
        ref, out = clipped(x), real(x)
    assert 10 * torch.log10(ref.pow(2).sum() / (out - ref).pow(2).sum()) > 25


def test_clip_stage_picks_per_layer_ratios_for_a_toy_plan(make_toy, toy_obs):
    policy = make_toy()
    plan = METHODS["rtn"](policy, QuantConfig(method="rtn", w_bits=4, a_bits=4), None, {})
    ratios = clip_ratios(policy, plan, toy_obs)
    assert set(ratios) == {"3", "5"} and all(min(abs(float(r) - q) for q in RATIOS) < 1e-6 for r in ratios.values())
    plan = clip_activations(policy, plan, toy_obs)
    assert plan.method == "rtn+ac" and all("a_clip" in plan.transforms[n] for n in ratios)
    weight_only = METHODS["rtn"](policy, QuantConfig(method="rtn", w_bits=4), None, {})
    with pytest.raises(ValueError, match="needs quantized activations"):
        clip_ratios(policy, weight_only, toy_obs)


def test_suffixes_parse_in_any_order_and_clipping_needs_quantized_activations():
    assert split_method("qvla-rot+ac+bc") == ("qvla-rot", {"+ac", "+bc"}) == split_method("qvla-rot+bc+ac")
    cfg = QuantConfig(method="qvla-rot+ac", w_bits=4, a_bits=4)
    assert cfg.method == "qvla-rot" and cfg.act_clip and not cfg.bias_correct
    with pytest.raises(ValueError, match=r"activation clipping \(qvla\+ac\) needs --a-bits 8 or 4, got 16"):
        QuantConfig(method="qvla+ac", w_bits=4)


def test_storage_refuses_a_clip_out_of_range_or_shape():
    lin, _ = layer_and_inputs()
    storage = QuantLinear.from_linear(lin, torch.full((24,), 4), 4, {"a_clip": torch.tensor([0.8])}).storage()
    validate_storage(storage, (24, 32), "ok")
    with pytest.raises(ValueError, match=r"a_clip must lie in \(0, 1\]"):
        validate_storage({**storage, "a_clip": torch.tensor([1.5])}, (24, 32), "layer")
    with pytest.raises(ValueError, match=r"a_clip has shape \(2,\), expected \(1,\)"):
        validate_storage({**storage, "a_clip": torch.tensor([0.5, 0.5])}, (24, 32), "layer")
