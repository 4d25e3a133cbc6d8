#!/usr/bin/env bash
# Full-precision closed-loop success of the shipped policies on mt10 (20 evaluation episodes per task).
# Usage: bench/fp_eval.sh [EPISODES_PER_TASK] [WORKERS]   -> results/fp/<policy>.json(+.jsonl)
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}; W=${2:-2}
mkdir -p results/fp
for P in microvla-chunk microvla-token; do
  .venv/bin/qvla eval --policy "$P" --suite mt10 --episodes-per-task "$N" --workers "$W" --out "results/fp/$P.json"
done
