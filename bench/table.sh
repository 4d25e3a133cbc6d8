#!/usr/bin/env bash
# The results table of one policy, then the bits sweep into the same directory (the sweep reuses the
# table's FP run, calibration and W4A16 rows). Every row is paired with FP on the same episodes.
# Usage: bench/table.sh POLICY [EPISODES_PER_TASK] [FORM] [OUT] [ROWS]
#   -> OUT (default results/table/<policy>)/{table.md,sweep.png,...}
# ROWS=all (default): every baseline and every QVLA variant, then the sweep.
# ROWS=core: what the comparison needs, QVLA's rows first: QVLA at W8A8, qvla-gptq+lc at W4A16 and W3A16,
#   qvla-rot-gptq+lc and qvla-sq-gptq+lc at W4A4, then RTN / SmoothQuant at all three settings, AWQ / GPTQ / OmniQuant at W4A16
#   and OmniQuant at W4A4, then OmniQuant block by block at W4A16 and W4A4 (no variants, no sweep).
# Rerunning resumes: finished rows are kept, rows made from other policy weights are refused.
set -euo pipefail
cd "$(dirname "$0")/.."
P=$1; N=${2:-20}; FORM=${3:-action}; OUT=${4:-results/table/$P}; ROWS=${5:-all}
Q=".venv/bin/qvla table --policy $P --calib $OUT/calib --form $FORM --episodes-per-task $N --workers 2 --out $OUT"
mkdir -p "$OUT"
source bench/lib.sh
[ -f "$OUT/calib/manifest.json" ] || .venv/bin/qvla calibrate --policy "$P" --episodes 10 --out "$OUT/calib"
regen_episodes "$OUT/calib"  # a checkout keeps the manifest and sensitivities, not the observations
case $ROWS in
core)
  $Q --settings W8A8 --methods qvla
  $Q --settings W4A16,W3A16 --methods qvla-gptq+lc
  $Q --settings W4A4 --methods qvla-rot-gptq+lc,qvla-sq-gptq+lc
  $Q --settings W8A8,W4A16,W4A4 --methods rtn,smoothquant
  $Q --settings W4A16 --methods awq,gptq,omniquant
  $Q --settings W4A4 --methods omniquant
  $Q --settings W4A16,W4A4 --methods omniquant-block
  exit 0 ;;
all) ;;
*) echo "ROWS must be core or all, got '$ROWS'" >&2; exit 2 ;;
esac
$Q --settings W8A8,W4A16,W4A4 --methods rtn,smoothquant,qvla
$Q --settings W4A16 --methods awq,gptq,omniquant
$Q --settings W4A4 --methods omniquant
$Q --settings W4A16,W4A4 --methods omniquant-block
$Q --settings W8A8,W4A4 --methods qvla-sq
$Q --settings W4A16,W4A4 --methods qvla-awq
$Q --settings W4A16,W4A4 --methods quarot,qvla-rot
$Q --settings W4A4 --methods qvla-srot,qvla-rot+bc
$Q --settings W4A16,W4A4 --methods qvla-gptq,qvla-rot-gptq
$Q --settings W4A4 --methods qvla-rot-gptq+ac
$Q --settings W3A16 --methods qvla-gptq
$Q --settings W8A8 --methods qvla-gptq,qvla-rot-gptq
$Q --settings W4A16,W3A16,W2.5A16,W2A16 --methods qvla-gptq+lc
$Q --settings W4A4 --methods qvla-rot-gptq+lc,qvla-sq-gptq+lc
.venv/bin/python bench/sweep.py --policy "$P" --calib "$OUT/calib" --form "$FORM" --episodes-per-task "$N" --baselines rtn --out "$OUT"
