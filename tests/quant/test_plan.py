"""The plan artifact: validation, save/load, determinism, and the fan_in-weighted average."""
from __future__ import annotations

import json

import pytest
import torch

from qvla.quant import sensitivity as S
from qvla.quant.apply import layer_shapes
from qvla.quant.methods import METHODS, NEEDS, TRANSFORMED, QuantConfig, transforms_for
from qvla.quant.methods.qvla import make_plan
from qvla.quant.plan import Plan, signature


def plan_of(bits: dict[str, list[int]], fan_in: dict[str, int], **kw) -> Plan:
    args = {"a_bits": 16, "budget": 4.0, "method": "test", "signature": "0" * 16, **kw}
    return Plan({n: torch.tensor(b, dtype=torch.int8) for n, b in bits.items()}, fan_in,
                {n: "llm" for n in bits}, args["a_bits"], args["budget"], args["method"], args["signature"])


def test_average_bits_is_weighted_by_fan_in():
    p = plan_of({"a": [8, 4], "b": [2, 2, 16]}, {"a": 10, "b": 5})
    # (8 + 4) * 10 + (2 + 2 + 16) * 5 = 220 bit-weights over 2 * 10 + 3 * 5 = 35 weights
    assert p.average_bits == pytest.approx(220 / 35)
    s = p.summary()["llm"]
    assert s["weights"] == 35 and s["channels"] == 5 and s["average_bits"] == pytest.approx(220 / 35)
    assert s["hist"] == {"0": 0, "2": 2, "4": 1, "8": 1, "16": 1}


@pytest.fixture
def sens(make_toy, toy_obs) -> S.Sensitivity:
    return S.compute(make_toy(), toy_obs, batch_size=8)


def test_save_load_round_trip(tmp_path, make_toy, sens):
    plan = make_plan(make_toy(), QuantConfig(w_bits=3.0, a_bits=16), sens, {"note": "x"})
    loaded = Plan.load(plan.save(tmp_path / "plan"))
    assert list(loaded.bits) == list(plan.bits)
    for n in plan.bits:
        assert loaded.bits[n].dtype == torch.int8 and torch.equal(loaded.bits[n], plan.bits[n])
    assert (loaded.fan_in, loaded.roles, loaded.a_bits, loaded.budget, loaded.method, loaded.signature) == \
        (plan.fan_in, plan.roles, plan.a_bits, plan.budget, plan.method, plan.signature)
    assert loaded.average_bits == plan.average_bits <= 3.0
    assert loaded.provenance["note"] == "x" and loaded.provenance["solver"] == "greedy-hull"
    meta = json.loads((tmp_path / "plan" / "plan.json").read_text())
    assert meta["average_bits"] == pytest.approx(plan.average_bits) and set(meta["per_role"]) == set(sens.roles.values())


def test_load_refuses_a_non_plan(tmp_path):
    with pytest.raises(FileNotFoundError, match="plan.json is missing"):
        Plan.load(tmp_path)
    plan_of({"a": [8]}, {"a": 1}).save(tmp_path)
    meta = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps({**meta, "format": "qvla-plan/0"}))
    with pytest.raises(ValueError, match="qvla-plan/0"):
        Plan.load(tmp_path)


@pytest.mark.parametrize("a_bits, loads", [(16, True), (8, True), (4, False)])
def test_plans_of_the_first_format_load_unless_their_a4_grid_changed(tmp_path, a_bits, loads):
    """qvla-plan/1 rounded A4 activations on the symmetric grid: such a plan would now run differently."""
    plan_of({"a": [8]}, {"a": 1}, a_bits=a_bits).save(tmp_path)
    meta = json.loads((tmp_path / "plan.json").read_text())
    (tmp_path / "plan.json").write_text(json.dumps({**meta, "format": "qvla-plan/1"}))
    if loads:
        assert Plan.load(tmp_path).a_bits == a_bits
    else:
        with pytest.raises(ValueError, match="symmetric grid: quantize again"):
            Plan.load(tmp_path)


@pytest.mark.parametrize("bad", [1, 3, 5, 7, 12, 32])
def test_bits_outside_allowed_raise(bad):
    with pytest.raises(ValueError, match=rf"layer b: bits \[{bad}\] not in \(0, 2, 4, 8, 16\)"):
        plan_of({"a": [8, 4], "b": [4, bad, 2]}, {"a": 1, "b": 1})


@pytest.mark.parametrize("a_bits", [0, 2, 6, 32])
def test_bad_a_bits_raise(a_bits):
    with pytest.raises(ValueError, match=rf"a_bits must be one of \(4, 8, 16\), got {a_bits}"):
        plan_of({"a": [8]}, {"a": 1}, a_bits=a_bits)


@pytest.mark.parametrize("budget", [0, -1.0, 16.01, 17])
def test_bad_budget_raise(budget):
    with pytest.raises(ValueError, match=rf"\(0, 16\], got {budget}"):
        plan_of({"a": [8]}, {"a": 1}, budget=budget)


@pytest.mark.parametrize("solver", ["greedy", "exact"])
@pytest.mark.parametrize("proxy", ["product", "projected"])
def test_same_inputs_give_the_same_plan(tmp_path, make_toy, sens, solver, proxy):
    cfg = QuantConfig(w_bits=2.5, solver=solver, proxy=proxy, no_prune=("action_head",))
    a, b = make_plan(make_toy(), cfg, sens), make_plan(make_toy(), cfg, sens)
    S.save(tmp_path / "s.safetensors", sens, {})
    c = make_plan(make_toy(), cfg, S.load(tmp_path / "s.safetensors")[0])  # via the saved artifact
    for other in (b, c):
        assert list(other.bits) == list(a.bits)
        assert all(torch.equal(a.bits[n], other.bits[n]) for n in a.bits)
        assert other.signature == a.signature and other.average_bits == a.average_bits
    assert a.average_bits <= 2.5 and (a.bits["5"] != 0).all()
    assert len(torch.cat(list(a.bits.values())).unique()) > 1  # really mixed precision, not one width


def test_plan_needs_sensitivity_of_its_a_bits(make_toy, sens):
    with pytest.raises(ValueError, match="a_bits=16, plan wants 8"):
        make_plan(make_toy(), QuantConfig(w_bits=4, a_bits=8), sens)


def test_signature_depends_on_names_and_shapes_only():
    s = signature({"a": (4, 3), "b": (2, 2)})
    assert s == signature({"b": (2, 2), "a": (4, 3)})
    assert s != signature({"a": (4, 3), "b": (2, 3)}) and s != signature({"a": (4, 3), "c": (2, 2)})


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_makes_a_valid_plan_for_the_toy(make_toy, sens, toy_obs, method):
    toy = make_toy()
    calibration = {"sensitivity": sens, "observations": toy_obs, None: None, "both": (sens, toy_obs)}.get(NEEDS[method])
    if NEEDS[method] == "transformed":  # sensitivities measured on the layers the method transforms first
        transforms = transforms_for(method)(toy, QuantConfig(method=method, w_bits=4), toy_obs)
        calibration = (S.compute(toy, toy_obs, batch_size=8, transforms=(TRANSFORMED[method], transforms)),
                       transforms, toy_obs)
        with pytest.raises(ValueError, match=rf"on its transformed layers \({TRANSFORMED[method]}\), these were "
                                             "measured on untransformed ones"):
            METHODS[method](toy, QuantConfig(method=method, w_bits=4), (sens, transforms, toy_obs), {})
        with pytest.raises(ValueError, match="on the untransformed layers, these were measured on"):
            make_plan(toy, QuantConfig(w_bits=4), calibration[0])
    plan = METHODS[method](toy, QuantConfig(method=method, w_bits=4), calibration, {})
    assert plan.method == method and set(plan.bits) == {"0", "3", "5"}
    assert plan.signature == signature(layer_shapes(toy.model, plan.bits))
    assert plan.average_bits <= 4.0 + 1e-9


def test_rtn_refuses_non_integer_bits_and_respects_pins(make_toy):
    for w_bits in (3, 3.5, 1):
        with pytest.raises(ValueError, match=rf"\(2, 4, 8, 16\), got {w_bits}"):
            METHODS["rtn"](make_toy(), QuantConfig(method="rtn", w_bits=w_bits))
    plan = METHODS["rtn"](make_toy(), QuantConfig(method="rtn", w_bits=2, pins={"action_head": 16}))
    assert plan.bits["5"].tolist() == [16] * 6 and set(plan.bits["3"].tolist()) == {2}


def test_plan_with_transforms_round_trips(make_toy, toy_obs, tmp_path):
    from qvla.quant.plan import TRANSFORMS

    plan = METHODS["omniquant"](make_toy(), QuantConfig(method="omniquant", w_bits=4, a_bits=8), toy_obs, {})
    plan.save(tmp_path)
    assert (tmp_path / TRANSFORMS).is_file()
    back = Plan.load(tmp_path)
    assert set(back.transforms) == set(plan.transforms) and back.transforms
    for n, t in plan.transforms.items():
        assert set(back.transforms[n]) == set(t)
        assert all(torch.equal(back.transforms[n][k], v.float()) for k, v in t.items())
