#!/usr/bin/env bash
# The closed-loop selection of bench/closed_loop_selection.sh, given to a baseline: its candidates, made from the
# same three calibration sets as QVLA's and with the method's own setting varied, act on the same selection
# episodes (calib split, suite seed $SEED, the FP run reused from QVLA's selection), and `qvla select` chooses
# one. The chosen checkpoint is then evaluated on the table's 200 episodes and the 200 seed-1 ones and set
# against QVLA's chosen plan there (bench/selected_vs_selected.py): procedure against procedure.
# Usage: bench/baseline_selection.sh w4a4-smoothquant|w4a4-omniquant|w4a16-omniquant|w4a16-gptq
#   (run bench/closed_loop_selection.sh for the setting first)
#   -> results/selection/chunk-v2-<set>/{fp,cand-<k>}.json(l), selection.json, eval-chosen.json,
#      eval-chosen-seed1.json, vs-qvla.json, vs-qvla-with-selection.json
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
S=$1; N=${N:-50}; SEED=${SEED:-100}
SETTING=${S%%-*}; OUT=results/selection/chunk-v2-$S; QSEL=results/selection/chunk-v2-$SETTING
T=results/table/microvla-chunk-v2; AB=results/ablation
CAL30=$AB/chunk-v2-calib30/calib; CALS1=$AB/chunk-v2-calib-seed1/calib
regen_episodes $T/calib $CAL30 $CALS1
[ -f $QSEL/selection.json ] || { echo "run bench/closed_loop_selection.sh $SETTING first" >&2; exit 1; }
declare -A ABITS=([w4a4]=4 [w4a16]=16)
Q="--policy microvla-chunk --form action --w-bits 4 --a-bits ${ABITS[$SETTING]}"
# name | how it is made; the first is the table's row (its default setting on the table's calibration set)
case $S in
  w4a4-smoothquant) CANDS=(  # SmoothQuant's one setting is its migration strength alpha (paper: 0.5, up to 0.85)
    "table|--method smoothquant --calib $T/calib" "calib-seed1|--method smoothquant --calib $CALS1"
    "calib30|--method smoothquant --calib $CAL30" "alpha0.3|--method smoothquant --alpha 0.3 --calib $T/calib"
    "alpha0.65|--method smoothquant --alpha 0.65 --calib $T/calib"
    "alpha0.8|--method smoothquant --alpha 0.8 --calib $T/calib"
    "alpha0.9|--method smoothquant --alpha 0.9 --calib $T/calib") ;;
  w4a16-omniquant) CANDS=(  # trained per layer (the table's row) or block by block as in its paper
    "table|--method omniquant --calib $T/calib" "calib-seed1|--method omniquant --calib $CALS1"
    "calib30|--method omniquant --calib $CAL30" "block|--method omniquant-block --calib $T/calib"
    "block-seed1|--method omniquant-block --calib $CALS1" "block-calib30|--method omniquant-block --calib $CAL30") ;;
  w4a4-omniquant) CANDS=(  # LWC + LET, per layer and block by block
    "table|--method omniquant --calib $T/calib" "calib-seed1|--method omniquant --calib $CALS1"
    "calib30|--method omniquant --calib $CAL30" "block|--method omniquant-block --calib $T/calib"
    "block-seed1|--method omniquant-block --calib $CALS1" "block-calib30|--method omniquant-block --calib $CAL30") ;;
  w4a16-gptq) CANDS=(  # GPTQ has no setting of its own to vary here: the three calibration sets
    "table|--method gptq --calib $T/calib" "calib-seed1|--method gptq --calib $CALS1"
    "calib30|--method gptq --calib $CAL30") ;;
  *) echo "unknown set $S: w4a4-smoothquant, w4a4-omniquant, w4a16-omniquant or w4a16-gptq" >&2; exit 1 ;;
esac
mkdir -p $OUT
CKPTS=()
for c in "${CANDS[@]}"; do
  IFS='|' read -r name how <<<"$c"
  ck=runs/sel/$S-$name
  build_once $ck $Q $how
  CKPTS+=($ck)
done
reuse_fp $QSEL $OUT
.venv/bin/qvla select --policy microvla-chunk --candidates "${CKPTS[@]}" --episodes-per-task $N --seed $SEED \
  --workers 2 --out $OUT
CH=$(chosen $OUT)
eval_once $CH $OUT/eval-chosen.json
eval_once $CH $OUT/eval-chosen-seed1.json --seed 1
# QVLA's chosen plan on the same two sets: its evaluation among its candidates' (found by its weights)
QEV=$(.venv/bin/python -c "
import json, sys, pathlib
sel = json.load(open(sys.argv[1] + '/selection.json')); w = sel['candidates'][sel['chosen_index']]['weights_sha256']
print(next(f for f in sorted(pathlib.Path(sys.argv[1]).glob('eval-*.json'))
           if f.name != 'eval-chosen-seed1.json' and json.load(open(f)).get('weights_sha256') == w))" $QSEL)
.venv/bin/python bench/selected_vs_selected.py --fp $T/fp.json results/fp/shift/microvla-chunk-shift2-seed1.json \
  --qvla $QEV $QSEL/eval-chosen-seed1.json --baseline $OUT/eval-chosen.json $OUT/eval-chosen-seed1.json \
  --out $OUT/vs-qvla.json
# the same with the selection episodes as a third set (each chosen checkpoint's score there is the one it was
# chosen for, so it leans its way): all 900 episodes together
idx() { .venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen_index'])" $1/selection.json; }
.venv/bin/python bench/selected_vs_selected.py --fp $T/fp.json results/fp/shift/microvla-chunk-shift2-seed1.json \
  $QSEL/fp.json --qvla $QEV $QSEL/eval-chosen-seed1.json $QSEL/cand-$(idx $QSEL).json --baseline $OUT/eval-chosen.json \
  $OUT/eval-chosen-seed1.json $OUT/cand-$(idx $OUT).json --out $OUT/vs-qvla-with-selection.json
