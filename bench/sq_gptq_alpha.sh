#!/usr/bin/env bash
# qvla-sq-gptq+lc's migration strength chosen in closed loop: alpha 0.3, 0.5 (the table's), 0.65 and 0.8 on the
# table's calibration set act on the 500 selection episodes (qvla select, FP run reused), and the chosen one is
# evaluated on the table's and the seed-1 evaluation episodes. Run bench/sq_gptq.sh first (alpha 0.5's runs).
# Usage: bench/sq_gptq_alpha.sh -> results/selection/chunk-v2-w4a4-sq-gptq-alpha/
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
T=results/table/microvla-chunk-v2; S=results/selection; OUT=$S/chunk-v2-w4a4-sq-gptq-alpha
regen_episodes $T/calib
Q="--policy microvla-chunk --form action --w-bits 4 --a-bits 4 --method qvla-sq-gptq+lc --calib $T/calib"
CKPTS=()
for a in 0.3 0.5 0.65 0.8; do
  ck=runs/chunk-v2-w4a4-qvla-sq-gptq-lc-alpha$a; [ $a = 0.5 ] && ck=runs/chunk-v2-w4a4-qvla-sq-gptq-lc
  build_once $ck $Q --alpha $a
  CKPTS+=($ck)
done
reuse_fp $S/chunk-v2-w4a4 $OUT
# alpha 0.5's selection-episode run is reused from bench/sq_gptq.sh's selection (the same weights and episodes)
[ -f $OUT/cand-1.json ] || { cp $S/chunk-v2-w4a4-sq-gptq/cand-0.json $OUT/cand-1.json; cp $S/chunk-v2-w4a4-sq-gptq/cand-0.jsonl $OUT/cand-1.jsonl; }
.venv/bin/qvla select --policy microvla-chunk --candidates "${CKPTS[@]}" --episodes-per-task 50 --seed 100 --workers 2 --out $OUT
CH=$(chosen $OUT)
eval_once $CH $OUT/eval-chosen.json
eval_once $CH $OUT/eval-chosen-seed1.json --seed 1
