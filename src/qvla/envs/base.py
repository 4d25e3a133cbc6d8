"""What a suite promises: fixed episode lists, observations, and one `SuiteEnv` per worker."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

SPLITS = ("train", "calib", "eval")  # demonstrations, calibration, evaluation: disjoint by construction


@dataclass(frozen=True)
class EpisodeSpec:
    """One reproducible episode: the same spec always gives a bit-identical rollout."""

    suite: str
    task: str
    split: str  # one of SPLITS
    index: int  # position in the task's list for this split
    seed: int  # the suite seed (`--seed S`): shifts every list to a different fixed set

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r} is not one of {SPLITS}")
        if self.index < 0:
            raise ValueError(f"episode index must be >= 0, got {self.index}")

    @property
    def id(self) -> str:
        return f"{self.suite}/{self.task}/{self.split}/s{self.seed}/{self.index}"


@dataclass
class Observation:
    """What a policy may see. Object and goal positions are deliberately absent: they come from vision."""

    images: dict[str, np.ndarray]  # camera name -> (H, W, 3) uint8, upright
    proprio: np.ndarray  # (4,) float32: end-effector xyz (m) and gripper opening
    instruction: str
    task: str
    extras: dict = field(default_factory=dict)


class SuiteEnv(Protocol):
    """One simulator instance that can play any episode of its suite."""

    def reset(self, spec: EpisodeSpec) -> None: ...
    def observe(self) -> Observation: ...
    def step(self, action: np.ndarray) -> bool: ...  # returns success so far
    def expert_action(self) -> np.ndarray: ...
    def close(self) -> None: ...
