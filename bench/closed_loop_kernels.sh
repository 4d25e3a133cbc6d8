#!/bin/bash
# Real-kernel vs fake-quant closed loop on the same evaluation episodes, plus qvla bench, for one QVLA setting.
# usage: bench/closed_loop_kernels.sh POLICY CALIB W_BITS A_BITS EPISODES_PER_TASK
# writes results/kernels/POLICY/w{W}a{A}/ (checkpoint), eval-real.json(l), eval-simulated.json(l), bench.json
set -euo pipefail
P=$1 CALIB=$2 W=$3 A=$4 N=$5
Q=${QVLA:-.venv/bin/qvla}
D=results/kernels/$P/w${W}a${A}
mkdir -p "$D"
[ -f "$D/ckpt/config.json" ] || $Q quantize --policy "$P" --method qvla --w-bits "$W" --a-bits "$A" --calib "$CALIB" --out "$D/ckpt"
for K in real simulated; do
  [ -f "$D/eval-$K.json" ] || $Q eval --policy "$D/ckpt" --kernels $K --episodes-per-task "$N" --workers 2 --out "$D/eval-$K.json"
done
$Q bench --policy "$D/ckpt" --out "$D/bench.json"
