"""Meta-World MT10 as a language-conditioned, vision-only suite.

Episodes are defined by us, not by Meta-World's 50 fixed task variants: an episode's object/goal layout is
drawn from the task's own reset space with a generator seeded by (split, suite seed, task, index). The three
splits therefore never share a layout, and `seed` moves every list to a new, equally fixed set.

Rendering is set up for speed on a CPU (EGL, no shadows, reflections or multisampling). The goal marker
(a site that Meta-World already draws) is enlarged to 3 cm so that goal-conditioned tasks (reach, push,
pick-place) are observable from 96-px images: the policy gets no object or goal coordinates.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

os.environ.setdefault("MUJOCO_GL", "egl")

import mujoco  # noqa: E402
import numpy as np  # noqa: E402

from qvla.envs.base import SPLITS, EpisodeSpec, Observation  # noqa: E402


@dataclass(frozen=True)
class TaskSpec:
    env_name: str  # Meta-World environment id
    instruction: str  # our own one-line instruction (Meta-World has no language)
    max_steps: int  # episode limit for policies; experts need 44-111 steps on MT10
    min_separation: float = 0.0  # metres between the layout's two xy points (Meta-World rejects closer ones)


MT10_TASKS: dict[str, TaskSpec] = {
    "reach": TaskSpec("reach-v3", "move the gripper to the red ball", 150, 0.15),
    "push": TaskSpec("push-v3", "push the puck to the green ball", 200, 0.15),
    "pick-place": TaskSpec("pick-place-v3", "pick up the puck and place it at the blue ball", 200, 0.15),
    "door-open": TaskSpec("door-open-v3", "open the door of the safe", 200),
    "drawer-open": TaskSpec("drawer-open-v3", "pull the drawer open", 150),
    "drawer-close": TaskSpec("drawer-close-v3", "push the drawer closed", 150),
    "button-press-topdown": TaskSpec("button-press-topdown-v3", "press the button from the top", 150),
    "peg-insert-side": TaskSpec("peg-insert-side-v3", "insert the peg into the hole from the side", 200, 0.10),
    "window-open": TaskSpec("window-open-v3", "slide the window open", 150),
    "window-close": TaskSpec("window-close-v3", "slide the window closed", 150),
}

# A free camera aimed at the workspace from the front-right: objects are larger than in Meta-World's
# 'corner' cameras and the arm hides less of the table. 'gripperPOV' is attached to the hand.
THIRD_PERSON = dict(lookat=(0.0, 0.7, 0.1), distance=1.0, azimuth=-60.0, elevation=-35.0)
WRIST_CAMERA = "gripperPOV"
GOAL_MARKER_RADIUS = 0.03  # metres; Meta-World draws 2 cm (1 cm for peg-insert-side)
SPLIT_CODE = {name: i for i, name in enumerate(SPLITS)}


def layout(spec: EpisodeSpec, low: np.ndarray, high: np.ndarray, min_separation: float) -> np.ndarray:
    """The episode's object/goal layout vector, a pure function of the episode spec.

    Meta-World re-draws layouts whose two xy points are closer than `min_separation` inside reset(); with a
    frozen layout that loop never ends, so the same rejection happens here instead.
    """
    task_code = zlib.crc32(spec.task.encode())  # stable across processes, unlike hash()
    rng = np.random.default_rng([SPLIT_CODE[spec.split], spec.seed, task_code, spec.index])
    for _ in range(1000):
        vec = rng.uniform(low, high).astype(np.float64)
        if min_separation <= 0 or np.linalg.norm(vec[0:2] - vec[3:5]) >= min_separation:
            return vec
    raise RuntimeError(f"no layout for {spec.id} after 1000 draws (min_separation={min_separation})")


class MetaWorldEnv:
    """One Meta-World scene per task, created lazily; renders only when asked to observe."""

    def __init__(self, suite: str, tasks: dict[str, TaskSpec], image_size: int = 96,
                 cameras: tuple[str, ...] = ("third", "wrist")) -> None:
        self.suite, self.tasks, self.image_size, self.cameras = suite, tasks, image_size, cameras
        self._envs: dict[str, object] = {}
        self._renderers: dict[str, mujoco.Renderer] = {}
        self._experts: dict[str, object] = {}
        self._task: str | None = None
        self._raw_obs: np.ndarray | None = None
        self._steps = 0
        self._success = False

    def _scene(self, task: str):
        if task not in self.tasks:
            raise KeyError(f"unknown task {task!r} for suite {self.suite!r}; tasks: {sorted(self.tasks)}")
        if task not in self._envs:
            from metaworld.env_dict import ALL_V3_ENVIRONMENTS
            from metaworld.policies import ENV_POLICY_MAP

            name = self.tasks[task].env_name
            env = ALL_V3_ENVIRONMENTS[name]()
            # The scripted expert reads the goal from the full state vector; policies never see that vector.
            if env._partially_observable:
                env._partially_observable = False
                del env.sawyer_observation_space  # a cached property that depends on observability
            env._set_task_called = True
            env._freeze_rand_vec = True
            env.max_path_length = 10_000  # we enforce our own limits
            model = env.model
            goal_sites = [i for i in range(model.nsite) if model.site(i).name == "goal"]
            for i in goal_sites:  # button-press-topdown has no goal marker: the button is the goal
                model.site_size[i][0] = GOAL_MARKER_RADIUS
            model.vis.quality.offsamples = 0
            renderer = mujoco.Renderer(model, self.image_size, self.image_size)
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_SHADOW] = 0
            renderer.scene.flags[mujoco.mjtRndFlag.mjRND_REFLECTION] = 0
            self._envs[task], self._renderers[task] = env, renderer
            self._experts[task] = ENV_POLICY_MAP[name]()
        return self._envs[task]

    def reset(self, spec: EpisodeSpec) -> None:
        env = self._scene(spec.task)
        space = env._random_reset_space
        env._last_rand_vec = layout(spec, space.low, space.high, self.tasks[spec.task].min_separation)
        self._raw_obs, _ = env.reset()
        self._task, self._steps, self._success = spec.task, 0, False

    @property
    def max_steps(self) -> int:
        return self.tasks[self._require_task()].max_steps

    def _require_task(self) -> str:
        if self._task is None:
            raise RuntimeError("call reset(spec) before stepping or observing")
        return self._task

    def step(self, action: np.ndarray) -> bool:
        env = self._envs[self._require_task()]
        action = np.asarray(action, dtype=np.float64)
        if action.shape != (4,) or not np.all(np.isfinite(action)):
            raise ValueError(f"action must be 4 finite numbers, got {action!r}")
        self._raw_obs, _, _, _, info = env.step(np.clip(action, -1.0, 1.0))
        self._steps += 1
        self._success = self._success or bool(info["success"])
        return self._success

    def _render(self, camera: str) -> np.ndarray:
        task = self._require_task()
        renderer, data = self._renderers[task], self._envs[task].data
        if camera == "third":
            cam = mujoco.MjvCamera()
            cam.type = mujoco.mjtCamera.mjCAMERA_FREE
            cam.lookat[:] = THIRD_PERSON["lookat"]
            cam.distance, cam.azimuth, cam.elevation = (
                THIRD_PERSON["distance"], THIRD_PERSON["azimuth"], THIRD_PERSON["elevation"])
            renderer.update_scene(data, camera=cam)
        elif camera == "wrist":
            renderer.update_scene(data, camera=WRIST_CAMERA)
        else:
            raise KeyError(f"unknown camera {camera!r}; cameras: ['third', 'wrist']")
        return renderer.render().copy()

    def observe(self) -> Observation:
        task = self._require_task()
        proprio = np.asarray(self._raw_obs[:4], dtype=np.float32)  # hand xyz + gripper opening
        return Observation(images={c: self._render(c) for c in self.cameras}, proprio=proprio,
                           instruction=self.tasks[task].instruction, task=task)

    def privileged_state(self) -> dict[str, np.ndarray]:
        """Hand, object and goal positions from the simulator, for diagnostics (never given to a policy)."""
        self._require_task()
        raw = self._raw_obs
        return {"hand": raw[:3].copy(), "object": raw[4:7].copy(), "goal": raw[-3:].copy()}

    def expert_action(self) -> np.ndarray:
        return np.asarray(self._experts[self._require_task()].get_action(self._raw_obs), dtype=np.float32)

    def close(self) -> None:
        for r in self._renderers.values():
            r.close()
        for env in self._envs.values():
            env.close()
        self._envs.clear(), self._renderers.clear()
