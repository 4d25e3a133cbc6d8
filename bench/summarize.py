"""Collects saved closed-loop results into one markdown table, each row paired against full precision on the
same evaluation episodes.

Usage: python bench/summarize.py > results/summary.md
Reads every results/table/<dir>[/<sub>]/table.json and results/ablation/<dir>/table.json (the rows `qvla table`
wrote, with its FP run) and every results/ablation/<policy-prefix>-*.json evaluation, paired with the FP run of the table directory of the
same policy and seed (results/table/microvla-<chunk|token>[-seed<S>]/fp.json).
"""
from __future__ import annotations

import json
from pathlib import Path

from qvla.table import paired_delta, records

R = Path(__file__).resolve().parent.parent / "results"
HEAD = ("| policy | episodes (seed) | setting | method | avg bits | success | retained vs FP | Δ vs FP (95% CI) "
        "| errors | source |")


def line(policy: str, seed: int, setting: str, method: str, bits, fp_rate: float, rate: float, delta: float,
         ci: float, errors: int, source: str) -> str:
    ret = f"{100 * rate / fp_rate:.0f}%" if fp_rate else "—"
    b = f"{bits:.2f}" if isinstance(bits, (int, float)) else "—"
    return (f"| {policy} | eval ({seed}) | {setting} | {method} | {b} | {100 * rate:.1f}% | {ret} | "
            f"{100 * delta:+.1f} ± {100 * ci:.1f} | {errors} | `{source}` |")


def table_rows(d: Path) -> list[str]:
    t = json.loads((d / "table.json").read_text())
    fp = json.loads((d / "fp.json").read_text())
    seed = fp.get("seed", 0)
    out = [f"| {t['policy']} | eval ({seed}) | W16A16 | FP | 16 | {100 * t['fp']:.1f}% | — | — | "
           f"{len(fp['errors'])} | `{(d / 'fp.json').relative_to(R.parent)}` |"]
    for r in t["rows"]:
        out.append(line(t["policy"], seed, r["setting"], r["method"], r.get("average_bits"), t["fp"], r["success_rate"],
                        r["delta"], r["delta_ci95"], r["errors"], r["eval"]))
    return out


def ablation_rows() -> list[str]:
    out = []
    for f in sorted((R / "ablation").glob("*.json")):
        if not f.with_suffix(".jsonl").is_file():
            continue  # not an evaluation (e.g. a layer-calibration report)
        s = json.loads(f.read_text())
        parts = f.stem.split("-")
        policy = "microvla-" + parts[0]
        seed = f"-seed{s['seed']}" if s.get("seed") else ""
        # the table the ablation was made from: 'token-v5-...' -> microvla-token-v5, else 'token-...' -> microvla-token
        tables = [R / "table" / f"microvla-{'-'.join(parts[:k])}{seed}" / "fp.json" for k in (2, 1)]
        fp_file = next((t for t in tables if t.is_file()), None)
        cfg = R.parent / s["checkpoint"] / "config.json"  # absent where the checkpoint was not kept
        if "quantization" in s:  # recorded by the evaluation (None: a full-precision checkpoint)
            quant = s["quantization"] or {}
        else:
            quant = (json.loads(cfg.read_text()).get("quantization") if cfg.is_file() else None) or {}
        source = quant.get("source_weights_sha256")
        fp = json.loads(fp_file.read_text()) if fp_file else None
        if fp and source and fp.get("weights_sha256") != source:
            fp = None  # that table's FP ran other weights than this checkpoint was made from
        if fp is None:
            out.append(f"| {policy} | eval ({s.get('seed')}) | — | {f.stem} | — | {100 * s['success_rate']:.1f}% | — | "
                       f"no FP run on these episodes | {len(s['errors'])} | `{f.relative_to(R.parent)}` |")
            continue
        m, hw, _ = paired_delta(records(fp_file), records(f))
        bits = quant.get("average_bits")
        out.append(line(policy, s.get("seed", 0), "ablation", f.stem, bits, fp["success_rate"], s["success_rate"],
                        m, hw, len(s["errors"]), str(f.relative_to(R.parent))))
    return out


def main() -> None:
    print(HEAD)
    print("|" + "---|" * (HEAD.count("|") - 1))
    # archived rows (a4-symmetric/) and ablation tables (chunk-v2-calib30/) too
    tables = [*(R / "table").glob("**/table.json"), *(R / "ablation").glob("*/table.json")]
    for d in sorted(p.parent for p in tables):
        print("\n".join(table_rows(d)))
    print("\n".join(ablation_rows()))


if __name__ == "__main__":
    main()
