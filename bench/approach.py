"""Where a policy's failed grasps go wrong: on the object-moving tasks, how close the hand ever gets to the
object, whether the object is lifted or moved, and how far it ends from the goal — for the policy and for the
scripted expert on the same evaluation episodes.

Usage: python bench/approach.py --policy microvla-chunk --tasks push,pick-place --episodes-per-task 10 \
           --out results/fp/approach-microvla-chunk.json
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from qvla.envs import get_suite
from qvla.policies import load_policy


def play(env, spec, act) -> dict:
    """One episode; act() -> chunk of actions. Tracks the hand-object distance at every step."""
    env.reset(spec)
    s0 = env.privileged_state()
    steps, success, closest = 0, False, None
    lift = 0.0
    while steps < env.max_steps and not success:
        for a in act():
            success = env.step(a)
            steps += 1
            s = env.privileged_state()
            d = s["hand"] - s["object"]
            if closest is None or np.linalg.norm(d) < np.linalg.norm(closest):
                closest = d
            lift = max(lift, float(s["object"][2] - s0["object"][2]))
            if success or steps >= env.max_steps:
                break
    s = env.privileged_state()
    return {"id": spec.id, "task": spec.task, "success": bool(success), "steps": steps,
            "closest_hand_object_m": float(np.linalg.norm(closest)),
            "closest_xy_m": float(np.linalg.norm(closest[:2])), "closest_z_m": float(abs(closest[2])),
            "object_lift_m": lift, "object_moved_m": float(np.linalg.norm(s["object"] - s0["object"])),
            "object_goal_start_m": float(np.linalg.norm(s0["object"] - s0["goal"])),
            "object_goal_end_m": float(np.linalg.norm(s["object"] - s["goal"]))}


def summary(rows: list[dict]) -> dict:
    keys = [k for k in rows[0] if k.endswith("_m")]
    return {"episodes": len(rows), "success_rate": float(np.mean([r["success"] for r in rows])),
            **{f"median_{k}": float(np.median([r[k] for r in rows])) for k in keys}}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--policy", required=True)
    ap.add_argument("--tasks", default="push,pick-place")
    ap.add_argument("--episodes-per-task", type=int, default=10)
    ap.add_argument("--suite", default="mt10")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    torch.set_num_threads(1)
    suite = get_suite(a.suite)
    tasks = a.tasks.split(",")
    specs = suite.episodes("eval", a.episodes_per_task, seed=a.seed, tasks=tasks)  # refuses unknown tasks
    policy = load_policy(a.policy)
    env = suite.make_env(image_size=policy.config.image_size)
    out = {"policy": a.policy, "suite": a.suite, "seed": a.seed, "tasks": {}}
    for task in tasks:
        mine = [s for s in specs if s.task == task]
        pol, exp = [], []
        for spec in mine:
            policy.reset()
            pol.append(play(env, spec, lambda: np.asarray(policy.act(env.observe()))))
            exp.append(play(env, spec, lambda: [env.expert_action()]))
        out["tasks"][task] = {"policy": summary(pol), "expert": summary(exp),
                              "episodes": {"policy": pol, "expert": exp}}
        p, e = out["tasks"][task]["policy"], out["tasks"][task]["expert"]
        print(f"{task}: policy {p['success_rate']:.0%} (closest {p['median_closest_hand_object_m'] * 100:.1f} cm, "
              f"xy {p['median_closest_xy_m'] * 100:.1f} cm, lift {p['median_object_lift_m'] * 100:.1f} cm) | expert "
              f"{e['success_rate']:.0%} (closest {e['median_closest_hand_object_m'] * 100:.1f} cm, xy "
              f"{e['median_closest_xy_m'] * 100:.1f} cm, lift {e['median_object_lift_m'] * 100:.1f} cm)", flush=True)
    env.close()
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
