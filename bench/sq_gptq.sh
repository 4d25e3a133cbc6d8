#!/usr/bin/env bash
# qvla-sq-gptq+lc (SmoothQuant's migration as the measured transform, GPTQ at the planned bits, layer-calibrated
# sensitivities) at W4A4 on the chunk policy, made from each of the three calibration sets QVLA's closed-loop
# selection uses:
#  1. each plan on the table's 200 evaluation episodes, paired with FP and the table's W4A4 rows (rotated QVLA,
#     SmoothQuant, OmniQuant);
#  2. the table-calibration plan on the 200 seed-1 episodes, paired with FP, SmoothQuant's table plan and the
#     selected QVLA / SmoothQuant checkpoints there;
#  3. the three on the 500 selection episodes (qvla select, FP run reused from QVLA's selection), paired with
#     QVLA's and SmoothQuant's candidates there (needs bench/closed_loop_selection.sh w4a4 and
#     bench/baseline_selection.sh w4a4-smoothquant first); over all 900 episodes against SmoothQuant; and
#     qvla bench of the smoothed and the rotated table-calibration plans.
# Usage: bench/sq_gptq.sh  -> results/ablation/chunk-v2-w4a4-qvla-sq-gptq+lc*.json, chunk-v2-sq-gptq*-paired.json,
#   chunk-v2-sq-gptq-vs-smoothquant{,-chosen}-900.json, bench-chunk-v2-w4a4-qvla-{sq,rot}-gptq+lc.json,
#   results/kernels/chunk-v2-w4a4-qvla-sq-gptq+lc-{simulated,real-vs-simulated}.json,
#   results/selection/chunk-v2-w4a4-sq-gptq/
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
T=results/table/microvla-chunk-v2; AB=results/ablation; S=results/selection; R=results/replicate
CAL30=$AB/chunk-v2-calib30/calib; CALS1=$AB/chunk-v2-calib-seed1/calib
regen_episodes $T/calib $CAL30 $CALS1
Q="--policy microvla-chunk --form action --w-bits 4 --a-bits 4 --method qvla-sq-gptq+lc"
CK=runs/chunk-v2-w4a4-qvla-sq-gptq-lc; E=$AB/chunk-v2-w4a4-qvla-sq-gptq+lc
build_once $CK $Q --calib $T/calib
build_once $CK-seed1 $Q --calib $CALS1
build_once $CK-calib30 $Q --calib $CAL30
eval_once $CK $E.json
eval_once $CK-seed1 $E-calib-seed1.json
eval_once $CK-calib30 $E-calib30.json
eval_once $CK $E-seed1.json --seed 1
P=()
for e in $E.json $E-calib-seed1.json $E-calib30.json; do
  P+=($T/fp.json $e $T/eval-w4a4-qvla-rot-gptq+lc.json $e $T/eval-w4a4-smoothquant.json $e $T/eval-w4a4-omniquant.json $e)
done
.venv/bin/python bench/paired.py "${P[@]}" --out $AB/chunk-v2-sq-gptq-paired.json
.venv/bin/python bench/paired.py \
  results/fp/shift/microvla-chunk-shift2-seed1.json $E-seed1.json $R/chunk-w4a4-smoothquant-seed1.json $E-seed1.json \
  $R/chunk-w4a4-qvla-rot-gptq-lc-seed1.json $E-seed1.json \
  $S/chunk-v2-w4a4/eval-chosen-seed1.json $E-seed1.json $S/chunk-v2-w4a4-smoothquant/eval-chosen-seed1.json $E-seed1.json \
  --out $AB/chunk-v2-sq-gptq-seed1-paired.json
OUT=$S/chunk-v2-w4a4-sq-gptq
reuse_fp $S/chunk-v2-w4a4 $OUT
.venv/bin/qvla select --policy microvla-chunk --candidates $CK $CK-seed1 $CK-calib30 --episodes-per-task 50 \
  --seed 100 --workers 2 --out $OUT
P=()
for k in 0 1 2; do P+=($S/chunk-v2-w4a4/cand-$k.json $OUT/cand-$k.json $S/chunk-v2-w4a4-smoothquant/cand-$k.json $OUT/cand-$k.json); done
.venv/bin/python bench/paired.py "${P[@]}" --out $OUT/vs-qvla-rot-and-smoothquant.json
# the table-calibration plan against SmoothQuant's table plan and its selected checkpoint over all 900 episodes
FPS="$T/fp.json results/fp/shift/microvla-chunk-shift2-seed1.json $S/chunk-v2-w4a4/fp.json"
.venv/bin/python bench/selected_vs_selected.py --fp $FPS --qvla $E.json $E-seed1.json $OUT/cand-0.json \
  --baseline $T/eval-w4a4-smoothquant.json $R/chunk-w4a4-smoothquant-seed1.json $S/chunk-v2-w4a4-smoothquant/cand-0.json \
  --out $AB/chunk-v2-sq-gptq-vs-smoothquant-900.json
.venv/bin/python bench/selected_vs_selected.py --fp $FPS --qvla $E.json $E-seed1.json $OUT/cand-0.json \
  --baseline $S/chunk-v2-w4a4-smoothquant/eval-chosen.json $S/chunk-v2-w4a4-smoothquant/eval-chosen-seed1.json \
  $S/chunk-v2-w4a4-smoothquant/cand-2.json --out $AB/chunk-v2-sq-gptq-vs-smoothquant-chosen-900.json
# speed: the smoothed and the rotated table-calibration plans benched one after the other on this CPU
ROT=runs/chunk-v2-w4a4-qvla-rot-gptq-lc
build_once $ROT --policy microvla-chunk --form action --w-bits 4 --a-bits 4 --method qvla-rot-gptq+lc --calib $T/calib
.venv/bin/qvla bench --policy $CK --out $AB/bench-chunk-v2-w4a4-qvla-sq-gptq+lc.json
.venv/bin/qvla bench --policy $ROT --out $AB/bench-chunk-v2-w4a4-qvla-rot-gptq+lc.json
# the same checkpoint on the fake-quant path, paired with its real-kernel run on the table's episodes
K=results/kernels/chunk-v2-w4a4-qvla-sq-gptq+lc
eval_once $CK $K-simulated.json --kernels simulated
.venv/bin/python bench/paired.py $E.json $K-simulated.json --out $K-real-vs-simulated.json
