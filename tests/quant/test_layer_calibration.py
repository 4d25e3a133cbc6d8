"""Layer-calibrated sensitivities: the measured per-layer deviation, the rescaling loop, and its guards."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from qvla.quant import layer_calibration as L
from qvla.quant import sensitivity as S
from qvla.quant.methods import QuantConfig
from qvla.quant.methods.qvla import make_plan
from qvla.quant.primitives import fake_quant_activation, fake_quant_mixed


@pytest.fixture
def toy(make_toy):
    return make_toy()


@pytest.fixture
def sens(toy, toy_obs) -> S.Sensitivity:
    return S.compute(toy, toy_obs, batch_size=8)


@pytest.mark.parametrize("a_bits", [16, 8])
@torch.no_grad()
def test_layer_deviation_is_the_brute_force_deviation(toy, toy_obs, a_bits):
    bits = {"3": torch.tensor([0, 2, 4, 8] * 4), "5": torch.tensor([16, 16, 4, 2, 0, 8])}
    before = {n: p.clone() for n, p in toy.model.state_dict().items()}
    got = L.layer_deviations(toy, S.batches(toy, toy_obs, 8), "action", bits, a_bits, torch.ones(len(toy_obs)).double())
    x = torch.stack(toy_obs)
    ref = toy.model(x)
    for n, b in bits.items():
        w = fake_quant_mixed(toy.model[int(n)].weight.detach(), b)
        h = x
        for i, m in enumerate(toy.model):  # layer n replaced by its quantized form
            if i == int(n):
                h = torch.nn.functional.linear(fake_quant_activation(h, a_bits), w, m.bias)
            else:
                h = m(h)
        truth = float((h - ref).norm(dim=1).sum())
        assert got[n] == pytest.approx(truth, rel=1e-5), n
    assert all(torch.equal(p, before[n]) for n, p in toy.model.state_dict().items()), "weights restored"


@torch.no_grad()
def test_a_rotated_layer_is_measured_rotated(toy, toy_obs):
    from qvla.quant.rotation import random_signs, rotate_inputs, rotate_weight

    signs = random_signs(100, seed=3)
    bits = {"3": torch.full((16,), 2)}
    w1 = torch.ones(len(toy_obs)).double()
    rotated = L.layer_deviations(toy, S.batches(toy, toy_obs, 8), "action", bits, 4, w1, {"3": {"in_signs": signs}})
    plain = L.layer_deviations(toy, S.batches(toy, toy_obs, 8), "action", bits, 4, w1)
    x = torch.stack(toy_obs)
    h = toy.model[:3](x)
    w = fake_quant_mixed(rotate_weight(toy.model[3].weight.float(), signs), bits["3"])
    h = torch.nn.functional.linear(fake_quant_activation(rotate_inputs(h, signs), 4), w, toy.model[3].bias)
    truth = float((toy.model[4:](h) - toy.model(x)).norm(dim=1).sum())
    assert rotated["3"] == pytest.approx(truth, rel=1e-4) and rotated["3"] != pytest.approx(plain["3"], rel=1e-3)


def test_a_layer_kept_in_floating_point_is_not_measured(toy, toy_obs):
    bits = {"0": torch.full((4,), 16), "3": torch.full((16,), 4)}
    got = L.layer_deviations(toy, S.batches(toy, toy_obs, 8), "action", bits, 16, torch.ones(len(toy_obs)).double())
    assert set(got) == {"3"} and got["3"] > 0


def test_kl_deviation_is_zero_for_equal_logits_and_positive_otherwise():
    z = torch.randn(3, 4, 8)
    assert torch.allclose(S.per_step_deviation(z, z, "logits"), torch.zeros(3), atol=1e-6)
    assert (S.per_step_deviation(z, z + torch.randn(3, 4, 8), "logits") > 0).all()
    assert torch.allclose(S.per_step_deviation(z[:, 0], z[:, 0] + 1, "action"), torch.full((3,), 8 ** 0.5))


def test_one_output_channel_is_predicted_exactly(toy, toy_obs, sens):
    """The output layer's one quantized channel moves the action by exactly its projected term."""
    bits = {"5": torch.tensor([16, 16, 2, 16, 16, 16])}
    truth = L.layer_deviations(toy, S.batches(toy, toy_obs, 8), "action", bits, 16, torch.ones(len(toy_obs)).double())
    assert truth["5"] == pytest.approx(L.predicted(sens.projected, bits)["5"], rel=1e-5)


def test_scales_are_the_running_maximum_of_measured_over_predicted(toy, toy_obs, sens):
    plans = [{"0": torch.full((4,), 2), "3": torch.full((16,), 0), "5": torch.full((6,), 4)},
             {"0": torch.full((4,), 8), "3": torch.full((16,), 4), "5": torch.full((6,), 2)},
             {"0": torch.full((4,), 4), "3": torch.full((16,), 8), "5": torch.full((6,), 8)}]
    seen = []
    raw = {n: t.clone() for n, t in sens.projected.items()}

    def allocate(s):
        seen.append(s)
        return plans[len(seen) - 1]

    out = L.calibrate_layers(toy, sens, allocate, toy_obs, "projected", rounds=2, batch_size=8)
    hist = out.meta["layer_calibration"]["history"]
    assert [h["final"] for h in hist] == [False, False, True] and seen[0] is sens
    units = [float(np.median([h["truth"][n] / h["predicted"][n] for n in h["truth"]])) for h in hist]
    assert [h["unit"] for h in hist] == pytest.approx(units) and units[0] < 1  # action form: relative to the median
    for n in sens.product:
        ratios = [h["truth"][n] / h["predicted"][n] / h["unit"] for h in hist[:2]]  # the final pass rescales nothing
        scale = max([1.0] + ratios)
        assert out.meta["layer_scale"][n] == pytest.approx(scale, rel=1e-3)
        assert torch.allclose(out.projected[n], sens.projected[n] * scale, rtol=1e-3)
        assert torch.allclose(out.product[n], sens.product[n] * scale, rtol=1e-3)
        assert torch.equal(sens.projected[n], raw[n]), "the input tables are left as they were"
    # each round allocated from the previous round's rescaled costs; the final pass measured the last plan
    assert seen[1].meta["layer_scale"] == {
        n: round(max(1.0, hist[0]["truth"][n] / hist[0]["predicted"][n] / units[0]), 4) for n in sens.product}
    assert seen[2].meta["layer_scale"] == out.meta["layer_scale"]
    assert hist[0]["pruned"] == {"0": 0, "3": 16, "5": 0} and hist[2]["pruned"] == {"0": 0, "3": 0, "5": 0}


@torch.no_grad()
def test_a_conv_layer_and_step_weights(toy, toy_obs):
    bits = {"0": torch.tensor([2, 4, 0, 16])}
    w = torch.tensor([2.0] * 12 + [0.0] * 12, dtype=torch.float64)
    got = L.layer_deviations(toy, S.batches(toy, toy_obs, 8), "action", bits, 8, w)
    x = torch.stack(toy_obs[:12])
    conv = toy.model[0]
    xq = fake_quant_activation(x.movedim(1, -1), 8).movedim(-1, 1)  # a conv token is one pixel
    h = torch.nn.functional.conv2d(xq, fake_quant_mixed(conv.weight, bits["0"]), conv.bias, padding=1)
    truth = 2 * float((toy.model[1:](h) - toy.model(x)).norm(dim=1).sum())
    assert got["0"] == pytest.approx(truth, rel=1e-5)


def _duplicated(dup: bool):
    """Token-head toy whose hidden channels 8-15 copy 0-7 (rows and the next layer's columns) when dup."""
    from conftest import ToyPolicy, toy_model

    m = toy_model(hidden=16, out=24)
    if dup:
        with torch.no_grad():
            m[3].weight[8:], m[3].bias[8:] = m[3].weight[:8], m[3].bias[:8]
            m[5].weight[:, 8:] = m[5].weight[:, :8]
    return ToyPolicy(m, bins=8)


@pytest.mark.parametrize("dup", [False, True])
def test_channels_that_err_together_are_found_worse_than_their_proxy(toy_obs, dup):
    """KL is quadratic: two channels making the same error cost 4x one, not 2x as their costs add. With
    copied channels the layer measures ~2x its proxy; without, ~1x."""
    toy = _duplicated(dup)
    sens = S.compute(toy, toy_obs, form="logits", batch_size=8, probes=64)
    bits = {"3": torch.full((16,), 4)}
    truth = L.layer_deviations(toy, S.batches(toy, toy_obs, 8), "logits", bits, 16, torch.ones(len(toy_obs)).double())
    ratio = truth["3"] / L.predicted(sens.projected, bits)["3"]
    assert (1.7 < ratio < 2.5) if dup else (0.8 < ratio < 1.25), ratio


def test_layer_calibration_moves_bits_to_the_layer_its_proxy_underrates(toy_obs):
    toy = _duplicated(True)
    sens = S.compute(toy, toy_obs, form="logits", batch_size=8, probes=64)
    cfg = QuantConfig(method="qvla", w_bits=4, form="logits")
    out = L.calibrate_layers(toy, sens, lambda s: make_plan(toy, cfg, s).bits, toy_obs, cfg.proxy)
    before, after = make_plan(toy, cfg, sens), make_plan(toy, cfg, out)
    assert out.meta["layer_scale"]["3"] > 1.5 > max(out.meta["layer_scale"][n] for n in ("0", "5"))
    assert after.bits["3"].float().mean() > before.bits["3"].float().mean()
    assert after.average_bits <= 4 + 1e-9
    final = out.meta["layer_calibration"]["history"][-1]  # measured on the plan the returned costs give
    assert final["final"] and final["pruned"] == {n: int((after.bits[n] == 0).sum()) for n in final["pruned"]}
    assert all(h["unit"] == 1.0 for h in out.meta["layer_calibration"]["history"])  # KL costs add: no common factor


def test_guards(toy, toy_obs, sens):
    with pytest.raises(ValueError, match="at least one round"):
        L.calibrate_layers(toy, sens, lambda s: {}, toy_obs, "projected", rounds=0)
    rotated = dataclasses.replace(sens, meta={**sens.meta, "transforms": "rotation"})
    with pytest.raises(ValueError, match="measured on rotation layers need the same layers measured here"):
        L.calibrate_layers(toy, rotated, lambda s: {}, toy_obs, "projected")
    with pytest.raises(ValueError, match="measured on untransformed layers"):
        L.calibrate_layers(toy, sens, lambda s: {}, toy_obs, "projected", transforms={"3": {}})
    for method in ("rtn+lc", "awq+lc", "omniquant+lc"):
        with pytest.raises(ValueError, match=r"\+lc rescales"):
            QuantConfig(method=method)
    for method in ("qvla-gptq", "qvla-rot-gptq", "qvla-srot"):
        cfg = QuantConfig(method=method + "+lc")
        assert cfg.method == method and cfg.layer_calibrate


def test_pruning_is_measured_and_priced_apart_from_rounding(toy, toy_obs, sens):
    """+lcp: a layer that prunes is measured with only its rounding and with only its pruning; its 0-bit
    column takes the pruning's ratio, the rest of its table the rounding's (both over the median rounding
    ratio, action form), each a running maximum from 1."""
    plans = [{"0": torch.tensor([2, 4, 0, 16]), "3": torch.tensor([0] * 12 + [4] * 4), "5": torch.full((6,), 4)},
             {"0": torch.full((4,), 8), "3": torch.tensor([0] * 4 + [2] * 12), "5": torch.full((6,), 2)}]
    seen = []

    def allocate(s):
        seen.append(s)
        return plans[min(len(seen), 2) - 1]

    out = L.calibrate_layers(toy, sens, allocate, toy_obs, "projected", rounds=1, batch_size=8, prune_apart=True)
    first = out.meta["layer_calibration"]["history"][0]
    assert set(first["truth_pruning"]) == {"0", "3"}  # the layers that prune, and only them
    rounding, pruning = L.split_pruning(plans[0])
    w1 = torch.ones(len(toy_obs)).double()
    for n in ("0", "3"):  # each measured exactly as the split plans say
        truth = L.layer_deviations(toy, S.batches(toy, toy_obs, 8), "action", {n: pruning[n]}, 16, w1)[n]
        assert first["truth_pruning"][n] == pytest.approx(truth, rel=1e-6)
    assert torch.equal(rounding["3"], torch.tensor([16] * 12 + [4] * 4))
    unit = first["unit"]
    col0 = S.SENS_BITS.index(0)
    for n in sens.product:
        s = max(1.0, first["truth"][n] / first["predicted"][n] / unit)
        p = max(1.0, first["truth_pruning"][n] / first["predicted_pruning"][n] / unit) if n in pruning else 1.0
        assert out.meta["layer_scale"][n] == pytest.approx(s, rel=1e-3)
        assert out.meta["layer_prune_scale"][n] == pytest.approx(p, rel=1e-3)
        keep = [i for i in range(len(S.SENS_BITS)) if i != col0]
        assert torch.allclose(out.projected[n][:, keep], sens.projected[n][:, keep] * s, rtol=1e-3)
        assert torch.allclose(out.projected[n][:, col0], sens.projected[n][:, col0] * p, rtol=1e-3)
    assert out.meta["layer_calibration"]["prune_apart"] is True


def test_lcp_suffix_prices_pruning_instead_of_the_role_rule():
    """'+lcp' turns layer calibration on with pruning priced apart, and with it the default no-prune rule by
    role (NO_PRUNE_BELOW) gives way; an explicit --no-prune still holds; +lc and +lcp do not combine."""
    from qvla.quant.methods import NO_PRUNE_BELOW

    below, roles = NO_PRUNE_BELOW[0]
    plain = QuantConfig(method="qvla-gptq+lc", w_bits=below - 1)
    priced = QuantConfig(method="qvla-gptq+lcp", w_bits=below - 1)
    assert plain.no_prune == roles and plain.layer_calibrate and not plain.layer_calibrate_prune
    assert priced.no_prune == () and priced.layer_calibrate and priced.layer_calibrate_prune
    assert priced.method == "qvla-gptq"
    assert QuantConfig(method="qvla+lcp", w_bits=3, no_prune=("llm",)).no_prune == ("llm",)
    with pytest.raises(ValueError, match="three layer calibrations"):
        QuantConfig(method="qvla+lc+lcp")
    with pytest.raises(ValueError, match=r"\+lc rescales"):
        QuantConfig(method="rtn+lcp")


@pytest.mark.parametrize("bits", [8, 4])
def test_linearized_deviation_is_the_first_order_term_of_the_measured_one(toy, toy_obs, sens, bits):
    """'+lcl': the whole layer's ||J dy|| matches the measured deviation to first order (the closer the finer
    the rounding), never exceeds the sum of its channels' projected costs (triangle inequality), and for a
    layer with one output channel quantized equals that channel's projected cost."""
    steps, w1 = S.batches(toy, toy_obs, 8), torch.ones(len(toy_obs)).double()
    plan = {"3": torch.full((16,), bits), "5": torch.full((6,), bits)}
    lin = L.linearized_deviations(toy, steps, plan, 16, w1)
    truth = L.layer_deviations(toy, steps, "action", plan, 16, w1)
    channels = L.predicted(sens.projected, plan)
    for n in plan:
        assert lin[n] == pytest.approx(truth[n], rel=0.02 if bits == 8 else 0.15), n
        assert lin[n] <= channels[n] * (1 + 1e-6), n
    one = {"3": torch.tensor([16] * 5 + [2] + [16] * 10)}
    assert L.linearized_deviations(toy, steps, one, 16, w1)["3"] == pytest.approx(
        L.predicted(sens.projected, one)["3"], rel=1e-4)


def test_lcl_compares_each_layer_with_its_linearization(toy, toy_obs, sens):
    """With the linearized baseline the unit is 1 and the history records both baselines; the suffix needs
    the action distance and does not combine with the other layer calibrations."""
    cfg = QuantConfig(method="qvla+lcl", w_bits=3)
    assert cfg.layer_calibrate and cfg.layer_calibrate_linear
    got = L.calibrate_layers(toy, sens, lambda s: make_plan(toy, cfg, s).bits, toy_obs, "projected", rounds=1,
                             baseline="linearized")
    meta = got.meta["layer_calibration"]
    assert meta["baseline"] == "linearized"
    first = meta["history"][0]
    assert first["unit"] == 1.0 and set(first["predicted_channels"]) == set(first["predicted"])
    for n, s in got.meta["layer_scale"].items():  # scales: how far the truth exceeds the linearization
        assert s == pytest.approx(max(1.0, first["truth"][n] / first["predicted"][n]), abs=1e-4), n
    with pytest.raises(ValueError, match="three layer calibrations"):
        QuantConfig(method="qvla+lc+lcl")
    with pytest.raises(ValueError, match="--form action"):
        QuantConfig(method="qvla+lcl", form="logits")
    with pytest.raises(ValueError, match="baseline"):
        L.calibrate_layers(toy, sens, lambda s: make_plan(toy, cfg, s).bits, toy_obs, "projected", baseline="x")
