"""How faithfully quantized policies reproduce the full-precision policy's outcomes, episode by episode: of the
episodes FP succeeds in, how many each one loses; of those FP fails, how many it gains. Success rate alone
nets the two, so a policy perturbed at random can gain on the tasks FP is weak at what it loses on the tasks
FP solves; a faithful quantization loses little and gains little.

Usage: python bench/outcome_agreement.py FP.json Q.json [Q2.json ...] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qvla.table import head_to_head, records


def agreement(fp: dict, q: dict) -> dict:
    h = head_to_head(q, fp)  # wins: q succeeds where FP fails; losses: the reverse
    solved = sum(bool(fp[i]["success"]) for i in fp if i in q and q[i].get("error") is None)
    return {"pairs": h["pairs"], "success": sum(bool(q[i]["success"]) for i in q) / len(q),
            "fp_successes": solved, "lost": h["losses"], "gained": h["wins"],
            "kept": (solved - h["losses"]) / solved if solved else None,
            "agreement": 1 - (h["wins"] + h["losses"]) / h["pairs"], "p_vs_fp": h["p"]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("fp")
    ap.add_argument("evals", nargs="+")
    ap.add_argument("--out")
    a = ap.parse_args()
    fp = records(a.fp)
    rows = []
    print("| evaluation | success | FP successes lost | FP failures gained | FP successes kept | agreement |")
    print("|---|---|---|---|---|---|")
    for f in a.evals:
        r = {"eval": f, **agreement(fp, records(f))}
        if r["pairs"] != len(fp):
            raise SystemExit(f"{f} is not of FP's {len(fp)} episodes (or some crashed): {r['pairs']} paired")
        rows.append(r)
        print(f"| `{f}` | {100 * r['success']:.1f}% | {r['lost']} of {r['fp_successes']} | {r['gained']} | "
              f"{100 * r['kept']:.1f}% | {100 * r['agreement']:.1f}% |")
    if a.out:
        Path(a.out).write_text(json.dumps({"fp": a.fp, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
