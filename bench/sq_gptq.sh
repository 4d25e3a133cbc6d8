#!/usr/bin/env bash
# qvla-sq-gptq (SmoothQuant's migration as the measured transform, GPTQ at the planned bits) at W4A4 on the
# chunk policy, against the table's W4A4 rows (qvla-rot-gptq+lc and SmoothQuant) on the table's 200 evaluation
# episodes, and against QVLA's and SmoothQuant's selected checkpoints on the 200 seed-1 ones.
# Usage: bench/sq_gptq.sh  -> results/ablation/chunk-v2-w4a4-qvla-sq-gptq+lc{,-seed1}.json, chunk-v2-sq-gptq-paired.json
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
T=results/table/microvla-chunk-v2; AB=results/ablation; S=results/selection
CK=runs/chunk-v2-w4a4-qvla-sq-gptq-lc
regen_episodes $T/calib
build_once $CK --policy microvla-chunk --form action --w-bits 4 --a-bits 4 --method qvla-sq-gptq+lc --calib $T/calib
eval_once $CK $AB/chunk-v2-w4a4-qvla-sq-gptq+lc.json
eval_once $CK $AB/chunk-v2-w4a4-qvla-sq-gptq+lc-seed1.json --seed 1
.venv/bin/python bench/paired.py \
  $T/fp.json $AB/chunk-v2-w4a4-qvla-sq-gptq+lc.json \
  $T/eval-w4a4-qvla-rot-gptq+lc.json $AB/chunk-v2-w4a4-qvla-sq-gptq+lc.json \
  $T/eval-w4a4-smoothquant.json $AB/chunk-v2-w4a4-qvla-sq-gptq+lc.json \
  results/fp/shift/microvla-chunk-shift2-seed1.json $AB/chunk-v2-w4a4-qvla-sq-gptq+lc-seed1.json \
  $S/chunk-v2-w4a4/eval-chosen-seed1.json $AB/chunk-v2-w4a4-qvla-sq-gptq+lc-seed1.json \
  $S/chunk-v2-w4a4-smoothquant/eval-chosen-seed1.json $AB/chunk-v2-w4a4-qvla-sq-gptq+lc-seed1.json \
  --out $AB/chunk-v2-sq-gptq-paired.json
