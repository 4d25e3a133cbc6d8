"""Does closed-loop success on the selection episodes (`qvla select`, calib split) predict success on the
evaluation episodes? Reads a selection and each candidate's evaluation, in the candidates' order: the rank
correlation of the two, the chosen candidate's evaluation against the first-listed (default) one, and both
against FP and the baselines given, paired on the evaluation episodes.

Usage: python bench/selection_vs_eval.py SELECTION_DIR --evals E0.json E1.json ... --fp FP.json \
           [--baselines B.json ...] --out FILE.json
"""
from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

from scipy.stats import spearmanr

from qvla.table import head_to_head, records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("selection")
    ap.add_argument("--evals", nargs="+", required=True, help="each candidate's evaluation, in the selection's order")
    ap.add_argument("--fp", required=True)
    ap.add_argument("--baselines", nargs="*", default=[])
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    sel = json.loads((Path(a.selection) / "selection.json").read_text())
    cands = sel["candidates"]
    if len(a.evals) != len(cands):
        raise SystemExit(f"{len(cands)} candidates but {len(a.evals)} evaluations")
    evals = [json.loads(Path(f).read_text()) for f in a.evals]
    for c, e, f in zip(cands, evals, a.evals):
        if e["weights_sha256"] != c["weights_sha256"]:
            raise SystemExit(f"{f} is not an evaluation of {c['checkpoint']} (its weights differ)")
        if e["errors"]:
            raise SystemExit(f"{f} has {len(e['errors'])} crashed episodes")
    recs = [records(f) for f in a.evals]
    fp = records(a.fp)
    best, default = sel["chosen_index"], 0
    s_sel, s_eval = [c["success_rate"] for c in cands], [e["success_rate"] for e in evals]
    rows = [{"checkpoint": c["checkpoint"], "method": c["method"], "selection": s, "evaluation": v,
             "evaluation_file": f} for c, s, v, f in zip(cands, s_sel, s_eval, a.evals)]
    res = {"selection": str(Path(a.selection) / "selection.json"),
           "selection_sha256": hashlib.sha256((Path(a.selection) / "selection.json").read_bytes()).hexdigest(),
           "selection_episodes": sel["episodes"], "rows": rows, "spearman": float(spearmanr(s_sel, s_eval).statistic),
           "chosen": best, "chosen_evaluation": s_eval[best], "default_evaluation": s_eval[default],
           "best_evaluation": max(s_eval), "chosen_vs_default": head_to_head(recs[best], recs[default]),
           "chosen_vs_fp": head_to_head(recs[best], fp), "default_vs_fp": head_to_head(recs[default], fp),
           "baselines": [{"file": b, "success_rate": json.loads(Path(b).read_text())["success_rate"],
                          "vs_fp": head_to_head(records(b), fp), "chosen_vs": head_to_head(recs[best], records(b)),
                          "default_vs": head_to_head(recs[default], records(b))} for b in a.baselines]}
    Path(a.out).write_text(json.dumps(res, indent=1))
    print("| # | checkpoint | selection | evaluation |\n|---|---|---|---|")
    for k, r in enumerate(rows):
        mark = " (chosen)" if k == best else ""
        print(f"| {k}{mark} | {r['checkpoint']} | {100 * r['selection']:.1f} | {100 * r['evaluation']:.1f} |")
    h = res["chosen_vs_default"]
    print(f"Spearman {res['spearman']:.2f}; chosen {100 * s_eval[best]:.1f}% vs default {100 * s_eval[default]:.1f}% "
          f"({100 * h['delta']:+.1f} ± {100 * h['delta_ci95']:.1f}, p {h['p']:.3f})")
    for b in res["baselines"]:
        print(f"{b['file']}: {100 * b['success_rate']:.1f}% (drop {-100 * b['vs_fp']['delta']:.1f}); chosen drop "
              f"{-100 * res['chosen_vs_fp']['delta']:.1f}, default drop {-100 * res['default_vs_fp']['delta']:.1f}")


if __name__ == "__main__":
    main()
