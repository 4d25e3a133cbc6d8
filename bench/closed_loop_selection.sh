#!/usr/bin/env bash
# Closed-loop selection on the chunk policy: QVLA checkpoints made from other calibration episodes and by the
# method's variants (the candidates, the table's own plan first) act on the calib split at suite seed $SEED
# (`qvla select`: episodes none of them was calibrated on, and never evaluation ones); the one with the most
# successes is chosen. Every candidate is also evaluated on the table's 200 evaluation episodes, to see
# whether the selection episodes predict them (bench/selection_vs_eval.py).
# Usage: bench/closed_loop_selection.sh [w4a4|w4a16]   (env N: selection episodes per task, default 50; SEED 100)
#   -> results/selection/chunk-v2-<s>/{fp,cand-<k>}.json(l), selection.json, eval-<name>.json, vs-eval.json,
#      eval-chosen-seed1.json, chosen-seed1-paired.json
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
S=${1:-w4a4}; N=${N:-50}; SEED=${SEED:-100}
T=results/table/microvla-chunk-v2; AB=results/ablation; OUT=results/selection/chunk-v2-$S
CAL30=$AB/chunk-v2-calib30/calib; CALS1=$AB/chunk-v2-calib-seed1/calib
declare -A METHOD=([w4a4]=qvla-rot-gptq [w4a16]=qvla-gptq) ABITS=([w4a4]=4 [w4a16]=16)
M=${METHOD[$S]}; A=${ABITS[$S]}
regen_episodes $T/calib $CAL30 $CALS1
Q="--policy microvla-chunk --form action --w-bits 4 --a-bits $A"
# name | checkpoint | how it is made (the first is the table's plan, rebuilt by the table's command into runs/:
# the table's ckpt/ is not kept in git, and a rebuild there would no longer match the table's kept evaluations;
# +at ones come from bench/action_tuning.sh and bench/onpolicy_tuning.sh)
CANDS=(
  "table|runs/chunk-v2-$S-$M-lc|$Q --method $M+lc --calib $T/calib"
  "calib-seed1|runs/sel/$S-seed1|$Q --method $M+lc --calib $CALS1"
  "calib30|runs/sel/$S-calib30|$Q --method $M+lc --calib $CAL30"
  "lcl|runs/sel/$S-lcl|$Q --method $M+lcl --calib $T/calib"
  "energy|runs/sel/$S-energy|$Q --method $M --proxy energy --calib $T/calib"
  "at|runs/chunk-v2-$S-$M-lc-at|"
  "at-acted|runs/chunk-v2-$S-$M-lc-at-acted|"
)
mkdir -p $OUT
CKPTS=(); EVALS=()
for c in "${CANDS[@]}"; do
  IFS='|' read -r name ck how <<<"$c"
  if [ ! -f $ck/config.json ]; then
    [ -n "$how" ] || { echo "$ck is missing: make it with bench/action_tuning.sh / bench/onpolicy_tuning.sh" >&2; exit 1; }
    build_once $ck $how
  fi
  E=$OUT/eval-$name.json
  eval_once $ck $E
  CKPTS+=($ck); EVALS+=($E)
done
.venv/bin/qvla select --policy microvla-chunk --candidates "${CKPTS[@]}" --episodes-per-task $N --seed $SEED \
  --workers 2 --out $OUT
BASE=()
for b in smoothquant omniquant gptq; do [ -f $T/eval-$S-$b.json ] && BASE+=($T/eval-$S-$b.json); done
.venv/bin/python bench/selection_vs_eval.py $OUT --evals "${EVALS[@]}" --fp $T/fp.json --baselines "${BASE[@]}" \
  --out $OUT/vs-eval.json
# the chosen checkpoint again on the seed-1 evaluation episodes, paired with FP and the rows measured there
FP1=results/fp/shift/microvla-chunk-shift2-seed1.json
CH=$(chosen $OUT)
eval_once $CH $OUT/eval-chosen-seed1.json --seed 1
PAIRS=($FP1 $OUT/eval-chosen-seed1.json)
for b in smoothquant $M-lc; do
  R1=results/replicate/chunk-$S-$b-seed1.json; [ -f $R1 ] && PAIRS+=($R1 $OUT/eval-chosen-seed1.json)
done
.venv/bin/python bench/paired.py "${PAIRS[@]}" --out $OUT/chosen-seed1-paired.json
