"""Demonstrations: what write_demos stores is exactly what the expert saw and did, and reads back unchanged."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qvla.demos import FORMAT, read_demos, read_manifest, record_expert, write_demos
from qvla.envs import EpisodeSpec


def test_manifest_fields(demo_dir, demo_tasks):
    m = read_manifest(demo_dir)
    assert m["format"] == FORMAT
    assert (m["suite"], m["image_size"], m["per_task"], m["seed"]) == ("mt10", 96, 1, 0)
    assert m["cameras"] == ["third", "wrist"]
    assert m["attempted"] == len(demo_tasks) and m["dropped"] == []
    assert [e["task"] for e in m["episodes"]] == demo_tasks
    for e in m["episodes"]:
        assert e["id"] == EpisodeSpec("mt10", e["task"], "train", 0, 0).id
        assert e["file"] == f"episodes/{e['task']}-0000.npz" and (demo_dir / e["file"]).is_file()
        assert 0 < e["steps"] < 150


def test_round_trip_matches_a_fresh_expert_recording(demo_dir, demo_tasks, env):
    """The worker process wrote the files; replaying the same spec here must give the same arrays."""
    manifest, episodes = read_demos(demo_dir)
    assert len(episodes) == len(demo_tasks)
    for entry, ep in zip(manifest["episodes"], episodes):
        T = entry["steps"]
        assert set(ep.images) == {"third", "wrist"}
        for img in ep.images.values():
            assert img.shape == (T, 96, 96, 3) and img.dtype == np.uint8
        assert ep.proprio.shape == (T, 4) and ep.proprio.dtype == np.float32
        assert ep.actions.shape == (T, 4) and ep.actions.dtype == np.float32
        assert np.all(np.abs(ep.actions) <= 1.0)
        ref, success = record_expert(env, EpisodeSpec("mt10", ep.task, "train", 0, 0))
        assert success
        assert (ep.id, ep.instruction) == (ref.id, ref.instruction)
        np.testing.assert_array_equal(ep.proprio, ref.proprio)
        np.testing.assert_array_equal(ep.actions, ref.actions)
        np.testing.assert_array_equal(ep.state, ref.state)
        assert ep.state.shape == (T, 9) and ep.state.dtype == np.float32
        np.testing.assert_allclose(ep.state[:, :3], ep.proprio[:, :3], atol=1e-6)  # the hand is the hand
        for cam in ep.images:
            np.testing.assert_array_equal(ep.images[cam], ref.images[cam])


def test_frame_t_is_the_observation_before_action_t(demo_dir, env):
    _, episodes = read_demos(demo_dir)
    ep = episodes[0]
    env.reset(EpisodeSpec("mt10", ep.task, "train", 0, 0))
    np.testing.assert_array_equal(env.observe().proprio, ep.proprio[0])
    env.step(ep.actions[0])
    np.testing.assert_array_equal(env.observe().proprio, ep.proprio[1])


def test_refuses_non_empty_directory_and_leaves_it_untouched(tmp_path):
    out = tmp_path / "demos"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_demos("mt10", 1, out, tasks=["reach"], workers=1)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demos"]  # no temp directory left behind


def test_read_refuses_non_demo_directories(tmp_path):
    with pytest.raises(FileNotFoundError, match="manifest.json"):
        read_demos(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/1"}))
    with pytest.raises(ValueError, match="format"):
        read_demos(tmp_path)


def test_parse_per_task():
    from qvla.demos import parse_per_task

    tasks = ["reach", "push", "door-open"]
    assert parse_per_task("40", tasks) == 40
    assert parse_per_task("40,reach=200", tasks) == {"reach": 200, "push": 40, "door-open": 40}
    with pytest.raises(KeyError, match="unknown task\\(s\\) \\['fly'\\]"):
        parse_per_task("40,fly=2", tasks)
    with pytest.raises(ValueError, match="expected N or N,TASK=N"):
        parse_per_task("40,reach", tasks)


def test_add_states_replays_the_recorded_states(demo_dir, tmp_path, strip_states):
    from qvla.demos import add_states

    old = strip_states(demo_dir, tmp_path / "old")
    assert all(ep.state is None for ep in read_demos(old)[1])
    assert add_states(old) == 2
    for a, b in zip(read_demos(old)[1], read_demos(demo_dir)[1]):
        np.testing.assert_array_equal(a.state, b.state)
        np.testing.assert_array_equal(a.images["third"], b.images["third"])
    assert add_states(old) == 0  # nothing left to add
    assert sorted(p.name for p in (old / "episodes").iterdir()) == sorted(
        p.name for p in (demo_dir / "episodes").iterdir())  # no temporary file left behind


def test_add_states_refuses_actions_that_leave_the_recorded_trajectory(demo_dir, tmp_path, strip_states):
    from qvla.demos import add_states

    old = strip_states(demo_dir, tmp_path / "old")
    f = sorted((old / "episodes").iterdir())[0]
    with np.load(f, allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["actions"][5:] = -arrays["actions"][5:]
    np.savez(f, **arrays)
    with pytest.raises(ValueError, match="left the recorded hand trajectory"):
        add_states(old)
