"""`make demo`: evaluate the shipped policies on MT10, then quantize microvla-chunk with QVLA at W8A8 and
W4A16 (calibration episodes -> sensitivities -> plan -> packed checkpoint on real kernels), evaluate those
on the same episodes, and print success next to weight memory and control-step latency."""
from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path

from qvla.evaluate import evaluate, format_table
from qvla.policies import POLICIES

QUANTIZED = {"W8A8": (8.0, 8), "W4A16": (4.0, 16)}  # setting -> (average weight bits, activation bits)
DEMO_POLICY = "microvla-chunk"


def quantize_demo(out: Path, calib_episodes: int, episodes_per_task: int, workers: int) -> dict[str, dict]:
    from qvla.bench import run_bench
    from qvla.calibrate import collect
    from qvla.quant.methods import QuantConfig
    from qvla.quant.pipeline import quantize

    calib = out / "calib"
    if not (calib / "manifest.json").is_file():
        print(f"== calibrating {DEMO_POLICY}: {calib_episodes} calibration episodes ==", flush=True)
        collect(DEMO_POLICY, "mt10", calib_episodes, calib)
    rows = {}
    for setting, (w, a) in QUANTIZED.items():
        ckpt = out / f"{DEMO_POLICY}-qvla-{setting.lower()}"
        print(f"== QVLA {setting}: sensitivity, plan, packed checkpoint -> {ckpt} ==", flush=True)
        quantize(DEMO_POLICY, QuantConfig(method="qvla", w_bits=w, a_bits=a), calib, ckpt)
        s = evaluate(str(ckpt), "mt10", episodes_per_task, 0, workers, out / f"{ckpt.name}.json")
        b = run_bench(str(ckpt), out / f"{ckpt.name}-bench.json", runs=20)
        rows[f"QVLA {setting}"] = {"summary": s, "bench": b}
    return rows


def format_compact(fp: dict, rows: dict[str, dict]) -> str:
    first = next(iter(rows.values()))["bench"]
    lines = ["| policy | success | weights (MB) | vs bf16 | control step (ms) | vs fp32 |", "|---|---|---|---|---|---|",
             f"| {DEMO_POLICY} fp32 | {100 * fp['success_rate']:.0f}% | {first['weight_bytes_fp32'] / 2**20:.2f} | 2.00x | "
             f"{first['latency_ms_fp32']:.1f} | 1.00x |"]
    for name, r in rows.items():
        s, b = r["summary"], r["bench"]
        lines.append(f"| {name} | {100 * s['success_rate']:.0f}% | {b['weight_bytes'] / 2**20:.2f} | "
                     f"{b['weight_ratio_bf16']:.2f}x | {b['latency_ms']:.1f} | {b['speedup_vs_fp32']:.2f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--episodes-per-task", type=int, default=5)
    p.add_argument("--calib-episodes", type=int, default=10)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default="results/demo")
    p.add_argument("--no-quantize", action="store_true", help="only evaluate the shipped policies")
    a = p.parse_args(argv)
    warnings.filterwarnings("ignore", module="metaworld")
    logging.basicConfig(level=logging.WARNING)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    summaries = {}
    for name in POLICIES:
        print(f"== {name}: {a.episodes_per_task} evaluation episodes per task on mt10 ==", flush=True)
        summaries[name] = evaluate(name, "mt10", a.episodes_per_task, 0, a.workers, out / f"{name}.json")
    table = format_table(summaries)
    cmd = f"python -m qvla.demo_run --episodes-per-task {a.episodes_per_task} --out {a.out}"
    text = f"# Full-precision success on mt10\n\n`{cmd}`\n\n{table}\n"
    if not a.no_quantize:
        rows = quantize_demo(out, a.calib_episodes, a.episodes_per_task, a.workers)
        compact = format_compact(summaries[DEMO_POLICY], rows)
        text += (f"\n# {DEMO_POLICY} quantized with QVLA (real kernels; {a.episodes_per_task} episodes per task, "
                 f"the same episodes as above: a small sample)\n\n{compact}\n")
        table += "\n\n" + compact
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(
        {n: {k: s[k] for k in ("success_rate", "per_task", "episodes", "errors", "control_step_ms_median")}
         for n, s in summaries.items()}, indent=1))
    print(table)
    print(f"saved {out / 'table.md'}")


if __name__ == "__main__":
    main()
