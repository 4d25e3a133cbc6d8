"""`make demo`: evaluate the shipped policies on MT10, then quantize microvla-chunk with QVLA at W8A8 and
W4A16 and with the RTN / SmoothQuant baselines (calibration episodes -> sensitivities -> plan -> packed
checkpoint on real kernels), evaluate those on the same episodes, and print a compact results table:
success next to weight memory and control-step speed."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import warnings
from pathlib import Path

from qvla.evaluate import evaluate, format_table
from qvla.policies import POLICIES

# The compact results table: (settings, methods) groups, each run as one `qvla table` into the same directory.
# QVLA at W8A8 and W4A16 is the demo's main result; W4A4 shows where activation outliers hurt the baselines,
# against QVLA's best W4A4 form on both policies (sensitivities measured on SmoothQuant-smoothed layers, GPTQ
# rounding at the planned bits; no run-time rotation).
COMPACT = [(["W8A8", "W4A16"], ["rtn", "qvla"]), (["W4A4"], ["rtn", "smoothquant", "qvla-sq-gptq"])]
DEMO_POLICY = "microvla-chunk"


def compact_table(fp_summary: Path, out: Path, calib_episodes: int, episodes_per_task: int, workers: int) -> str:
    """Quantize the demo policy with QVLA and two baselines, evaluate every row on the FP run's episodes
    (real kernels), bench memory and speed; returns the table's markdown."""
    from qvla.table import run_table

    shutil.rmtree(out, ignore_errors=True)  # a demo's table is made anew from the shipped policies every run
    out.mkdir(parents=True)
    for suffix in (".json", ".jsonl"):  # the FP run above is the table's FP row: same episodes, not rerun
        shutil.copyfile(fp_summary.with_suffix(suffix), (out / "fp").with_suffix(suffix))
    for settings, methods in COMPACT:
        print(f"== {DEMO_POLICY}: {', '.join(methods)} at {', '.join(settings)} -> {out} ==", flush=True)
        run_table(DEMO_POLICY, settings, methods, episodes_per_task, out, calib_episodes=calib_episodes,
                  workers=workers)
    return (out / "table.md").read_text().split("\n", 2)[2]  # drop the heading; the caller labels it


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
        compact = compact_table(out / f"{DEMO_POLICY}.json", out / "table", a.calib_episodes,
                                a.episodes_per_task, a.workers)
        label = (f"{DEMO_POLICY} quantized (compact table: {a.episodes_per_task} episodes per task, a small "
                 f"sample; the full table at 20 per task is `qvla table`, see the README)")
        text += f"\n# {label}\n\n{compact}\n"
        table += f"\n\n{label}\n\n{compact}"
    (out / "table.md").write_text(text)
    (out / "summary.json").write_text(json.dumps(
        {n: {k: s[k] for k in ("success_rate", "per_task", "episodes", "errors", "control_step_ms_median")}
         for n, s in summaries.items()}, indent=1))
    print(table)
    print(f"saved {out / 'table.md'}")


if __name__ == "__main__":
    main()
