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


@pytest.mark.parametrize("name, aux", [(n, 0.0) for n in sorted(POLICIES)] + [("microvla-token", 1.0)])
def test_resumed_run_matches_uninterrupted(tmp_path, demo_dir, monkeypatch, caplog, name, aux):
    cfg = TrainConfig(policy=name, **{**TINY, "steps": 4}, save_every=2, seed=5, aux_state=aux)
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
                                        (dict(batch_size=0), ValueError), (dict(save_every=0), ValueError),
                                        (dict(shift=-1), ValueError)])
def test_config_validation(bad, error):
    with pytest.raises(error, match="registered policies|must be >= 1|must be >= 0 pixels"):
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


def test_aux_state_loss_trains_a_head_that_is_not_shipped(tmp_path, demo_dir):
    base = dict(policy="microvla-chunk", seed=0, **TINY)
    plain = train(TrainConfig(**base), demo_dir, tmp_path / "plain")
    aux = train(TrainConfig(**base, aux_state=0.5), demo_dir, tmp_path / "aux")
    assert sha256(aux / WEIGHTS) != sha256(plain / WEIGHTS)  # the extra loss changed the policy's weights
    from safetensors.torch import load_file

    assert set(load_file(aux / WEIGHTS)) == set(load_file(plain / WEIGHTS))  # but added none to it
    meta = json.loads((aux / CONFIG).read_text())["training"]
    assert meta["aux_state"] == 0.5 and np.isfinite(meta["final_aux_loss_ema"])
    load_policy(aux)


def test_aux_state_head_reads_the_action_positions(demo_dir):
    """The head sees exactly the decoder outputs the actions are read from: the K query outputs (chunk), or
    the last prefix position, which predicts the first action token (token: no teacher-forced action seen)."""
    from qvla.policies import build_policy

    for name in sorted(POLICIES):
        policy = build_policy(name)
        model, c = policy.model, policy.config
        store: dict = {}
        hook = model.llm.register_forward_hook(train_mod.action_positions_output(model, store))
        data = train_mod.DemoTensors(demo_dir, c.cameras, c.chunk, lambda s: policy.tokenizer.encode(s, c.text_len),
                                     state=True)
        idx = torch.arange(3)
        with torch.no_grad():
            if c.head == "chunk":
                pred = model.forward_chunk(data.images[idx], data.text[idx], data.proprio[idx])
                torch.testing.assert_close(model.action_head(store["hidden"]), pred)
            else:
                ids = model.action_token_ids(data.actions[idx].flatten(1))
                logits = model.forward_token_logits(data.images[idx], data.text[idx], data.proprio[idx], ids)
                assert store["hidden"].shape[1] == 1
                torch.testing.assert_close(model.lm_head(store["hidden"])[..., c.text_vocab:], logits[:, :1])
        hook.remove()
        assert data.state.shape == (len(data), 12)


def test_aux_state_needs_demo_states(tmp_path, demo_dir, strip_states):
    old = strip_states(demo_dir, tmp_path / "old")
    with pytest.raises(ValueError, match="qvla demos --add-state"):
        train(TrainConfig(policy="microvla-chunk", aux_state=1.0, **TINY), old, tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ValueError, match="aux_state must be >= 0"):
        TrainConfig(aux_state=-1)
