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
    per_task: dict[str, dict[str, int]] = {}
    for i in fp:
        t = per_task.setdefault(fp[i]["task"], {"fp": 0, "lost": 0, "gained": 0})
        t["fp"] += bool(fp[i]["success"])
        t["lost"] += bool(fp[i]["success"]) and not q[i]["success"]
        t["gained"] += bool(q[i]["success"]) and not fp[i]["success"]
    return {"pairs": h["pairs"], "success": sum(bool(q[i]["success"]) for i in q) / len(q),
            "fp_successes": solved, "lost": h["losses"], "gained": h["wins"], "per_task": per_task,
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
    print("| evaluation | success | FP successes lost | FP failures gained | FP successes kept | agreement | "
          "lost / gained by task (where either) |")
    print("|---|---|---|---|---|---|---|")
    for f in a.evals:
        q = records(f)
        if set(q) != set(fp):
            raise SystemExit(f"{f} is not of FP's {len(fp)} episodes")
        r = {"eval": f, **agreement(fp, q)}
        if r["pairs"] != len(fp):
            raise SystemExit(f"{f} is not of FP's {len(fp)} episodes (or some crashed): {r['pairs']} paired")
        rows.append(r)
        print(f"| `{f}` | {100 * r['success']:.1f}% | {r['lost']} of {r['fp_successes']} | {r['gained']} | "
              f"{100 * r['kept']:.1f}% | {100 * r['agreement']:.1f}% | "
              + ", ".join(f"{t} {v['lost']}/{v['gained']}" for t, v in r["per_task"].items() if v["lost"] or v["gained"])
              + " |")
    if a.out:
        Path(a.out).write_text(json.dumps({"fp": a.fp, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
