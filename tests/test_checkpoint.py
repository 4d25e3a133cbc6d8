"""Checkpoints: a saved policy loads back identical; a missing, corrupted or mismatched one is refused."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qvla.checkpoint import CONFIG, WEIGHTS, load_checkpoint, save_checkpoint, sha256
from qvla.policies import POLICIES, build_policy, load_policy
from qvla.policies.microvla.model import init_weights


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_save_load_gives_the_same_actions(tmp_path, reach_obs, name):
    policy = build_policy(name)
    init_weights(policy.model, 3)
    meta = {"family": "microvla", "policy": name, "config": policy.config.to_dict()}
    save_checkpoint(tmp_path / "ckpt", meta, policy.model.state_dict())
    loaded = load_policy(tmp_path / "ckpt")
    assert loaded.name == name and loaded.config == policy.config
    np.testing.assert_array_equal(loaded.act(reach_obs), policy.act(reach_obs))
    fresh = build_policy(name)  # guards against a load that silently kept the fresh init
    assert not np.array_equal(fresh.act(reach_obs), policy.act(reach_obs))


def test_config_records_checksums_and_no_temp_dirs(tmp_path, save_random_checkpoint):
    ckpt = save_random_checkpoint("microvla-token", tmp_path / "ckpt")
    meta = json.loads((ckpt / CONFIG).read_text())
    assert meta["files"] == {WEIGHTS: sha256(ckpt / WEIGHTS)}
    save_random_checkpoint("microvla-token", ckpt, seed=1)  # overwriting replaces the directory atomically
    assert json.loads((ckpt / CONFIG).read_text())["files"] != meta["files"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


def test_missing_weights_are_refused(tmp_path, save_random_checkpoint):
    ckpt = save_random_checkpoint("microvla-token", tmp_path / "ckpt")
    (ckpt / WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match=WEIGHTS):
        load_policy(ckpt)


def test_tampered_weights_fail_the_checksum(tmp_path, save_random_checkpoint):
    ckpt = save_random_checkpoint("microvla-token", tmp_path / "ckpt")
    data = bytearray((ckpt / WEIGHTS).read_bytes())
    data[-100] ^= 0x01  # one bit inside the last tensor's data: safetensors itself would still load it
    (ckpt / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"checksum mismatch for {WEIGHTS}"):
        load_policy(ckpt)
    _, tensors = load_checkpoint(ckpt, verify=False)  # the file is still readable: only the checksum caught it
    assert tensors


def test_config_with_other_shapes_is_refused(tmp_path, save_random_checkpoint):
    ckpt = save_random_checkpoint("microvla-token", tmp_path / "ckpt")
    meta = json.loads((ckpt / CONFIG).read_text())
    meta["config"]["llm_dim"] = 64  # valid on its own (4 heads of 16), but not the shape of the saved tensors
    (ckpt / CONFIG).write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not match the model") as e:
        load_policy(ckpt)
    assert "shape mismatches" in str(e.value) and "(128" in str(e.value)


def test_unknown_config_key_and_family_are_refused(tmp_path, save_random_checkpoint):
    ckpt = save_random_checkpoint("microvla-token", tmp_path / "ckpt")
    meta = json.loads((ckpt / CONFIG).read_text())
    (ckpt / CONFIG).write_text(json.dumps({**meta, "config": {**meta["config"], "dropout": 0.1}}))
    with pytest.raises(ValueError, match="dropout"):
        load_policy(ckpt)
    (ckpt / CONFIG).write_text(json.dumps({**meta, "family": "openvla"}))
    with pytest.raises(ValueError, match="openvla"):
        load_policy(ckpt)
    (ckpt / CONFIG).write_text(json.dumps({**meta, "format": "qvla-checkpoint/0"}))
    with pytest.raises(ValueError, match="format"):
        load_policy(ckpt)


def test_unknown_policy_name_lists_registered(tmp_path):
    with pytest.raises(KeyError, match="microvla-chunk"):
        load_policy("no-such-policy")
    with pytest.raises(KeyError, match="microvla-token"):
        load_policy(tmp_path / "missing-dir")
