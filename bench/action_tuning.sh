#!/usr/bin/env bash
# Action-tuned scales (+at) on the chunk policy's table calibration and episodes, at W4A16 and W4A4, paired
# with the table's rows (the same plans without +at, the baselines, FP).
# Usage: bench/action_tuning.sh  -> results/ablation/chunk-v2-{w4a16,w4a4}-*-at.json, chunk-v2-at-paired.json
set -euo pipefail
cd "$(dirname "$0")/.."
T=results/table/microvla-chunk-v2
C="--policy microvla-chunk --calib $T/calib --form action"
E="--episodes-per-task 20 --workers 2"
.venv/bin/qvla quantize $C --method qvla-gptq+lc+at --w-bits 4 --a-bits 16 --out runs/chunk-v2-w4a16-qvla-gptq-lc-at
.venv/bin/qvla eval --policy runs/chunk-v2-w4a16-qvla-gptq-lc-at $E --out results/ablation/chunk-v2-w4a16-qvla-gptq-lc-at.json
.venv/bin/qvla quantize $C --method qvla-rot-gptq+lc+at --w-bits 4 --a-bits 4 --out runs/chunk-v2-w4a4-qvla-rot-gptq-lc-at
.venv/bin/qvla eval --policy runs/chunk-v2-w4a4-qvla-rot-gptq-lc-at $E --out results/ablation/chunk-v2-w4a4-qvla-rot-gptq-lc-at.json
.venv/bin/python bench/paired.py \
  $T/eval-w4a16-qvla-gptq+lc.json results/ablation/chunk-v2-w4a16-qvla-gptq-lc-at.json \
  $T/eval-w4a16-omniquant.json results/ablation/chunk-v2-w4a16-qvla-gptq-lc-at.json \
  $T/fp.json results/ablation/chunk-v2-w4a16-qvla-gptq-lc-at.json \
  $T/eval-w4a4-qvla-rot-gptq+lc.json results/ablation/chunk-v2-w4a4-qvla-rot-gptq-lc-at.json \
  $T/eval-w4a4-smoothquant.json results/ablation/chunk-v2-w4a4-qvla-rot-gptq-lc-at.json \
  $T/fp.json results/ablation/chunk-v2-w4a4-qvla-rot-gptq-lc-at.json \
  --out results/ablation/chunk-v2-at-paired.json
