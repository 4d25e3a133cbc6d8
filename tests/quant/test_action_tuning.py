"""Action-tuned scales (+at): the codes stay, the grid scales and biases move, the held-out deviation never rises."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

from qvla.quant import action_tuning as AT
from qvla.quant.apply import QuantLinear, quantize_
from qvla.quant.methods import METHODS, QuantConfig

EPISODES = [i // 6 for i in range(24)]  # the toy's 24 steps as 4 episodes of 6


def test_the_tuned_transform_keeps_the_codes_on_a_scaled_grid():
    torch.manual_seed(0)
    lin = nn.Linear(12, 10)
    bits = torch.tensor([0, 2, 4, 8, 16, 2, 4, 8, 16, 4])
    t = {"in_scale": torch.rand(12) + 0.5}
    q = QuantLinear.from_linear(lin, bits, 16, t)
    gain = 1 + ((bits > 0) & (bits < 16)).float() * (torch.rand(10) - 0.5)
    add = torch.randn(10)
    new = QuantLinear.from_linear(lin, bits, 16, AT.tuned_transform(q, gain, add, t))
    assert torch.equal(new.payload["codes"], q.payload["codes"])
    assert torch.equal(new.payload["zero"], q.payload["zero"])
    torch.testing.assert_close(new.payload["scale"], q.payload["scale"] * gain)
    torch.testing.assert_close(new.weight, q.weight * gain[:, None])
    torch.testing.assert_close(new.bias, q.bias + add)
    x = torch.randn(5, 12)
    torch.testing.assert_close(new(x), q(x) * gain + (q.bias * (1 - gain) + add), rtol=1e-5, atol=1e-5)


def test_each_episode_holds_out_one_contiguous_segment():
    episodes = ["a"] * 10 + ["b"] * 7 + ["c"] * 12
    fit, held = AT.split_steps(episodes, holdout=5)
    assert sorted(fit + held) == list(range(len(episodes))) and not set(fit) & set(held)
    for e in "abc":
        h = [i for i in held if episodes[i] == e]
        assert h and h == list(range(h[0], h[-1] + 1)), e  # some of every episode, contiguous
    assert [i for i in held if episodes[i] == "a"] == [0, 1]  # episode 0: its first fifth
    with pytest.raises(ValueError, match="episode id"):
        AT.split_steps([0, 0, None])


def test_an_acted_episode_holds_out_its_twins_segment():
    """Three calibration episodes and their acted twins (the same starts): twin and original hold out the same
    fifth, whatever the twin's position, so near-copies of held-out steps are never trained on."""
    episodes = [e for e in "abc" for _ in range(10)] + [f"t:{e}" for e in "abc" for _ in range(10)]
    twins = [e for e in "abc" for _ in range(10)] * 2
    _, held = AT.split_steps(episodes, holdout=5, twins=twins)
    segment = {e: sorted(i % 10 for i in held if episodes[i] == e) for e in set(episodes)}
    assert segment["a"] == segment["t:a"] == [0, 1] and segment["c"] == segment["t:c"] == [4, 5]
    _, alone = AT.split_steps(episodes, holdout=5)  # without twins the acted ones would take k = 3, 4, 5
    assert sorted(i % 10 for i in alone if episodes[i] == "t:a") == [6, 7]


def _deviation(ref_policy, plan, obs, idx) -> float:
    q = copy.deepcopy(ref_policy)
    quantize_(q, plan)
    with torch.no_grad():
        b = ref_policy.batch([obs[i] for i in idx])
        return float((q.action_outputs(b, "action") - ref_policy.action_outputs(b, "action")).pow(2).sum())


@pytest.mark.parametrize("a_bits", [16, 4])
def test_tuning_lowers_the_deviation_and_never_raises_the_held_out_one(make_toy, toy_obs, a_bits):
    policy = make_toy()
    plan = METHODS["rtn"](policy, QuantConfig(method="rtn", w_bits=2, a_bits=a_bits), None, {})
    before = copy.deepcopy(plan)
    fit, held = AT.split_steps(EPISODES)
    start_fit, start_held = (_deviation(policy, plan, toy_obs, i) for i in (fit, held))
    tuned = AT.tune_to_actions(policy, copy.deepcopy(plan), toy_obs, "action", episodes=EPISODES, epochs=30, lr=1e-2)
    h = tuned.provenance["action_tuning"]
    assert tuned.method == "rtn+at" and h["best_epoch"] > 0
    end_fit, end_held = (_deviation(policy, tuned, toy_obs, i) for i in (fit, held))
    assert end_held == pytest.approx(min(h["held_out"]), rel=1e-4) and end_held <= start_held
    assert end_fit < start_fit
    q0, q1 = copy.deepcopy(policy), copy.deepcopy(policy)
    quantize_(q0, before)
    quantize_(q1, tuned)
    for n in plan.bits:  # the same bits and codes: only scales and biases moved
        assert torch.equal(tuned.bits[n], before.bits[n])
        assert torch.equal(q1.model.get_submodule(n).payload["codes"], q0.model.get_submodule(n).payload["codes"])
    assert policy.model[5].weight.requires_grad, "the full-precision policy is left as it was"


def test_no_epoch_better_than_the_start_leaves_the_plan_as_it_was(make_toy, toy_obs):
    policy = make_toy()
    plan = METHODS["rtn"](policy, QuantConfig(method="rtn", w_bits=4), None, {})
    tuned = AT.tune_to_actions(policy, copy.deepcopy(plan), toy_obs, "action", episodes=EPISODES, epochs=2, lr=0.0)
    assert tuned.provenance["action_tuning"]["best_epoch"] == 0
    fit, held = AT.split_steps(EPISODES)
    for idx in (fit, held):
        assert _deviation(policy, tuned, toy_obs, idx) == pytest.approx(_deviation(policy, plan, toy_obs, idx), rel=1e-5)


def test_the_suffix_parses():
    cfg = QuantConfig(method="qvla-gptq+lc+at", w_bits=4)
    assert cfg.method == "qvla-gptq" and cfg.action_tune and cfg.layer_calibrate
