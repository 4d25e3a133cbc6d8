"""Collects saved evaluation results into one markdown table (paired against full precision).

Usage: python bench/summarize.py > results/summary.md
Reads results/fp/<policy>.json(l) and every results/{qvla,rtn}/<policy>/eval-*.json(l) with its checkpoint's
config.json (method, bits). Retained = quantized success / FP success on the same episodes.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

R = Path(__file__).resolve().parent.parent / "results"


def records(summary: Path) -> dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, summary.with_suffix(".jsonl").read_text().splitlines())}


def paired_delta(fp: dict, q: dict) -> tuple[float, float]:
    """Mean paired difference in success (q - fp) and its 95 % normal-approximation half-width."""
    d = [float(q[i]["success"]) - float(fp[i]["success"]) for i in fp if i in q
         and fp[i].get("error") is None and q[i].get("error") is None]
    m = sum(d) / len(d)
    sd = math.sqrt(sum((x - m) ** 2 for x in d) / max(1, len(d) - 1))
    return m, 1.96 * sd / math.sqrt(len(d))


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
                m, hw = paired_delta(fp, records(f))
                ret = s["success_rate"] / fp_sum["success_rate"] if fp_sum["success_rate"] else float("nan")
                name = f.stem.removeprefix("eval-")
                prov = json.loads((Path(s["checkpoint"]) / "plan.json").read_text())["provenance"]
                alloc = "uniform" if method == "rtn" else f"{prov.get('solver')}, {prov.get('proxy')}"
                alloc = alloc.replace("greedy,", "chain greedy,")  # plans made before the hull greedy
                print(f"| {pol} | {method} | {name} | {alloc} | {q['average_bits']:.2f} | {100 * s['success_rate']:.1f}% | "
                      f"{100 * ret:.0f}% | {100 * m:+.1f} ± {100 * hw:.1f} pts | {len(s['errors'])} |")


if __name__ == "__main__":
    main()
