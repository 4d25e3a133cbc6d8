"""Bits sweep: QVLA at average budgets 8, 6, 4, 3, 2.5, 2 against the best uniform baseline that fits each
budget (uniform methods only have 8, 4 or 2 bits: the baseline at budget b is the best of them at the
largest uniform width <= b). Weight-only (A16). Success vs average bits as PNG + JSON.

    python bench/sweep.py --policy microvla-chunk --calib results/table/microvla-chunk/calib \
        --episodes-per-task 10 --out results/sweep/microvla-chunk
Checkpoints and evaluations go through `qvla table` into the same directory, so a rerun resumes.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qvla.table import run_table

UNIFORM_WIDTHS = (8, 4, 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--policy", required=True)
    ap.add_argument("--calib", default=None)
    ap.add_argument("--budgets", default="8,6,4,3,2.5,2")
    ap.add_argument("--baselines", default="rtn,awq,gptq")
    ap.add_argument("--method", default="qvla", help="the mixed-precision method swept (qvla, qvla-gptq, ...)")
    ap.add_argument("--episodes-per-task", type=int, default=10)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--form", default="action")
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    budgets = [float(b) for b in a.budgets.split(",")]
    widths = sorted({max(w for w in UNIFORM_WIDTHS if w <= b) for b in budgets if b >= min(UNIFORM_WIDTHS)})
    base = run_table(a.policy, [f"W{w:g}A16" for w in widths], a.baselines.split(","), a.episodes_per_task,
                     a.out, a.calib, workers=a.workers, form=a.form)
    ours = run_table(a.policy, [f"W{b:g}A16" for b in budgets], [a.method], a.episodes_per_task, a.out, a.calib,
                     workers=a.workers, form=a.form)
    base_methods = set(a.baselines.split(","))
    best = {}
    for r in (r for r in base["rows"] if r["method"] in base_methods and r["setting"].endswith("A16")):
        w = r["average_bits"]
        if w not in best or r["success_rate"] > best[w]["success_rate"]:
            best[w] = r
    points = []
    qvla_rows = {r["setting"]: r for r in ours["rows"] if r["method"] == a.method}
    for b in sorted(budgets, reverse=True):  # rows run in the order given; points read from high to low bits
        r = qvla_rows[f"W{b:g}A16"]
        fit = max((w for w in best if w <= b), default=None)
        points.append({"budget": b, "qvla": r["success_rate"], "qvla_average_bits": r["average_bits"],
                       "baseline": best[fit]["success_rate"] if fit else None,
                       "baseline_method": f"{best[fit]['method']} W{fit:g}" if fit else None})
    result = {"policy": a.policy, "method": a.method, "fp": ours["fp"], "episodes_per_task": a.episodes_per_task, "points": points}
    out = Path(a.out)
    stem = "sweep" if a.method == "qvla" else f"sweep-{a.method}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([p["budget"] for p in points], [100 * p["qvla"] for p in points], "o-", label=f"{a.method} (mixed)")
    pts = [(p["budget"], 100 * p["baseline"]) for p in points if p["baseline"] is not None]
    ax.plot([p[0] for p in pts], [p[1] for p in pts], "s--", label="best uniform baseline that fits")
    ax.axhline(100 * result["fp"], color="gray", lw=1, label="full precision")
    ax.set_xlabel("average weight bits (A16)")
    ax.set_ylabel("success on mt10 (%)")
    ax.set_title(f"{a.policy}, {a.episodes_per_task} episodes/task")
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=120)
    print(json.dumps(points, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
