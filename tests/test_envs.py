"""The MT10 suite: fixed, disjoint episode lists and bit-identical replays."""
from __future__ import annotations

import numpy as np
import pytest

from qvla.envs import SPLITS, EpisodeSpec, get_suite
from qvla.envs.metaworld import MT10_TASKS, layout

TASKS = list(MT10_TASKS)
REPLAY_STEPS = 15


def play(env, spec: EpisodeSpec, steps: int = REPLAY_STEPS) -> list:
    """Resets to `spec`, then follows the expert for `steps` steps; -> [(proprio, images)] per frame."""
    env.reset(spec)
    frames = []
    for _ in range(steps):
        obs = env.observe()
        frames.append((obs.proprio, obs.images))
        env.step(env.expert_action())
    obs = env.observe()
    return frames + [(obs.proprio, obs.images)]


@pytest.mark.parametrize("task", TASKS)
def test_replay_is_bit_identical(env, task):
    spec = EpisodeSpec("mt10", task, "eval", 0, 0)
    first = play(env, spec)
    play(env, EpisodeSpec("mt10", task, "train", 1, 0), steps=3)  # a different episode in between
    second = play(env, spec)
    for (p1, im1), (p2, im2) in zip(first, second, strict=True):
        np.testing.assert_array_equal(p1, p2)
        assert im1.keys() == im2.keys() == {"third", "wrist"}
        for cam in im1:
            np.testing.assert_array_equal(im1[cam], im2[cam])
    # the arm moved, so the replay compared more than a static scene
    assert not np.array_equal(first[0][0], first[-1][0])


@pytest.mark.parametrize("task", TASKS)
def test_observation_format(env, task):
    env.reset(EpisodeSpec("mt10", task, "eval", 0, 0))
    obs = env.observe()
    for cam, img in obs.images.items():
        assert img.shape == (96, 96, 3) and img.dtype == np.uint8, cam
        assert img.std() > 1.0, f"{cam} image is blank"
    assert obs.proprio.shape == (4,) and obs.proprio.dtype == np.float32
    assert np.all(np.isfinite(obs.proprio))
    assert obs.task == task and obs.instruction == MT10_TASKS[task].instruction


def test_privileged_state_is_the_scene_the_policy_sees(env):
    env.reset(EpisodeSpec("mt10", "push", "eval", 0, 0))
    s = env.privileged_state()
    np.testing.assert_allclose(s["hand"], env.observe().proprio[:3], atol=1e-6)  # proprio = hand xyz + gripper
    assert np.linalg.norm(s["object"][:2] - s["goal"][:2]) >= MT10_TASKS["push"].min_separation
    s["hand"][:] = 0  # a copy: the env's state is untouched
    assert np.linalg.norm(env.privileged_state()["hand"]) > 0


@pytest.mark.parametrize("task", TASKS)
def test_layouts_differ_by_split_and_seed(env, task):
    space = env._scene(task)._random_reset_space  # the task's own reset ranges
    sep = MT10_TASKS[task].min_separation
    specs = [EpisodeSpec("mt10", task, s, 0, 0) for s in SPLITS] + [
        EpisodeSpec("mt10", task, "eval", 0, 1), EpisodeSpec("mt10", task, "eval", 1, 0)]
    vecs = [layout(s, space.low, space.high, sep) for s in specs]
    for i in range(len(vecs)):
        for j in range(i + 1, len(vecs)):
            assert not np.allclose(vecs[i], vecs[j]), (specs[i].id, specs[j].id)
    for s, v in zip(specs, vecs):
        assert np.all(v >= space.low) and np.all(v <= space.high)
        if sep > 0:
            assert np.linalg.norm(v[0:2] - v[3:5]) >= sep
        np.testing.assert_array_equal(v, layout(s, space.low, space.high, sep))  # pure function of the spec
    # the layout reaches the scene: two splits of the same index look different
    images = []
    for s in specs[:2]:
        env.reset(s)
        images.append(env.observe().images["third"])
    assert not np.array_equal(*images)


def test_episode_lists_are_disjoint_and_fixed(suite):
    ids = {s: [e.id for e in suite.episodes(s, 3)] for s in SPLITS}
    assert all(len(v) == 3 * len(MT10_TASKS) for v in ids.values())
    assert len(set().union(*ids.values())) == 3 * 3 * len(MT10_TASKS)
    assert [e.id for e in suite.episodes("eval", 3)] == ids["eval"]
    assert set(e.id for e in suite.episodes("eval", 3, seed=1)).isdisjoint(ids["eval"])


def test_unknown_names_raise_key_error_listing_allowed(suite, env):
    with pytest.raises(KeyError, match="mt10"):
        get_suite("libero")
    with pytest.raises(KeyError, match="reach"):
        suite.episodes("eval", 1, tasks=["fly"])
    with pytest.raises(KeyError, match="reach"):
        env.reset(EpisodeSpec("mt10", "fly", "eval", 0, 0))


@pytest.mark.parametrize("per_task", [0, -1])
def test_nonpositive_episode_count_raises(suite, per_task):
    with pytest.raises(ValueError, match="positive"):
        suite.episodes("eval", per_task)


def test_bad_spec_and_action_are_refused(env):
    with pytest.raises(ValueError, match="split"):
        EpisodeSpec("mt10", "reach", "test", 0, 0)
    with pytest.raises(ValueError, match="index"):
        EpisodeSpec("mt10", "reach", "eval", -1, 0)
    env.reset(EpisodeSpec("mt10", "reach", "eval", 0, 0))
    with pytest.raises(ValueError, match="4 finite"):
        env.step(np.zeros(3))
    with pytest.raises(ValueError, match="4 finite"):
        env.step(np.array([0.0, np.nan, 0.0, 0.0]))


def test_observe_before_reset_raises(suite):
    fresh = suite.make_env()
    try:
        with pytest.raises(RuntimeError, match="reset"):
            fresh.observe()
    finally:
        fresh.close()


def test_per_task_counts_extend_the_same_episode_list(suite):
    """A task's own count adds episodes after the common ones; episode i is the same either way."""
    base = suite.episodes("train", 2, tasks=["reach", "push"])
    more = suite.episodes("train", {"reach": 4, "push": 2})
    assert [s.id for s in more if s.task == "push"] == [s.id for s in base if s.task == "push"]
    assert [s.id for s in more if s.task == "reach"][:2] == [s.id for s in base if s.task == "reach"]
    assert len(more) == 6
    with pytest.raises(ValueError, match="positive integer, got 0 for 'push'"):
        suite.episodes("train", {"reach": 1, "push": 0})
