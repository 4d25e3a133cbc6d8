"""`qvla select`: choose among quantized checkpoints of one policy by closed-loop success itself.

Every candidate (and the full-precision policy) acts on the same episodes of the suite's *calib* split,
at a suite seed none of the candidates was calibrated on, so the choice never sees an evaluation episode
and never scores a candidate on the layouts its plan was measured on. The candidate with the most
successes is chosen; a tie goes to the candidate listed first (list them in order of preference). Each
candidate is paired against the chosen one (Δ, 95 % interval, McNemar p), so the file says whether the
choice was told apart from the rest at this number of episodes.

Artifacts under OUT: fp.json and cand-<k>.json (evaluation summaries, per-episode records beside them),
selection.json. A rerun reuses an evaluation whose checkpoint has not changed since.
"""
from __future__ import annotations

import json
from functools import partial
from pathlib import Path

from qvla.checkpoint import WEIGHTS, read_meta, sha256
from qvla.table import head_to_head, records, reuse_or_evaluate

SPLIT = "calib"
FORMAT = "qvla-selection/1"


def calibration_ids(ckpt: str | Path) -> set[str]:
    """The episode ids a quantized checkpoint's plan was calibrated on (and tuned on, with --tune-on), as its
    plan records them; a plan written before the ids were recorded names its calibration folders, whose
    manifests are read instead. Refuses a candidate whose calibration cannot be read: the overlap could not be
    checked."""
    plan_file = Path(ckpt) / "plan.json"
    if not plan_file.is_file():
        raise FileNotFoundError(f"{ckpt} is not a quantized checkpoint (no plan.json): nothing to select among")
    prov = json.loads(plan_file.read_text()).get("provenance", {})
    if prov.get("calibration") is None:
        return set()  # a method that reads no calibration (rtn)
    sources = [{"calibration": prov["calibration"], "ids": prov.get("calibration_ids")}, *prov.get("tune_on", [])]
    return set().union(*(s["ids"] if s.get("ids") is not None else _manifest_ids(ckpt, s["calibration"])
                         for s in sources))


def _manifest_ids(ckpt: str | Path, calib: str) -> list[str]:
    manifest = Path(calib) / "manifest.json"
    if not manifest.is_file():
        raise FileNotFoundError(f"{ckpt} was calibrated on {calib}, whose manifest.json is missing: cannot check "
                                f"that the selection episodes are not its calibration ones")
    return [e["id"] for e in json.loads(manifest.read_text())["episodes"]]


def selection_specs(suite: str, episodes_per_task: int, seed: int, candidates: list[str],
                    tasks: list[str] | None = None) -> list:
    from qvla.envs import get_suite

    specs = get_suite(suite).episodes(SPLIT, episodes_per_task, seed, tasks)
    ids = {s.id for s in specs}
    for c in candidates:
        seen = ids & calibration_ids(c)
        if seen:
            raise ValueError(f"{c} was calibrated on {len(seen)} of the selection episodes (e.g. {sorted(seen)[0]}); "
                             f"choose a --seed none of the candidates was calibrated with")
    return specs


def choose(cands: list[dict]) -> int:
    """Index of the candidate with the most successes over its episode records (all finished: a crashed
    episode stops the selection before this); the first listed on a tie."""
    wins = [sum(bool(r["success"]) for r in c.values()) for c in cands]
    return max(range(len(cands)), key=lambda k: (wins[k], -k))


def run_select(policy: str, candidates: list[str], episodes_per_task: int, out: str | Path, seed: int,
               workers: int = 1, suite: str = "mt10", tasks: list[str] | None = None) -> dict:
    from qvla.evaluate import evaluate
    from qvla.policies import resolve

    if not candidates or len({Path(c).resolve() for c in candidates}) != len(candidates):
        raise ValueError(f"give one or more distinct --candidates checkpoints, got {candidates}")
    source = sha256(resolve(policy) / WEIGHTS)
    for c in candidates:
        if (read_meta(c).get("quantization") or {}).get("source_weights_sha256") != source:
            raise ValueError(f"{c} is not a quantized checkpoint of {policy} (its source weights differ)")
    ids = {s.id for s in selection_specs(suite, episodes_per_task, seed, candidates, tasks)}  # before any episode
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = [(policy, out / "fp.json", source)] + [
        (str(c), out / f"cand-{k}.json", sha256(Path(c) / WEIGHTS)) for k, c in enumerate(candidates)]
    run = partial(evaluate, suite=suite, episodes_per_task=episodes_per_task, seed=seed, workers=workers, tasks=tasks,
                  split=SPLIT)
    for ref, file, weights in runs:
        reuse_or_evaluate(ref, file, weights, ids, run)
    summaries = [json.loads(f.read_text()) for _, f, _ in runs]
    errors = {r: len(s["errors"]) for (r, _, _), s in zip(runs, summaries) if s["errors"]}
    if errors:  # a crashed episode is neither a success nor a failure: no choice is made on it
        raise RuntimeError(f"episodes crashed during selection ({errors}); see the .jsonl records under {out}")
    recs = [records(f) for _, f, _ in runs]
    best = choose(recs[1:])
    rows = [_row(c, w, s, r, recs[0], None if k == best else recs[1 + best])
            for k, ((c, _, w), s, r) in enumerate(zip(runs[1:], summaries[1:], recs[1:]))]
    result = {"format": FORMAT, "policy": policy, "suite": suite, "split": SPLIT, "seed": seed,
              "episodes_per_task": episodes_per_task, "episodes": summaries[0]["episodes"],
              "fp_success_rate": summaries[0]["success_rate"], "chosen": str(candidates[best]), "chosen_index": best,
              "candidates": rows, "cpu": summaries[0].get("cpu")}
    tmp = out / "selection.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out / "selection.json")
    return result


def _row(ckpt: str, weights: str, summary: dict, recs: dict, fp: dict, chosen: dict | None) -> dict:
    quant = summary.get("quantization") or {}
    return {"checkpoint": ckpt, "weights_sha256": weights, **{k: quant.get(k) for k in ("method", "w_bits", "a_bits")},
            "success_rate": summary["success_rate"], "vs_fp": head_to_head(recs, fp),
            "vs_chosen": None if chosen is None else head_to_head(recs, chosen)}


def format_selection(res: dict) -> str:
    lines = [f"{res['policy']}: {res['episodes']} episodes of the {res['suite']} {res['split']} split, seed {res['seed']}"
             f" (FP {100 * res['fp_success_rate']:.1f}%)", "| # | checkpoint | method | success | Δ vs FP | Δ vs chosen (p) |",
             "|---|---|---|---|---|---|"]
    for k, r in enumerate(res["candidates"]):
        h, c = r["vs_fp"], r["vs_chosen"]
        vs = "chosen" if c is None else f"{100 * c['delta']:+.1f} ± {100 * c['delta_ci95']:.1f} ({c['p']:.3f})"
        lines.append(f"| {k} | {r['checkpoint']} | {r['method']} | {100 * r['success_rate']:.1f}% | "
                     f"{100 * h['delta']:+.1f} ± {100 * h['delta_ci95']:.1f} | {vs} |")
    return "\n".join(lines)
