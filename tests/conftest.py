"""Small shared fixtures: one MT10 env, one real observation, a tiny demo set, a random-init checkpoint.

Everything expensive is session-scoped so the suite builds each Meta-World scene and writes demos once.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from qvla.checkpoint import save_checkpoint
from qvla.envs import EpisodeSpec, Observation, Suite, get_suite

DEMO_TASKS = ["reach", "drawer-close"]  # the two shortest expert episodes (about 35 and 80 steps)


@pytest.fixture(autouse=True)
def _seeded_torch():
    """Each test starts from the same global RNG state, so its outcome does not depend on which tests ran first."""
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def suite() -> Suite:
    return get_suite("mt10")


@pytest.fixture(scope="session")
def env(suite):
    """One env for the whole session; scenes are created lazily, so tests only pay for the tasks they use."""
    e = suite.make_env()
    yield e
    e.close()


@pytest.fixture(scope="session")
def reach_obs(env) -> Observation:
    env.reset(EpisodeSpec("mt10", "reach", "eval", 0, 0))
    return env.observe()


@pytest.fixture(scope="session")
def demo_tasks() -> list[str]:
    return list(DEMO_TASKS)


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory) -> Path:
    from qvla.demos import write_demos

    out = tmp_path_factory.mktemp("demos") / "mt10"
    write_demos("mt10", 1, out, tasks=DEMO_TASKS, workers=1)
    return out


@pytest.fixture
def strip_states():
    """copy(src, dst): a copy of a demo directory as written before demos recorded states."""
    import shutil

    import numpy as np

    def copy(src: Path, dst: Path) -> Path:
        shutil.copytree(src, dst)
        for f in (dst / "episodes").iterdir():
            with np.load(f, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files if k != "state"}
            np.savez(f, **arrays)
        return dst
    return copy


def _save_random(name: str, out: Path, seed: int = 0) -> Path:
    from qvla.policies import build_policy
    from qvla.policies.microvla.model import init_weights

    policy = build_policy(name)
    init_weights(policy.model, seed)
    meta = {"family": "microvla", "policy": name, "config": policy.config.to_dict()}
    return save_checkpoint(out, meta, policy.model.state_dict())


@pytest.fixture
def save_random_checkpoint():
    """-> function(policy_name, out_dir, seed=0) that saves a random-init checkpoint and returns its dir."""
    return _save_random


@pytest.fixture(scope="session")
def chunk_ckpt(tmp_path_factory) -> Path:
    """A random-init microvla-chunk checkpoint: the cheapest policy to run in closed loop."""
    return _save_random("microvla-chunk", tmp_path_factory.mktemp("ckpt") / "microvla-chunk")


@pytest.fixture(autouse=True, scope="session")
def _few_threads():
    # The suite must stay light on a 2-core machine; results do not depend on this for a fixed value.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
