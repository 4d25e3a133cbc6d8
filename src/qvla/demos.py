"""Demonstrations: scripted-expert episodes on disk.

Format (one directory):
    manifest.json            {"format": "qvla-demos/1", "suite", "image_size", "cameras",
                              "per_task" (one count, or task -> count),
                              "seed", "episodes": [{"file", "id", "task", "instruction", "steps"}],
                              "attempted", "dropped": [{"id", "reason"}]}
    episodes/<task>-<k>.npz  arrays, T = steps: "<camera>" (T, H, W, 3) uint8 for each camera,
                             "proprio" (T, 4) float32, "actions" (T, 4) float32 in [-1, 1],
                             "state" (T, 9) float32: hand, object and goal xyz from the simulator
                             (training targets for an auxiliary loss, never a policy input; demos
                             recorded without it get it from `add_states`, which replays the actions)
Frame t holds the observation seen *before* action t. Only successful expert episodes are kept; files are
plain .npz read with allow_pickle=False.
"""
from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from qvla.atomic import atomic_directory
from qvla.envs import EpisodeSpec, get_suite

FORMAT = "qvla-demos/1"
log = logging.getLogger(__name__)


@dataclass
class Episode:
    id: str
    task: str
    instruction: str
    images: dict[str, np.ndarray]  # camera -> (T, H, W, 3) uint8
    proprio: np.ndarray  # (T, 4) float32
    actions: np.ndarray  # (T, 4) float32
    state: np.ndarray | None = None  # (T, 9) float32: hand, object, goal xyz (privileged; see STATE)


STATE = ("hand", "object", "goal")  # the privileged-state fields, 3 floats each, in this order
ARRAYS = ("proprio", "actions", "state")  # every other array of an episode file is a camera


def state_vector(env) -> np.ndarray:
    s = env.privileged_state()
    return np.concatenate([s[k] for k in STATE]).astype(np.float32)


def record_expert(env, spec: EpisodeSpec) -> tuple[Episode, bool]:
    """Plays the scripted expert on one episode; returns what it saw and did, and whether it succeeded."""
    env.reset(spec)
    frames, proprio, actions, states, success = [], [], [], [], False
    while len(actions) < env.max_steps and not success:
        obs = env.observe()
        action = env.expert_action()
        frames.append(obs.images), proprio.append(obs.proprio), actions.append(action)
        states.append(state_vector(env))
        success = env.step(action)
    images = {c: np.stack([f[c] for f in frames]) for c in frames[0]}
    return Episode(spec.id, spec.task, obs.instruction, images, np.stack(proprio).astype(np.float32),
                   np.clip(np.stack(actions), -1, 1).astype(np.float32), np.stack(states)), success


def replay_states(env, spec: EpisodeSpec, actions: np.ndarray, proprio: np.ndarray) -> np.ndarray:
    """The privileged state before each stored action, by replaying the actions (nothing is rendered, though
    the env still opens its renderer). Fails if the replay leaves the recorded hand trajectory (`proprio`)
    or does not end in success."""
    env.reset(spec)
    states, success = [], False
    for t, action in enumerate(actions):
        states.append(state_vector(env))
        if not np.allclose(states[-1][:3], proprio[t, :3], atol=1e-5):
            raise ValueError(f"{spec.id}: replay left the recorded hand trajectory at step {t}")
        success = env.step(action)
    if not success:
        raise ValueError(f"{spec.id}: replaying the recorded actions did not succeed")
    return np.stack(states)


_worker_env = None


def _init_worker(suite: str, image_size: int) -> None:
    global _worker_env
    _worker_env = get_suite(suite).make_env(image_size=image_size)


def _play(spec: EpisodeSpec) -> tuple[EpisodeSpec, Episode, bool]:
    episode, success = record_expert(_worker_env, spec)
    return spec, episode, success


def parse_per_task(text: str, tasks) -> int | dict[str, int]:
    """'40' -> 40; '40,reach=200,push=120' -> every task 40 except those named (a dict over `tasks`)."""
    default, *overrides = text.split(",")
    try:
        base = int(default)
        named = {k: int(v) for k, v in (o.split("=") for o in overrides)}
    except ValueError:
        raise ValueError(f"--per-task: expected N or N,TASK=N,..., got {text!r}") from None
    unknown = sorted(set(named) - set(tasks))
    if unknown:
        raise KeyError(f"--per-task names unknown task(s) {unknown}; tasks: {list(tasks)}")
    return {t: named.get(t, base) for t in tasks} if named else base


def write_demos(suite: str, per_task: int | dict[str, int], out: str | Path, seed: int = 0, image_size: int = 96,
                workers: int = 1, tasks: list[str] | None = None) -> dict:
    """Runs the experts on the suite's *train* split and writes the demo directory atomically."""
    specs = get_suite(suite).episodes("train", per_task, seed, tasks)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"demo directory {out} exists and is not empty; choose a new --out")
    kept, dropped, counts = [], [], {}
    with atomic_directory(out, ".demos-") as tmp:
        (tmp / "episodes").mkdir()
        ctx = mp.get_context("spawn")  # EGL contexts do not survive fork
        with ctx.Pool(workers, _init_worker, (suite, image_size)) as pool:
            for spec, ep, ok in tqdm(pool.imap(_play, specs), total=len(specs), desc="demos", unit="ep"):
                if not ok:
                    dropped.append({"id": spec.id, "reason": f"expert failed within {len(ep.actions)} steps"})
                    continue
                k = counts[spec.task] = counts.get(spec.task, -1) + 1
                name = f"episodes/{spec.task}-{k:04d}.npz"
                np.savez(tmp / name, proprio=ep.proprio, actions=ep.actions, state=ep.state, **ep.images)
                kept.append({"file": name, "id": ep.id, "task": ep.task, "instruction": ep.instruction,
                             "steps": int(len(ep.actions))})
        manifest = {"format": FORMAT, "suite": suite, "image_size": image_size,
                    "cameras": sorted(ep.images), "per_task": per_task, "seed": seed,
                    "attempted": len(specs), "episodes": kept, "dropped": dropped}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    log.info("kept %d of %d expert episodes; dropped %d", len(kept), len(specs), len(dropped))
    return manifest


def read_manifest(path: str | Path) -> dict:
    path = Path(path)
    file = path / "manifest.json"
    if not file.is_file():
        raise FileNotFoundError(f"{path} is not a demo directory: {file} is missing")
    manifest = json.loads(file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{file}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


def read_episode(path: str | Path, entry: dict) -> Episode:
    with np.load(Path(path) / entry["file"], allow_pickle=False) as z:
        cams = [k for k in z.files if k not in ARRAYS]
        return Episode(entry["id"], entry["task"], entry["instruction"], {c: z[c] for c in cams},
                       z["proprio"], z["actions"], z["state"] if "state" in z.files else None)


def read_demos(path: str | Path) -> tuple[dict, list[Episode]]:
    manifest = read_manifest(path)
    return manifest, [read_episode(path, e) for e in manifest["episodes"]]


def _replay(args: tuple[str, dict, EpisodeSpec]) -> tuple[str, np.ndarray]:
    path, entry, spec = args
    with np.load(Path(path) / entry["file"], allow_pickle=False) as z:  # the images are not needed
        actions, proprio = z["actions"], z["proprio"]
    return entry["file"], replay_states(_worker_env, spec, actions, proprio)


def add_states(path: str | Path, workers: int = 1) -> int:
    """Adds the privileged `state` array to every episode of a demo directory that lacks it, by replaying
    its actions; each file is replaced whole (write, then rename). Returns how many episodes were updated."""
    path = Path(path)
    manifest = read_manifest(path)
    specs = {s.id: s for s in get_suite(manifest["suite"]).episodes(
        "train", manifest["per_task"], manifest["seed"], sorted({e["task"] for e in manifest["episodes"]}))}
    todo = []
    for e in manifest["episodes"]:
        with np.load(path / e["file"], allow_pickle=False) as z:
            if "state" not in z.files:
                todo.append((str(path), e, specs[e["id"]]))
    if not todo:
        return 0
    with mp.get_context("spawn").Pool(workers, _init_worker, (manifest["suite"], manifest["image_size"])) as pool:
        for file, states in tqdm(pool.imap(_replay, todo), total=len(todo), desc="states", unit="ep"):
            with np.load(path / file, allow_pickle=False) as z:
                arrays = {k: z[k] for k in z.files}
            fd, tmp = tempfile.mkstemp(suffix=".npz", dir=(path / file).parent)
            with os.fdopen(fd, "wb") as f:
                np.savez(f, **arrays, state=states)
                f.flush(), os.fsync(f.fileno())
            Path(tmp).replace(path / file)
    return len(todo)
