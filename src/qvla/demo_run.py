"""`make demo`: evaluate the shipped policies on MT10 and save a per-task table under results/."""
from __future__ import annotations

import argparse
import json
import logging
import os
import warnings
from pathlib import Path

from qvla.evaluate import evaluate, format_table
from qvla.policies import POLICIES


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--episodes-per-task", type=int, default=5)
    p.add_argument("--workers", type=int, default=min(2, os.cpu_count() or 1))
    p.add_argument("--out", default="results/demo")
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
    (out / "table.md").write_text(f"# Full-precision success on mt10\n\n`{cmd}`\n\n{table}\n")
    (out / "summary.json").write_text(json.dumps(
        {n: {k: s[k] for k in ("success_rate", "per_task", "episodes", "errors", "control_step_ms_median")}
         for n, s in summaries.items()}, indent=1))
    print(table)
    print(f"saved {out / 'table.md'}")


if __name__ == "__main__":
    main()
