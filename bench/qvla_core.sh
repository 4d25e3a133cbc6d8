#!/usr/bin/env bash
# QVLA core on one policy: calibration -> sensitivity (+ proxy validation) -> plans -> closed loop.
# Usage: bench/qvla_core.sh POLICY FORM [EPISODES_PER_TASK] [WORKERS] [SETTINGS...]
#   FORM: action (continuous chunk head) or logits (token head, KL/Fisher form)
#   SETTINGS default: w8a8 w4a16 w4a4 w3a16
# Writes results/qvla/POLICY/{calib/,sensitivity*.{safetensors,json},<setting>/,eval-<setting>.json}
set -euo pipefail
cd "$(dirname "$0")/.."
P=$1; FORM=$2; N=${3:-20}; W=${4:-2}; shift $(( $# < 4 ? $# : 4 ))
SETTINGS=${*:-w8a8 w4a16 w4a4 w3a16}
R=results/qvla/$P; mkdir -p "$R"
Q=.venv/bin/qvla
[ -d "$R/calib/episodes" ] || $Q calibrate --policy "$P" --suite mt10 --episodes 10 --out "$R/calib"
$Q sensitivity --policy "$P" --calib "$R/calib" --form "$FORM" --validate 200 --suite mt10 --out "$R/sensitivity-$FORM.safetensors"
for S in $SETTINGS; do
  WB=${S#w}; WB=${WB%a*}; AB=${S#*a}
  $Q quantize --policy "$P" --method qvla --proxy product --form "$FORM" --w-bits "$WB" --a-bits "$AB" --calib "$R/calib" --out "$R/$S"
  $Q eval --policy "$R/$S" --suite mt10 --episodes-per-task "$N" --workers "$W" --out "$R/eval-$S.json"
done
