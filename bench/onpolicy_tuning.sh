#!/usr/bin/env bash
# Action tuning on the states the quantized policy reaches (DAgger-style +at), on the chunk policy at W4A4 and
# W4A16: the table's QVLA checkpoint is rebuilt, acts on the 10 calibration episodes (`qvla calibrate
# --acting`), and +at then fits the full-precision actions on the table's calibration steps and on those
# acted steps (`--tune-on`); the plan (bits, codes) stays the table's. Paired with the table's rows.
# Other policies: P=microvla-token TAG=token-v5 T=results/table/microvla-token-v5 FORM=logits.
# Usage: [CPU=label] bench/onpolicy_tuning.sh [SETTINGS]  (default "w4a4 w4a16"; CPU names a rebuilt base row)
# Where this machine does not rebuild the table's checkpoint bit for bit (GPTQ's solves round differently in the
# last bits on another CPU), the rebuilt one is evaluated too and is the base row of the pairs.
#   -> results/ablation/<tag>-<s>-*-at-acted.json, <tag>-at-acted-paired.json (tag chunk-v2 by default),
#      results/ablation/<tag>-at-acted/<s>/{calib-manifest.json,plan.json}
set -euo pipefail
cd "$(dirname "$0")/.."
P=${P:-microvla-chunk}; TAG=${TAG:-chunk-v2}; T=${T:-results/table/microvla-chunk-v2}; FORM=${FORM:-action}
C="--policy $P --calib $T/calib --form $FORM"
E="--episodes-per-task 20 --workers 2"
declare -A METHOD=([w4a4]=qvla-rot-gptq [w4a16]=qvla-gptq) ABITS=([w4a4]=4 [w4a16]=16)
PAIRS=()
same() {  # is evaluation $2 of checkpoint $1 (its weights' hash)? exits 2 on anything but yes or no
  .venv/bin/python - "$1" "$2" <<'PY'
import hashlib, json, sys
w = hashlib.sha256(open(f"{sys.argv[1]}/model.safetensors", "rb").read()).hexdigest()
sys.exit(0 if w == json.load(open(sys.argv[2]))["weights_sha256"] else 1)
PY
  local rc=$?; [ $rc -le 1 ] || exit 2; return $rc
}
for S in ${1:-w4a4 w4a16}; do
  M=${METHOD[$S]}; A=${ABITS[$S]}; R=runs/$TAG-$S-$M-lc; N=$TAG-$S-$M-lc-at-acted
  [ -f $R/config.json ] || .venv/bin/qvla quantize $C --method $M+lc --w-bits 4 --a-bits $A --out $R
  # the base row: the table's evaluation if this machine rebuilds its checkpoint bit for bit, else the rebuilt one's
  B=$T/eval-$S-$M+lc.json
  if ! same $R $B; then
    B=results/ablation/$TAG-$S-$M-lc-rebuilt-${CPU:-here}.json
    [ -f $B ] || .venv/bin/qvla eval --policy $R $E --out $B
    same $R $B || { echo "$B was not made from $R; move it aside" >&2; exit 1; }
  fi
  D=runs/calib-$TAG-acted-$S
  if [ ! -f results/ablation/$N.json ]; then  # rerunning keeps finished rows
    acted=$(.venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['acted_by']['weights_sha256'])" \
            $D/manifest.json 2>/dev/null || true)
    [ "$acted" = "$(sha256sum $R/model.safetensors | cut -d' ' -f1)" ] || { rm -rf $D
      .venv/bin/qvla calibrate --policy $P --acting $R --episodes 10 --out $D; }
    .venv/bin/qvla quantize $C --method $M+lc+at --w-bits 4 --a-bits $A --tune-on $D --out runs/$N
    .venv/bin/qvla eval --policy runs/$N $E --out results/ablation/$N.json
    mkdir -p results/ablation/$TAG-at-acted/$S
    cp $D/manifest.json results/ablation/$TAG-at-acted/$S/calib-manifest.json
    cp runs/$N/plan.json results/ablation/$TAG-at-acted/$S/plan.json
  fi
  # +at on the table's steps alone (bench/action_tuning.sh, run on the same machine: the same plan), and the acted steps' +at
  AT=results/ablation/$TAG-$S-$M-lc-at.json
  [ ! -f $AT ] || PAIRS+=($B $AT $AT results/ablation/$N.json)
  PAIRS+=($B results/ablation/$N.json $T/eval-$S-smoothquant.json results/ablation/$N.json
          $T/eval-$S-omniquant.json results/ablation/$N.json $T/fp.json results/ablation/$N.json)
done
.venv/bin/python bench/paired.py "${PAIRS[@]}" --out results/ablation/$TAG-at-acted-paired.json
