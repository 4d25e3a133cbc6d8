"""Two evaluations of the same episodes, paired: B - A with its 95 % interval, the discordant episodes and
McNemar's exact p. For comparisons the results table does not make (e.g. one method on two formats).

Usage: python bench/paired.py A.json B.json [A2.json B2.json ...] [--out FILE.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from qvla.table import head_to_head, records


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("evals", nargs="+", help="pairs of evaluation summaries (A B A B ...)")
    ap.add_argument("--out")
    a = ap.parse_args()
    if len(a.evals) % 2:
        raise SystemExit("give evaluations in pairs: A B [A B ...]")
    rows = []
    print("| A | B | success A | success B | Δ (B − A, 95% CI) | B-only / A-only successes | McNemar p |")
    print("|---|---|---|---|---|---|---|")
    for fa, fb in zip(a.evals[::2], a.evals[1::2]):
        h = head_to_head(records(fb), records(fa))
        sa, sb = (json.loads(Path(f).read_text())["success_rate"] for f in (fa, fb))
        rows.append({"a": fa, "b": fb, "success_a": sa, "success_b": sb, **h})
        print(f"| `{fa}` | `{fb}` | {100 * sa:.1f} | {100 * sb:.1f} | {100 * h['delta']:+.1f} ± "
              f"{100 * h['delta_ci95']:.1f} | {h['wins']} / {h['losses']} | {h['p']:.3f} |")
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
