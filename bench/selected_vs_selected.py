"""Two selection procedures against each other (`qvla select` run for QVLA and for a baseline, each choosing
among its own candidates on the same selection episodes): their chosen checkpoints on sets of evaluation
episodes, each drop from FP, the ratio of the drops, and the chosen pair head to head, per set and over all.

Usage: python bench/selected_vs_selected.py --fp FP0.json [FP1.json ...] --qvla Q0.json [Q1.json ...] \
           --baseline B0.json [B1.json ...] --out FILE.json    (the k-th file of each list: the same episodes)
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qvla.table import head_to_head, records


def rate(recs: dict) -> float:
    return sum(bool(r["success"]) for r in recs.values()) / len(recs)


def compare(fp: dict, q: dict, b: dict) -> dict:
    if not set(fp) == set(q) == set(b):
        raise SystemExit("the three evaluations of one set must be of the same episodes")
    if any(r.get("error") is not None for recs in (fp, q, b) for r in recs.values()):
        raise SystemExit("an episode crashed: its success is unknown, so no drop is computed")
    drop_q, drop_b = rate(fp) - rate(q), rate(fp) - rate(b)
    return {"episodes": len(fp), "fp": rate(fp), "qvla": rate(q), "baseline": rate(b), "drop_qvla": drop_q,
            "drop_baseline": drop_b, "drop_ratio": max(drop_q, 0.0) / drop_b if drop_b > 0 else None,  # a gain: 0
            "qvla_vs_baseline": head_to_head(q, b), "qvla_vs_fp": head_to_head(q, fp),
            "baseline_vs_fp": head_to_head(b, fp)}


def main() -> None:
    ap = argparse.ArgumentParser()
    for k in ("fp", "qvla", "baseline"):
        ap.add_argument(f"--{k}", nargs="+", required=True)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    if not len(a.fp) == len(a.qvla) == len(a.baseline):
        raise SystemExit("give one FP, one QVLA and one baseline evaluation per set of episodes")
    sets = [[records(f) for f in files] for files in zip(a.fp, a.qvla, a.baseline)]
    res = {"files": [dict(zip(("fp", "qvla", "baseline"), f)) for f in zip(a.fp, a.qvla, a.baseline)],
           "sets": [compare(*s) for s in sets]}
    if len(sets) > 1:  # episode ids carry their seed, so the sets' records never collide
        res["all"] = compare(*({i: r for s in sets for i, r in s[k].items()} for k in range(3)))
    Path(a.out).write_text(json.dumps(res, indent=1))
    for name, r in [*((f"set {k}", s) for k, s in enumerate(res["sets"])), *([("all", res["all"])] if "all" in res else [])]:
        h = r["qvla_vs_baseline"]
        ratio = "—" if r["drop_ratio"] is None else f"{r['drop_ratio']:.2f}"
        print(f"{name}: FP {100 * r['fp']:.1f}  QVLA {100 * r['qvla']:.1f}  baseline {100 * r['baseline']:.1f}  "
              f"drop ratio {ratio}  QVLA − baseline {100 * h['delta']:+.1f} ± {100 * h['delta_ci95']:.1f} "
              f"({h['wins']} / {h['losses']}, p {h['p']:.3f})")


if __name__ == "__main__":
    main()
