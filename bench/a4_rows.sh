#!/usr/bin/env bash
# The W4A4 rows of both policies' core tables (QVLA first, then RTN / SmoothQuant / OmniQuant), into the
# tables bench/table.sh made. Rerunning resumes.
# Usage: bench/a4_rows.sh [EPISODES_PER_TASK]
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-20}
for spec in "microvla-token logits results/table/microvla-token-v4" "microvla-chunk action results/table/microvla-chunk-v2"; do
  set -- $spec
  Q=".venv/bin/qvla table --policy $1 --calib $3/calib --form $2 --episodes-per-task $N --workers 2 --out $3"
  $Q --settings W4A4 --methods qvla-rot-gptq+lc
  $Q --settings W4A4 --methods rtn,smoothquant,omniquant
done
