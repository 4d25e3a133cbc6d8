"""Training is a pure function of (config, demos): same seed, same weights; resuming changes nothing."""
from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import qvla.train as train_mod
from qvla.checkpoint import CONFIG, WEIGHTS, sha256
from qvla.policies import POLICIES, load_policy
from qvla.train import TrainConfig, random_shift, train

TINY = dict(steps=3, batch_size=4, threads=1, warmup=2)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_same_seed_same_weights(tmp_path, demo_dir, name):
    cfg = TrainConfig(policy=name, seed=0, **TINY)
    a, b = train(cfg, demo_dir, tmp_path / "a"), train(cfg, demo_dir, tmp_path / "b")
    assert sha256(a / WEIGHTS) == sha256(b / WEIGHTS)
    c = train(TrainConfig(policy=name, seed=1, **TINY), demo_dir, tmp_path / "c")
    assert sha256(c / WEIGHTS) != sha256(a / WEIGHTS)
    meta = json.loads((a / CONFIG).read_text())
    assert meta["policy"] == name and meta["training"]["steps"] == 3
    assert meta["training"]["demo_episodes"] == 2 and np.isfinite(meta["training"]["final_loss_ema"])
    load_policy(a)  # the result is a loadable checkpoint


class Interrupted(Exception):
    pass


def interrupt_after_first_resume_save(monkeypatch) -> None:
    """Simulates a crash right after the first resumable state was written."""
    real_save = train_mod._save_resume

    def save_then_die(*args, **kwargs):
        real_save(*args, **kwargs)
        raise Interrupted

    monkeypatch.setattr(train_mod, "_save_resume", save_then_die)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_resumed_run_matches_uninterrupted(tmp_path, demo_dir, monkeypatch, caplog, name):
    cfg = TrainConfig(policy=name, **{**TINY, "steps": 4}, save_every=2, seed=5)
    full = train(cfg, demo_dir, tmp_path / "full")
    assert not (full / "resume").exists()  # the final save replaces the resume state

    interrupt_after_first_resume_save(monkeypatch)
    with pytest.raises(Interrupted):
        train(cfg, demo_dir, tmp_path / "cut")
    state = json.loads((tmp_path / "cut" / "resume" / "train_state.json").read_text())
    assert state["step"] == 2
    monkeypatch.undo()

    with caplog.at_level(logging.INFO, logger="qvla.train"):
        resumed = train(cfg, demo_dir, tmp_path / "cut")
    assert "resuming" in caplog.text
    assert sha256(resumed / WEIGHTS) == sha256(full / WEIGHTS)


def test_resume_with_another_config_is_refused(tmp_path, demo_dir, monkeypatch):
    cfg = TrainConfig(policy="microvla-token", steps=4, save_every=2, batch_size=2, threads=1)
    interrupt_after_first_resume_save(monkeypatch)
    with pytest.raises(Interrupted):
        train(cfg, demo_dir, tmp_path / "run")
    monkeypatch.undo()
    with pytest.raises(ValueError, match="different config"):
        train(TrainConfig(policy="microvla-token", steps=5, save_every=2, batch_size=2, threads=1),
              demo_dir, tmp_path / "run")


@pytest.mark.parametrize("bad, error", [(dict(policy="nope"), KeyError), (dict(steps=0), ValueError),
                                        (dict(batch_size=0), ValueError), (dict(save_every=0), ValueError)])
def test_config_validation(bad, error):
    with pytest.raises(error, match="registered policies|must be >= 1"):
        TrainConfig(**bad)


def test_random_shift_is_a_crop_of_the_edge_padded_image():
    g = torch.Generator().manual_seed(0)
    imgs = torch.randint(0, 256, (3, 2, 3, 16, 16), dtype=torch.uint8)
    out = random_shift(imgs, 2, g)
    assert out.shape == imgs.shape and out.dtype == torch.uint8
    padded = F.pad(imgs.flatten(0, 1).float(), (2,) * 4, mode="replicate").to(torch.uint8)
    offsets = []
    for i, img in enumerate(out.flatten(0, 1)):
        hits = [(a, b) for a in range(5) for b in range(5) if torch.equal(padded[i, :, a:a + 16, b:b + 16], img)]
        assert hits, f"image {i} is not a shifted copy"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # shifts vary across the batch
    assert torch.equal(random_shift(imgs, 0, g), imgs)
