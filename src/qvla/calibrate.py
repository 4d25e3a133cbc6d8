"""Calibration episodes: the full-precision policy acting on the suite's *calib* split, every observation it
acted on stored, so that sensitivities are measured on the states the policy really visits (horizon T =
the whole episode, one entry per policy call).

Format (one directory): manifest.json {"format": "qvla-calib/1", "suite", "seed", "policy", "checkpoint",
"weights_sha256", "episodes": [{"file", "id", "task", "instruction", "calls", "success", "sha256"}], and
"acted_by" where a quantized checkpoint of the policy acted (`qvla calibrate --acting`)} and
episodes/<k>.npz with "<camera>" (T, H, W, 3) uint8 and "proprio" (T, 4) float32, T = policy calls.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from qvla.atomic import atomic_directory
from qvla.checkpoint import WEIGHTS, read_meta, sha256
from qvla.cpu_mode import stage_mode
from qvla.envs import Observation, get_suite
from qvla.evaluate import rollout

FORMAT = "qvla-calib/1"


def acting_policy(path: Path, weights: str, acting: str | None) -> tuple[Path, dict | None]:
    """-> (the checkpoint that acts, its record for the manifest or None): `acting` must be a quantized
    checkpoint made from the policy at `path` (whose weights hash to `weights`), whose sensitivities the
    episodes will then be used for."""
    from qvla.policies import resolve

    if acting is None:
        return path, None
    act = resolve(acting)
    quant = read_meta(act).get("quantization")
    if quant is None or quant.get("source_weights_sha256") != weights:
        raise ValueError(f"--acting {act} is not a quantized checkpoint of {path} (its source weights differ)")
    return act, {"checkpoint": str(act), "weights_sha256": sha256(act / WEIGHTS), "method": quant.get("method"),
                 "w_bits": quant.get("w_bits"), "a_bits": quant.get("a_bits")}


@stage_mode()
def collect(policy_ref: str, suite: str, episodes: int, out: str | Path, seed: int = 0,
            acting: str | None = None) -> dict:
    """Rolls out the policy on `episodes` calibration episodes spread round-robin over the suite's tasks.

    acting: a quantized checkpoint of the policy that acts instead, so that the observations are the states
    the quantized policy reaches (its errors compound there); the manifest still names the policy, whose
    sensitivities are measured on them, and records the acting checkpoint as "acted_by"."""
    from qvla.policies import load_policy, resolve

    if episodes < 1:
        raise ValueError(f"--episodes must be >= 1, got {episodes}")
    torch.set_num_threads(1)  # the same observations as an evaluation worker would see
    path = resolve(policy_ref)
    weights = sha256(path / WEIGHTS)
    act_path, acted_by = acting_policy(path, weights, acting)
    policy = load_policy(act_path)
    name = read_meta(path).get("policy", str(path)) if acted_by else policy.name  # the name load_policy gives
    s = get_suite(suite)
    per_task = -(-episodes // len(s.tasks))
    by_task = s.episodes("calib", per_task, seed)
    specs = sorted(by_task, key=lambda e: (e.index, list(s.tasks).index(e.task)))[:episodes]
    env = s.make_env(image_size=policy.config.image_size)
    entries = []
    try:
        with atomic_directory(out, ".calib-") as tmp:
            (tmp / "episodes").mkdir()
            for k, spec in enumerate(tqdm(specs, desc="calibrate", unit="ep")):
                seen: list[Observation] = []
                rec = rollout(policy, env, spec, observer=lambda _s, _t, o: seen.append(o))
                arrays = {"proprio": np.stack([o.proprio for o in seen]),
                          **{c: np.stack([o.images[c] for o in seen]) for c in seen[0].images}}
                np.savez(tmp / f"episodes/{k:04d}.npz", **arrays)
                entries.append({"file": f"episodes/{k:04d}.npz", "id": spec.id, "task": spec.task,
                                "instruction": seen[0].instruction, "calls": len(seen), "success": rec["success"],
                                "sha256": observation_digest(arrays)})
            manifest = {"format": FORMAT, "suite": suite, "seed": seed, "policy": name,
                        "checkpoint": str(path), "weights_sha256": weights, "episodes": entries,
                        **({"acted_by": acted_by} if acted_by else {})}
            (tmp / "manifest.json").write_text(json.dumps(manifest, indent=1))
    finally:
        env.close()
    return manifest


def load_calibration(path: str | Path, suite: str | None = None) -> tuple[dict, list[Observation]]:
    """-> (manifest, observations in episode order); refuses data from another suite."""
    path = Path(path)
    if not (path / "manifest.json").is_file():
        raise FileNotFoundError(f"{path} is not a calibration directory (no manifest.json)")
    manifest = json.loads((path / "manifest.json").read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    if suite is not None and manifest["suite"] != suite:
        raise ValueError(f"calibration data in {path} is from suite {manifest['suite']!r}, not {suite!r}")
    missing = [e["file"] for e in manifest["episodes"] if not (path / e["file"]).is_file()]
    if missing:  # the manifest is kept in git, the observations are not: regenerate them (deterministic)
        raise FileNotFoundError(f"{path} lacks {len(missing)} of its {len(manifest['episodes'])} observation files "
                                f"(e.g. {missing[0]}); regenerate them with '{collect_command(manifest, path)}' "
                                f"into an empty directory")
    observations = []
    for e in manifest["episodes"]:
        with np.load(path / e["file"], allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        check_digest(arrays, e, path, manifest)
        cams = [k for k in arrays if k != "proprio"]
        for t in range(e["calls"]):
            observations.append(Observation({c: arrays[c][t] for c in cams}, arrays["proprio"][t],
                                            e["instruction"], e["task"], {"episode": e["id"], "t": t}))
    return manifest, observations


def collect_command(manifest: dict, out: str | Path) -> str:
    """The `qvla calibrate` command that collects the manifest's episodes into `out`."""
    acting = f" --acting {manifest['acted_by']['checkpoint']}" if "acted_by" in manifest else ""
    return f"qvla calibrate --policy {manifest['policy']} --episodes {len(manifest['episodes'])}{acting} --out {out}"


def observation_digest(arrays: dict[str, np.ndarray]) -> str:
    """SHA-256 of an episode's arrays (names, dtypes, shapes, bytes); the .npz file's own bytes carry a timestamp."""
    h = hashlib.sha256()
    for name in sorted(arrays):
        a = np.ascontiguousarray(arrays[name])
        h.update(f"{name}:{a.dtype.str}:{a.shape};".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def check_digest(arrays: dict[str, np.ndarray], entry: dict, path: Path, manifest: dict) -> None:
    """Observations regenerated next to a kept manifest must be the recorded ones: the sensitivities cached beside
    them, and every checkpoint made from them, came from those. (Manifests written before digests have none.)"""
    if "sha256" in entry and (found := observation_digest(arrays)) != entry["sha256"]:
        raise ValueError(f"{path / entry['file']} holds other observations than its manifest recorded (sha256 "
                         f"{found[:12]}, recorded {entry['sha256'][:12]}): regenerated on another machine or by "
                         f"other code; collect a new directory with '{collect_command(manifest, 'NEW')}'")
