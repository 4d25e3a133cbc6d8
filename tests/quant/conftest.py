"""A toy policy for the quantization tests: a conv + MLP small enough for brute-force Jacobians.

It has exactly the interface that sensitivity, the methods and quantize_ use (.model, .name,
.module_roles(), .batch(), .teacher_ids(), .action_outputs(), .output_forms()), so every test on it
runs in milliseconds; the real micro-VLA is only used where a checkpoint on disk matters.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

IMAGE = 5  # pixels per side of the toy "image" (3 channels)
ROLES = {"0": "vision", "3": "llm", "5": "action_head"}  # the three quantizable layers


def toy_model(hidden: int = 16, out: int = 6, seed: int = 0) -> nn.Sequential:
    with torch.random.fork_rng():  # a fixed model without touching the global generator
        torch.manual_seed(seed)
        return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Flatten(),
                             nn.Linear(4 * IMAGE * IMAGE, hidden), nn.Tanh(), nn.Linear(hidden, out))


class ToyPolicy:
    """Continuous outputs (B, out) when bins == 0, else action-bin logits (B, out // bins, bins)."""

    def __init__(self, model: nn.Module, bins: int = 0, name: str = "toy") -> None:
        self.model, self.bins, self.name = model.eval(), bins, name

    def module_roles(self) -> dict[str, str]:
        return {n: ROLES.get(n, "llm") for n, m in self.model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}

    def batch(self, observations: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"images": torch.stack(observations)}

    def teacher_ids(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return batch

    def quant_blocks(self) -> list[str]:
        return []  # flat: a block-wise method trains every layer on its own

    def output_forms(self) -> tuple[str, ...]:
        return ("logits",) if self.bins else ("action",)

    def action_outputs(self, batch: dict[str, torch.Tensor], form: str) -> torch.Tensor:
        y = self.model(batch["images"])
        return y.view(y.shape[0], -1, self.bins) if form == "logits" else y


def toy_observations(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return list(torch.randn(n, 3, IMAGE, IMAGE, generator=g))


@pytest.fixture
def make_toy():
    """-> function(hidden=16, out=6, bins=0, seed=0) building a fresh ToyPolicy."""
    def make(hidden: int = 16, out: int = 6, bins: int = 0, seed: int = 0) -> ToyPolicy:
        return ToyPolicy(toy_model(hidden, out, seed), bins)
    return make


@pytest.fixture
def toy_obs() -> list[torch.Tensor]:
    return toy_observations(24)


@pytest.fixture
def random_observation():
    """observation(seed): a random micro-VLA observation (images, proprio, an instruction)."""
    import numpy as np

    from qvla.envs import Observation

    def make(seed: int = 0) -> Observation:
        rng = np.random.default_rng(seed)
        images = {c: rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for c in ("third", "wrist")}
        return Observation(images, rng.uniform(-0.5, 0.5, 4).astype(np.float32),
                           "move the gripper to the red ball", "reach")

    return make
