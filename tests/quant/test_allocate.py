"""Bit allocation: the greedy meets every feasible budget, is monotone in it, and the MILP never does worse."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qvla.quant import allocate
from qvla.quant.allocate import CHAIN, Problem, exact, greedy
from qvla.quant.methods import QuantConfig
from qvla.quant.methods.qvla import problem_from
from qvla.quant.sensitivity import Sensitivity

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def problems(draw, pinned: bool = False) -> Problem:
    """Random non-negative costs, non-decreasing as bits drop, fan_in 1..64; optionally random floors."""
    n = draw(st.integers(1, 8))
    steps = np.array(draw(st.lists(st.floats(0, 10, allow_nan=False), min_size=5 * n, max_size=5 * n)))
    cost = np.cumsum(steps.reshape(n, 5), axis=1)  # cost[:, 0] <= cost[:, 1] <= ... (16 -> 0 bits)
    fan_in = np.array(draw(st.lists(st.integers(1, 64), min_size=n, max_size=n)), dtype=np.float64)
    allowed = np.ones((n, 5), dtype=bool)
    if pinned:
        floors = draw(st.lists(st.sampled_from(CHAIN), min_size=n, max_size=n))
        allowed &= np.array(CHAIN)[None] >= np.array(floors)[:, None]
        no_prune = draw(st.lists(st.booleans(), min_size=n, max_size=n))
        allowed[np.array(no_prune), CHAIN.index(0)] = False
    return Problem(cost, fan_in, allowed)


def budget_in(draw, p: Problem) -> float:
    """A budget in (max(min_average, 0), 16]."""
    lo = p.min_average()
    u = draw(st.floats(0, 1, exclude_min=True))
    b = lo + u * (16 - lo)
    return b if b > lo else 16.0


def assert_valid(p: Problem, bits: np.ndarray, budget: float, tol: float = 1e-9) -> None:
    assert bits.shape == p.fan_in.shape
    assert set(bits.tolist()) <= set(CHAIN)
    cols = np.array([CHAIN.index(int(b)) for b in bits])
    assert p.allowed[np.arange(len(bits)), cols].all(), "a channel got bits it is not allowed"
    assert p.average_bits(bits) <= budget + tol


@SETTINGS
@given(data=st.data(), pinned=st.booleans())
def test_greedy_meets_budget_with_allowed_bits(data, pinned):
    p = data.draw(problems(pinned))
    budget = budget_in(data.draw, p)
    assert_valid(p, greedy(p, budget), budget)


@SETTINGS
@given(data=st.data())
def test_more_budget_never_raises_greedy_objective(data):
    p = data.draw(problems(data.draw(st.booleans())))
    b1, b2 = budget_in(data.draw, p), budget_in(data.draw, p)
    lo, hi = min(b1, b2), max(b1, b2)
    assert p.objective(greedy(p, hi)) <= p.objective(greedy(p, lo)) + 1e-12


@SETTINGS
@given(data=st.data(), pinned=st.booleans())
def test_exact_meets_budget_and_is_no_worse_than_greedy(data, pinned):
    p = data.draw(problems(pinned))
    budget = budget_in(data.draw, p)
    g = greedy(p, budget)
    bits, cert = exact(p, budget, time_limit=10)
    assert_valid(p, bits, budget)
    assert cert["objective"] == pytest.approx(p.objective(bits))
    assert p.objective(bits) <= p.objective(g) + 1e-6 * max(1.0, p.objective(g))


def test_greedy_demotes_the_cheapest_channel_per_bit_first():
    # channel 0 loses little per saved bit, channel 1 a lot: at 12 bits only channel 0 may leave 16
    p = Problem(np.array([[0, 1, 2, 3, 100], [0, 50, 60, 70, 200]], float), np.array([8.0, 8.0]),
                np.ones((2, 5), bool))
    assert greedy(p, 12).tolist() == [8, 16]
    assert greedy(p, 16).tolist() == [16, 16]
    assert exact(p, 12)[0].tolist() == [8, 16]


def test_greedy_can_be_suboptimal_and_exact_fixes_it():
    # channel 0 is cheapest per saved bit, but demoting it saves 32 bit-weights where 8 suffice: one narrow
    # channel demoted instead costs less. The greedy takes the first, the MILP must find the second.
    cost = np.array([[0, 1.0, 1e3, 1e3, 1e3], [0, 0.9, 1e3, 1e3, 1e3], [0, 0.9, 1e3, 1e3, 1e3]])
    p = Problem(cost, np.array([4.0, 1.0, 1.0]), np.ones((3, 5), bool))
    budget = (16 * 6 - 8) / 6
    g, (x, cert) = greedy(p, budget), exact(p, budget)
    assert_valid(p, g, budget)
    assert_valid(p, x, budget)
    assert g.tolist() == [8, 16, 16] and p.objective(g) == pytest.approx(1.0)
    assert p.objective(x) == pytest.approx(0.9) and sorted(x.tolist()) == [8, 16, 16] and x[0] == 16
    assert cert["dual_bound"] == pytest.approx(0.9, rel=1e-5)


@pytest.mark.parametrize("budget", [0, -1, 16.5, 17])
def test_budget_outside_range_raises(budget):
    p = Problem(np.zeros((2, 5)), np.ones(2), np.ones((2, 5), bool))
    for solve in (greedy, exact):
        with pytest.raises(ValueError, match=rf"\(0, 16\], got {budget}"):
            solve(p, budget)


def test_problem_requires_16_bits_allowed_and_matching_shapes():
    allowed = np.ones((2, 5), bool)
    allowed[1, 0] = False
    with pytest.raises(ValueError, match="16 bits must be allowed"):
        Problem(np.zeros((2, 5)), np.ones(2), allowed)
    with pytest.raises(ValueError, match=r"must be \(3, 5\)"):
        Problem(np.zeros((2, 5)), np.ones(3), np.ones((2, 5), bool))


def fake_sensitivity() -> Sensitivity:
    """Two layers: 'enc.0' (vision, 3 channels, fan_in 4) and 'head' (lm_head, 2 channels, fan_in 8)."""
    g = torch.Generator().manual_seed(0)
    tables = {n: torch.rand(c, 5, generator=g, dtype=torch.float64).cumsum(1) for n, c in (("enc.0", 3), ("head", 2))}
    return Sensitivity(tables, {n: t / 2 for n, t in tables.items()}, {n: torch.ones(len(t)) for n, t in tables.items()},
                       {"enc.0": 4, "head": 8}, {"enc.0": "vision", "head": "lm_head"}, {"a_bits": 16})


@pytest.mark.parametrize("pins, no_prune, floor_head, enc_can_prune", [
    ({"lm_head": 8}, ("vision",), 8, False),
    ({"re:^head$": 16}, (), 16, True),
    ({}, ("lm_head",), 2, True),
])
@pytest.mark.parametrize("budget", [1.0, 3.0, 6.0, 10.0])
def test_pins_and_no_prune_are_respected(pins, no_prune, floor_head, enc_can_prune, budget):
    p, layers = problem_from(fake_sensitivity(), QuantConfig(pins=pins, no_prune=no_prune), "product")
    assert layers == ["enc.0", "head"]
    assert p.fan_in.tolist() == [4, 4, 4, 8, 8]
    if p.min_average() > budget:
        with pytest.raises(ValueError, match="below the lowest average the pins allow"):
            greedy(p, budget)
        return
    for bits in (greedy(p, budget), exact(p, budget)[0]):
        assert_valid(p, bits, budget)
        assert (bits[3:] >= floor_head).all() and (bits[3:] != 0).all()
        if not enc_can_prune:
            assert (bits[:3] != 0).all()


@pytest.mark.parametrize("w_bits, no_prune, vision_allowed_zero", [
    (3.0, None, False),  # the default below 4 bits: vision channels are not pruned
    (4.0, None, True),  # from 4 bits every role may prune
    (3.0, (), True),  # an explicit empty list replaces the default
])
def test_default_no_prune_depends_on_the_budget(w_bits, no_prune, vision_allowed_zero):
    cfg = QuantConfig(w_bits=w_bits, no_prune=no_prune)
    p, _ = problem_from(fake_sensitivity(), cfg, "product")
    assert p.allowed[:3, CHAIN.index(0)].tolist() == [vision_allowed_zero] * 3
    assert p.allowed[3:, CHAIN.index(0)].all()
    bits = greedy(p, 1.0)  # a budget that prunes whatever it may
    assert (bits[:3] != 0).all() != vision_allowed_zero


def test_budget_below_pins_raises_with_the_lowest_average():
    p, _ = problem_from(fake_sensitivity(), QuantConfig(pins={"lm_head": 16}), "product")
    assert p.min_average() == pytest.approx(16 * 16 / 28)  # 16 of 28 weights stay at 16 bits, the rest at 0
    with pytest.raises(ValueError, match=r"budget 9.0 is below the lowest average the pins allow \(9.1429\)"):
        greedy(p, 9.0)
    assert_valid(p, greedy(p, 9.2), 9.2)


def test_problem_from_uses_the_requested_table():
    sens = fake_sensitivity()
    prod, _ = problem_from(sens, QuantConfig(), "product")
    proj, _ = problem_from(sens, QuantConfig(), "projected")
    assert np.allclose(proj.cost, prod.cost / 2)
    assert allocate.CHAIN == (16, 8, 4, 2, 0)


def test_hull_greedy_is_near_the_lp_bound_where_the_chain_greedy_is_not():
    """Costs that are not convex in the bits (8->4 dear, 4->2->0 cheap) trap the chain-only greedy."""
    rng = np.random.default_rng(3)
    n = 400
    step = rng.lognormal(0, 1, (n, 4)) * np.array([1.0, 50.0, 5.0, 60.0])
    cost = np.concatenate([np.zeros((n, 1)), np.cumsum(step, 1)], 1)
    p = allocate.Problem(cost, rng.integers(8, 64, n).astype(float), np.ones((n, 5), bool))
    hull, chain = allocate.greedy(p, 3.0), allocate.greedy(p, 3.0, hull=False)
    _, cert = allocate.exact(p, 3.0, time_limit=30)
    assert p.average_bits(hull) <= 3.0 + 1e-9
    assert p.objective(hull) <= cert["lower_bound"] * 1.01
    assert p.objective(chain) > p.objective(hull)


@SETTINGS
@given(data=st.data())
def test_held_widths_budget_is_met_as_the_kernels_hold_bits(data):
    """Counting 2-bit channels as the 4 bits the CPU kernels hold them in: the budget is met in that count."""
    p0 = data.draw(problems())
    widths = tuple(allocate.HELD[b] for b in CHAIN)
    p = Problem(p0.cost, p0.fan_in, p0.allowed, widths)
    budget = budget_in(data.draw, p)
    bits = greedy(p, budget)
    held = np.array([allocate.HELD[int(b)] for b in bits])
    assert (p.fan_in * held).sum() / p.fan_in.sum() <= budget + 1e-9
    assert p.average_bits(bits) <= budget + 1e-9


def test_tied_channels_share_bits_and_cost_what_both_cost():
    from qvla.quant.methods.qvla import tie

    rng = np.random.default_rng(0)
    cost = np.sort(rng.random((6, 5)), 1)  # cost grows as bits fall
    cost[:, 0] = 0
    p = allocate.Problem(cost, np.full(6, 8.0), np.ones((6, 5), dtype=bool))
    owner = np.array([0, 1, 2, 0, 1, 2])  # channels 3..5 tied to 0..2
    merged, expand = tie(p, owner)
    assert merged.cost.shape == (3, 5) and np.allclose(merged.cost, cost[:3] + cost[3:])
    assert merged.fan_in.tolist() == [16.0] * 3
    bits = allocate.greedy(merged, 4.0)[expand]
    assert (bits[:3] == bits[3:]).all() and p.average_bits(bits) <= 4.0 + 1e-9
