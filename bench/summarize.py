"""Collects saved evaluation results into one markdown table (paired against full precision).

Usage: python bench/summarize.py > results/summary.md
Reads results/fp/<policy>.json(l) and every results/{qvla,rtn}/<policy>/eval-*.json(l) with its checkpoint's
config.json (method, bits). Retained = quantized success / FP success on the same episodes.
"""
from __future__ import annotations

import json
from pathlib import Path

from qvla.table import paired_delta, records

R = Path(__file__).resolve().parent.parent / "results"


def main() -> None:
    print("| policy | method | setting | allocation | avg bits | success | retained vs FP | Δ vs FP (95% CI) | errors |")
    print("|---|---|---|---|---|---|---|---|---|")
    for fp_file in sorted((R / "fp").glob("*.json")):
        pol = fp_file.stem
        fp_sum, fp = json.loads(fp_file.read_text()), records(fp_file)
        print(f"| {pol} | FP | W16A16 | — | 16 | {100 * fp_sum['success_rate']:.1f}% | — | — | {len(fp_sum['errors'])} |")
        for method in ("rtn", "qvla"):
            for f in sorted((R / method / pol).glob("eval-*.json")):
                s = json.loads(f.read_text())
                q = json.loads((Path(s["checkpoint"]) / "config.json").read_text())["quantization"]
                m, hw, _ = paired_delta(fp, records(f))
                ret = s["success_rate"] / fp_sum["success_rate"] if fp_sum["success_rate"] else float("nan")
                name = f.stem.removeprefix("eval-")
                prov = json.loads((Path(s["checkpoint"]) / "plan.json").read_text())["provenance"]
                alloc = "uniform" if method == "rtn" else f"{prov.get('solver')}, {prov.get('proxy')}"
                alloc = alloc.replace("greedy,", "chain greedy,")  # plans made before the hull greedy
                print(f"| {pol} | {method} | {name} | {alloc} | {q['average_bits']:.2f} | {100 * s['success_rate']:.1f}% | "
                      f"{100 * ret:.0f}% | {100 * m:+.1f} ± {100 * hw:.1f} pts | {len(s['errors'])} |")


if __name__ == "__main__":
    main()
