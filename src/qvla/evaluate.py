"""Closed-loop evaluation: rollout() steps one episode; evaluate() runs many and writes the records.

Outputs of `evaluate(..., out="X.json")`: X.jsonl, one record per episode, and X.json, the summary.
An episode that raises is recorded with its traceback under "error" and counted in neither successes nor
failures; the run goes on. Each episode runs on one torch thread, so any --workers gives the same records.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import platform
import time
import traceback
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from tqdm import tqdm

from qvla.checkpoint import CONFIG, WEIGHTS, read_meta, sha256
from qvla.cpu_mode import stage_mode
from qvla.envs import EpisodeSpec, Observation, get_suite

Observer = Callable[[EpisodeSpec, int, Observation], None]


def rollout(policy, env, spec: EpisodeSpec, observer: Observer | None = None) -> dict:
    """Plays one episode: observe, predict a chunk, execute it open-loop; stops at success or max steps."""
    policy.reset()
    env.reset(spec)
    steps, success, act_ms = 0, False, []
    while steps < env.max_steps and not success:
        obs = env.observe()
        if observer is not None:
            observer(spec, steps, obs)
        t = time.perf_counter()
        chunk = np.asarray(policy.act(obs))
        act_ms.append((time.perf_counter() - t) * 1e3)
        for action in chunk:
            success = env.step(action)
            steps += 1
            if success or steps >= env.max_steps:
                break
    return {"id": spec.id, "task": spec.task, "success": bool(success), "steps": steps,
            "policy_calls": len(act_ms), "act_ms": [round(x, 3) for x in act_ms]}


def safe_rollout(policy, env, spec: EpisodeSpec, observer: Observer | None = None) -> dict:
    try:
        return rollout(policy, env, spec, observer)
    except Exception as e:  # recorded, never counted as a success or a failure
        return {"id": spec.id, "task": spec.task, "success": None, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}


_worker: dict = {}


def _init_worker(policy_ref: str, suite: str, image_size: int, policy=None, kernels: str = "real") -> None:
    """Sets up one worker; `policy` is the already-loaded one when episodes run in this process."""
    from qvla.policies import load_policy

    torch.set_num_threads(1)
    torch.set_flush_denormal(True)  # a spawned worker's own mode; in this process evaluate's stage_mode gives it back
    _worker["policy"] = policy if policy is not None else load_policy(policy_ref, kernels)
    _worker["env"] = get_suite(suite).make_env(image_size=image_size)


def _run(spec: EpisodeSpec) -> dict:
    return safe_rollout(_worker["policy"], _worker["env"], spec)


def summarize(records: list[dict], meta: dict) -> dict:
    done = [r for r in records if r.get("error") is None]
    tasks = sorted({r["task"] for r in records}, key=[r["task"] for r in records].index)
    per_task = {t: float(np.mean([r["success"] for r in done if r["task"] == t]))
                if any(r["task"] == t for r in done) else None for t in tasks}
    act = [x for r in done for x in r["act_ms"]]
    return {**meta, "success_rate": float(np.mean([r["success"] for r in done])) if done else None,
            "per_task": per_task, "episodes": len(records), "evaluated": len(done),
            "successes": int(sum(r["success"] for r in done)),
            "errors": [{"id": r["id"], "error": r["error"], "traceback": r["traceback"]}
                       for r in records if r.get("error") is not None],
            "control_step_ms_median": float(np.median(act)) if act else None,
            "mean_steps": float(np.mean([r["steps"] for r in done])) if done else None}


def check_writable(out: str | Path) -> Path:
    out = Path(out)
    if out.suffix != ".json":
        raise ValueError(f"--out must be a .json file (records go to the .jsonl beside it), got {out}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise FileNotFoundError(f"cannot write {out}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise PermissionError(f"cannot write {out}: permission denied")
    return out


@stage_mode()
def evaluate(policy_ref: str, suite: str = "mt10", episodes_per_task: int = 20, seed: int = 0,
             workers: int = 1, out: str | Path | None = None, tasks: list[str] | None = None,
             split: str = "eval", image_size: int = 96, kernels: str = "real") -> dict:
    """Runs the suite's fixed episode list with the policy (a registered name or checkpoint directory)."""
    from qvla.policies import load_policy, resolve

    if workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    out = check_writable(out) if out is not None else None
    specs = get_suite(suite).episodes(split, episodes_per_task, seed, tasks)
    ref = str(resolve(policy_ref))
    policy = load_policy(ref, kernels)  # fails here, before any episode, on a bad checkpoint
    name = getattr(policy, "name", ref)
    t0 = time.time()
    if workers == 1:
        _init_worker(ref, suite, image_size, policy)
        records = [_run(s) for s in tqdm(specs, desc="eval", unit="ep")]
        _worker["env"].close()
    else:
        with mp.get_context("spawn").Pool(workers, _init_worker, (ref, suite, image_size, None, kernels)) as pool:
            records = list(tqdm(pool.imap(_run, specs), total=len(specs), desc="eval", unit="ep"))
    from qvla.bench import cpu_name

    weights = Path(ref) / WEIGHTS
    # the checkpoint's quantization (method, bits, source weights) travels with the result, which outlives it
    quant = read_meta(ref).get("quantization") if (Path(ref) / CONFIG).is_file() else None
    meta = {"policy": name, "checkpoint": ref, "weights_sha256": sha256(weights) if weights.is_file() else None,
            "quantization": quant, "suite": suite, "split": split, "seed": seed,
            "episodes_per_task": episodes_per_task, "workers": workers,
            "kernels": getattr(policy, "kernels", "float"), "wall_s": round(time.time() - t0, 1),
            "machine": f"{platform.machine()} {os.cpu_count()} cpus, torch {torch.__version__}",
            "cpu": f"{cpu_name()} ({torch.backends.cpu.get_cpu_capability()})"}
    summary = summarize(records, meta)
    if out is not None:
        write_results(out, records, summary)
    return summary


def write_results(out: Path, records: list[dict], summary: dict) -> None:
    jsonl = out.with_suffix(".jsonl")
    tmp_l, tmp_s = jsonl.with_name(jsonl.name + ".tmp"), out.with_name(out.name + ".tmp")
    tmp_l.write_text("".join(json.dumps(r) + "\n" for r in records))
    tmp_s.write_text(json.dumps(summary, indent=1))
    tmp_l.replace(jsonl)
    tmp_s.replace(out)


def format_table(summaries: dict[str, dict]) -> str:
    """Markdown table: one column per policy, one row per task, then the average."""
    names = list(summaries)
    tasks = list(next(iter(summaries.values()))["per_task"])
    rows = ["| task | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    fmt = lambda v: "error" if v is None else f"{100 * v:.0f}%"  # noqa: E731
    for t in tasks:
        rows.append(f"| {t} | " + " | ".join(fmt(summaries[n]["per_task"].get(t)) for n in names) + " |")
    rows.append("| **average** | " + " | ".join(f"**{fmt(summaries[n]['success_rate'])}**" for n in names) + " |")
    rows.append("| episodes (errors) | " + " | ".join(
        f"{summaries[n]['episodes']} ({len(summaries[n]['errors'])})" for n in names) + " |")
    ms = lambda v: "n/a" if v is None else f"{v:.1f}"  # noqa: E731 (None when every episode crashed)
    rows.append("| policy call, median ms | " + " | ".join(
        ms(summaries[n]["control_step_ms_median"]) for n in names) + " |")
    return "\n".join(rows)
