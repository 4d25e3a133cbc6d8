#!/usr/bin/env bash
# Action tuning on the states the quantized policy reaches (DAgger-style +at), on the chunk policy at W4A4 and
# W4A16: the table's QVLA checkpoint is rebuilt, acts on the 10 calibration episodes (`qvla calibrate
# --acting`), and +at then fits the full-precision actions on the table's calibration steps and on those
# acted steps (`--tune-on`); the plan (bits, codes) stays the table's. Paired with the table's rows.
# Usage: bench/onpolicy_tuning.sh [SETTINGS]  (default "w4a4 w4a16")
#   -> results/ablation/chunk-v2-<s>-*-at-acted.json, chunk-v2-at-acted-paired.json,
#      results/ablation/chunk-v2-at-acted/<s>/{calib-manifest.json,plan.json}
set -euo pipefail
cd "$(dirname "$0")/.."
T=results/table/microvla-chunk-v2
C="--policy microvla-chunk --calib $T/calib --form action"
E="--episodes-per-task 20 --workers 2"
declare -A METHOD=([w4a4]=qvla-rot-gptq [w4a16]=qvla-gptq) ABITS=([w4a4]=4 [w4a16]=16)
PAIRS=()
for S in ${1:-w4a4 w4a16}; do
  M=${METHOD[$S]}; A=${ABITS[$S]}; R=runs/chunk-v2-$S-$M-lc; N=chunk-v2-$S-$M-lc-at-acted
  [ -f $R/config.json ] || .venv/bin/qvla quantize $C --method $M+lc --w-bits 4 --a-bits $A --out $R
  .venv/bin/python - "$R" "$T/eval-$S-$M+lc.json" <<'PY'
import hashlib, json, sys
w = hashlib.sha256(open(f"{sys.argv[1]}/model.safetensors", "rb").read()).hexdigest()
if w != json.load(open(sys.argv[2]))["weights_sha256"]:
    sys.exit(f"{sys.argv[1]} is not the checkpoint {sys.argv[2]} evaluated")
PY
  [ -f runs/calib-chunk-v2-acted-$S/manifest.json ] || \
    .venv/bin/qvla calibrate --policy microvla-chunk --acting $R --episodes 10 --out runs/calib-chunk-v2-acted-$S
  .venv/bin/qvla quantize $C --method $M+lc+at --w-bits 4 --a-bits $A --tune-on runs/calib-chunk-v2-acted-$S --out runs/$N
  .venv/bin/qvla eval --policy runs/$N $E --out results/ablation/$N.json
  mkdir -p results/ablation/chunk-v2-at-acted/$S
  cp runs/calib-chunk-v2-acted-$S/manifest.json results/ablation/chunk-v2-at-acted/$S/calib-manifest.json
  cp runs/$N/plan.json results/ablation/chunk-v2-at-acted/$S/plan.json
  PAIRS+=($T/eval-$S-$M+lc.json results/ablation/$N.json $T/eval-$S-smoothquant.json results/ablation/$N.json
          $T/eval-$S-omniquant.json results/ablation/$N.json $T/fp.json results/ablation/$N.json)
done
.venv/bin/python bench/paired.py "${PAIRS[@]}" --out results/ablation/chunk-v2-at-acted-paired.json
