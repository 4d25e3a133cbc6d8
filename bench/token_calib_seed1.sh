#!/usr/bin/env bash
# The token table's W4A4 rows (qvla-sq-gptq+lc, qvla-rot-gptq+lc, SmoothQuant) again from the 10 seed-1 calib
# episodes, evaluated on the table's 200 episodes (FP run copied from the table) and paired with its rows.
# Usage: bench/token_calib_seed1.sh -> results/ablation/token-v5-calib-seed1/{table.md,...}, calib-seed0-vs-seed1-paired.json
set -euo pipefail
cd "$(dirname "$0")/.."
T=results/table/microvla-token-v5; O=results/ablation/token-v5-calib-seed1
mkdir -p $O
[ -f $O/calib/manifest.json ] || .venv/bin/qvla calibrate --policy microvla-token --episodes 10 --seed 1 --out $O/calib
source bench/lib.sh
regen_episodes $O/calib
reuse_fp $T $O
.venv/bin/qvla table --policy microvla-token --calib $O/calib --form logits --episodes-per-task 20 --workers 2 --out $O \
  --settings W4A4 --methods qvla-sq-gptq+lc,qvla-rot-gptq+lc,smoothquant
P=()
for m in qvla-sq-gptq+lc qvla-rot-gptq+lc smoothquant; do P+=($T/eval-w4a4-$m.json $O/eval-w4a4-$m.json); done
.venv/bin/python bench/paired.py "${P[@]}" --out $O/calib-seed0-vs-seed1-paired.json
