"""Suite registry: a suite is a task table plus an env factory. Add a suite with one line in SUITES."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from qvla.envs.base import SPLITS, EpisodeSpec, Observation, SuiteEnv


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: dict  # task name -> TaskSpec (instruction, max_steps, ...)
    make_env: Callable[..., SuiteEnv]

    def episodes(self, split: str, per_task: int | dict[str, int], seed: int = 0,
                 tasks: list[str] | None = None) -> list[EpisodeSpec]:
        """The first `per_task` episodes of `split` for each task; a dict gives each task its own count
        (tasks it leaves out get none). Episode i of a task is the same whatever the count."""
        if tasks is not None and not tasks:
            raise ValueError(f"an empty task list selects no episodes; name tasks of {self.name!r} or give none (all)")
        counts = per_task if isinstance(per_task, dict) else {t: per_task for t in (tasks or self.tasks)}
        tasks = list(counts) if tasks is None else tasks
        for t in tasks:
            if t not in self.tasks:
                raise KeyError(f"unknown task {t!r} for suite {self.name!r}; tasks: {list(self.tasks)}")
            if counts.get(t, 0) <= 0:
                raise ValueError(f"episodes per task must be a positive integer, got {counts.get(t, 0)} for {t!r}")
        return [EpisodeSpec(self.name, t, split, i, seed) for t in tasks for i in range(counts[t])]


def _mt10() -> Suite:
    from qvla.envs.metaworld import MT10_TASKS, MetaWorldEnv

    return Suite("mt10", MT10_TASKS, lambda **kw: MetaWorldEnv("mt10", MT10_TASKS, **kw))


SUITES: dict[str, Callable[[], Suite]] = {"mt10": _mt10}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise KeyError(f"unknown suite {name!r}; available suites: {sorted(SUITES)}")
    return SUITES[name]()


__all__ = ["SPLITS", "SUITES", "EpisodeSpec", "Observation", "Suite", "SuiteEnv", "get_suite"]
