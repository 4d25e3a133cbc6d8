#!/usr/bin/env bash
# The energy proxy (sum_n ||J dy||^2, --proxy energy) against the table's default (projected, with layer
# calibration) on the chunk policy's table episodes, at W4A16 and W4A4; paired with the table's rows.
# Usage: bench/energy_proxy.sh  -> results/ablation/chunk-v2-{w4a16,w4a4}-energy*.json
set -euo pipefail
cd "$(dirname "$0")/.."
T=results/table/microvla-chunk-v2
C="--policy microvla-chunk --calib $T/calib --form action --proxy energy"
E="--episodes-per-task 20 --workers 2"
.venv/bin/qvla quantize $C --method qvla-gptq --w-bits 4 --a-bits 16 --out runs/chunk-v2-w4a16-qvla-gptq-energy
.venv/bin/qvla eval --policy runs/chunk-v2-w4a16-qvla-gptq-energy $E --out results/ablation/chunk-v2-w4a16-qvla-gptq-energy.json
.venv/bin/qvla quantize $C --method qvla-rot-gptq --w-bits 4 --a-bits 4 --out runs/chunk-v2-w4a4-qvla-rot-gptq-energy
.venv/bin/qvla eval --policy runs/chunk-v2-w4a4-qvla-rot-gptq-energy $E --out results/ablation/chunk-v2-w4a4-qvla-rot-gptq-energy.json
.venv/bin/python bench/paired.py \
  $T/eval-w4a16-qvla-gptq+lc.json results/ablation/chunk-v2-w4a16-qvla-gptq-energy.json \
  $T/eval-w4a16-omniquant.json results/ablation/chunk-v2-w4a16-qvla-gptq-energy.json \
  $T/eval-w4a4-qvla-rot-gptq+lc.json results/ablation/chunk-v2-w4a4-qvla-rot-gptq-energy.json \
  $T/eval-w4a4-smoothquant.json results/ablation/chunk-v2-w4a4-qvla-rot-gptq-energy.json \
  $T/fp.json results/ablation/chunk-v2-w4a4-qvla-rot-gptq-energy.json \
  --out results/ablation/chunk-v2-energy-paired.json
