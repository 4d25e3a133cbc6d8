#!/usr/bin/env bash
# The budget-4 plan at W4A8: the setting that runs faster than bf16 at the prefill as well as at one token on a CPU
# whose int8 rate is only ~2x its bf16 rate (bench/scale.py: qvla-4-a8), measured in closed loop on the table's
# evaluation episodes, paired with FP and with the table's W4A16 and W4A4 QVLA rows.
# Usage: bench/w4a8.sh [POLICY] [FORM] [TABLE]   (default microvla-chunk action results/table/microvla-chunk-v2)
#   -> TABLE/eval-w4a8-qvla-gptq+lc.json(l), TABLE/bench-w4a8-qvla-gptq+lc.json, results/ablation/<policy>-w4a8-paired.json
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
P=${1:-microvla-chunk} FORM=${2:-action} T=${3:-results/table/microvla-chunk-v2}
regen_episodes "$T/calib"
CK=runs/$(basename "$T")-w4a8-qvla-gptq+lc; E=$T/eval-w4a8-qvla-gptq+lc.json
build_once "$CK" --policy "$P" --method qvla-gptq+lc --w-bits 4 --a-bits 8 --form "$FORM" --calib "$T/calib"
eval_once "$CK" "$E"  # refuses a kept evaluation of other weights
.venv/bin/qvla bench --policy "$CK" --out "$T/bench-w4a8-qvla-gptq+lc.json"
mkdir -p results/ablation
.venv/bin/python bench/paired.py "$T/fp.json" "$E" "$T/eval-w4a16-qvla-gptq+lc.json" "$E" \
  "$T/eval-w4a4-qvla-sq-gptq+lc.json" "$E" --out "results/ablation/$(basename "$T")-w4a8-paired.json"
