"""Closed-loop evaluation: rollout semantics, honest error records, and worker-count independence."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from qvla.checkpoint import WEIGHTS, sha256
from qvla.demos import record_expert
from qvla.envs import EpisodeSpec
from qvla.envs.metaworld import MT10_TASKS
from qvla.evaluate import evaluate, format_table, rollout, safe_rollout, summarize
from qvla.policies import load_policy

REACH = EpisodeSpec("mt10", "reach", "eval", 0, 0)
META = {"policy": "toy", "suite": "mt10", "seed": 0}


class ExpertPolicy:
    """Plays the scripted expert through the policy API: one action per call."""

    name = "expert"

    def __init__(self, env) -> None:
        self.env = env

    def reset(self) -> None:
        pass

    def act(self, obs):
        return self.env.expert_action()[None]


class ConstantPolicy:
    name = "constant"

    def __init__(self, chunk: int) -> None:
        self.chunk = chunk

    def reset(self) -> None:
        pass

    def act(self, obs):
        return np.zeros((self.chunk, 4), dtype=np.float32)


class CrashesOnSecondCall(ConstantPolicy):
    def reset(self) -> None:
        self.calls = 0

    def act(self, obs):
        self.calls += 1
        if self.calls == 2:
            raise RuntimeError("policy blew up")
        return super().act(obs)


def test_expert_policy_succeeds_in_as_many_steps_as_its_demo(env):
    rec = rollout(ExpertPolicy(env), env, REACH)
    demo, ok = record_expert(env, REACH)
    assert ok and rec["success"] is True
    assert rec["steps"] == len(demo.actions) < MT10_TASKS["reach"].max_steps
    assert rec["policy_calls"] == rec["steps"] == len(rec["act_ms"])
    assert rec["id"] == REACH.id and rec["task"] == "reach"


def test_chunks_run_open_loop_until_max_steps(env):
    seen = []
    rec = rollout(ConstantPolicy(4), env, REACH, observer=lambda spec, t, obs: seen.append(t))
    max_steps = MT10_TASKS["reach"].max_steps
    assert rec["success"] is False and rec["steps"] == max_steps
    assert rec["policy_calls"] == math.ceil(max_steps / 4) == len(seen)
    assert seen == list(range(0, max_steps, 4))  # one observation per chunk, not per step


def test_crash_is_recorded_not_counted(env):
    rec = safe_rollout(CrashesOnSecondCall(4), env, EpisodeSpec("mt10", "drawer-close", "eval", 0, 0))
    assert rec["success"] is None
    assert rec["error"] == "RuntimeError: policy blew up"
    assert "Traceback" in rec["traceback"] and "in act" in rec["traceback"]
    good = [{"id": "r0", "task": "reach", "success": True, "steps": 40, "policy_calls": 10, "act_ms": [1.0, 3.0]},
            {"id": "r1", "task": "reach", "success": False, "steps": 150, "policy_calls": 38, "act_ms": [2.0]}]
    s = summarize(good + [rec], META)
    assert s["success_rate"] == 0.5  # 1 of the 2 evaluated; the crash would make it 1/3 if counted as a failure
    assert s["per_task"] == {"reach": 0.5, "drawer-close": None}
    assert (s["episodes"], s["evaluated"], s["successes"]) == (3, 2, 1)
    assert [e["id"] for e in s["errors"]] == [rec["id"]] and "policy blew up" in s["errors"][0]["traceback"]
    assert s["control_step_ms_median"] == 2.0 and s["mean_steps"] == 95.0


def test_table_of_a_run_where_every_episode_crashed(env):
    rec = safe_rollout(CrashesOnSecondCall(4), env, REACH)
    s = summarize([rec], META)
    assert s["success_rate"] is None and s["control_step_ms_median"] is None
    table = format_table({"toy": s})
    assert "| reach | error |" in table and "1 (1)" in table


@pytest.fixture(scope="module")
def runs(chunk_ckpt, tmp_path_factory):
    """The same two episodes evaluated with 1 and with 2 worker processes."""
    d = tmp_path_factory.mktemp("eval")
    tasks = ["reach", "drawer-close"]
    one = evaluate(str(chunk_ckpt), "mt10", 1, tasks=tasks, workers=1, out=d / "w1.json")
    two = evaluate(str(chunk_ckpt), "mt10", 1, tasks=tasks, workers=2, out=d / "w2.json")
    return d, one, two


def test_summary_and_records_are_written(runs, chunk_ckpt):
    d, s, _ = runs
    assert json.loads((d / "w1.json").read_text()) == s
    assert 0.0 <= s["success_rate"] <= 1.0
    assert list(s["per_task"]) == ["reach", "drawer-close"]
    assert all(0.0 <= v <= 1.0 for v in s["per_task"].values())
    assert (s["episodes"], s["evaluated"], s["errors"]) == (2, 2, [])
    assert (s["policy"], s["suite"], s["seed"], s["split"]) == ("microvla-chunk", "mt10", 0, "eval")
    assert s["checkpoint"] == str(chunk_ckpt)
    assert s["quantization"] is None  # a full-precision checkpoint
    assert s["cpu"].endswith(f"({torch.backends.cpu.get_cpu_capability()})")  # the CPU it ran on, and its ISA
    assert s["control_step_ms_median"] > 0
    records = [json.loads(line) for line in (d / "w1.jsonl").read_text().splitlines()]
    tasks = ("reach", "drawer-close")
    assert [r["id"] for r in records] == [EpisodeSpec("mt10", t, "eval", 0, 0).id for t in tasks]
    chunk = load_policy(chunk_ckpt).config.chunk
    for r in records:
        assert 0 < r["steps"] <= MT10_TASKS[r["task"]].max_steps
        assert r["policy_calls"] == len(r["act_ms"]) == math.ceil(r["steps"] / chunk)
    assert not list(d.glob("*.tmp"))


def test_worker_count_does_not_change_records(runs):
    d = runs[0]
    strip = lambda r: {k: v for k, v in r.items() if k != "act_ms"}  # noqa: E731 (timing is the only difference)
    one = [strip(json.loads(x)) for x in (d / "w1.jsonl").read_text().splitlines()]
    two = [strip(json.loads(x)) for x in (d / "w2.jsonl").read_text().splitlines()]
    assert one == two and len(one) == 2
    assert runs[2]["per_task"] == runs[1]["per_task"] and runs[2]["workers"] == 2


def test_random_policy_rollout_is_reproducible(env, chunk_ckpt):
    policy = load_policy(chunk_ckpt)
    trajectories = []
    for _ in range(2):
        seen = []
        rec = rollout(policy, env, REACH, observer=lambda spec, t, obs: seen.append(obs.proprio.copy()))
        trajectories.append((rec["steps"], np.stack(seen)))
    assert trajectories[0][0] == trajectories[1][0]
    np.testing.assert_array_equal(trajectories[0][1], trajectories[1][1])
    assert np.ptp(trajectories[0][1][:, :3], axis=0).max() > 0.01  # the policy really moved the arm


def test_bad_worker_count_is_refused(chunk_ckpt):
    with pytest.raises(ValueError, match="workers"):
        evaluate(str(chunk_ckpt), "mt10", 1, workers=0)


def test_the_summary_of_a_quantized_checkpoint_records_its_quantization(chunk_ckpt, tmp_path):
    from qvla.quant.methods import QuantConfig
    from qvla.quant.pipeline import quantize

    q = quantize(str(chunk_ckpt), QuantConfig(method="rtn", w_bits=4), None, tmp_path / "q")
    s = evaluate(str(q), "mt10", 1, tasks=("reach",), workers=1)
    assert s["quantization"]["method"] == "rtn" and s["quantization"]["w_bits"] == 4
    assert s["quantization"]["average_bits"] == pytest.approx(4.0, abs=0.05)
    assert s["quantization"]["source_weights_sha256"] == sha256(chunk_ckpt / WEIGHTS)
