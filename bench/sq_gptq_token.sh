#!/usr/bin/env bash
# The token table's qvla-sq-gptq+lc W4A4 row on the 200 seed-1 evaluation episodes, paired with FP and the
# W4A4 rows measured there (run the table row first: bench/table.sh microvla-token 20 logits
# results/table/microvla-token-v5 core).
# Usage: bench/sq_gptq_token.sh -> results/replicate/token-w4a4-qvla-sq-gptq-lc-seed1.json, token-w4a4-sq-gptq-seed1-paired.json
set -euo pipefail
cd "$(dirname "$0")/.."
source bench/lib.sh
R=results/replicate; CK=results/table/microvla-token-v5/ckpt/w4a4-qvla-sq-gptq+lc
[ -f $CK/config.json ] || { echo "$CK is missing: make the token table's W4A4 qvla-sq-gptq+lc row first" >&2; exit 1; }
eval_once $CK $R/token-w4a4-qvla-sq-gptq-lc-seed1.json --seed 1
.venv/bin/python bench/paired.py results/fp/microvla-token-seed1.json $R/token-w4a4-qvla-sq-gptq-lc-seed1.json \
  $R/token-w4a4-smoothquant-seed1.json $R/token-w4a4-qvla-sq-gptq-lc-seed1.json \
  $R/token-w4a4-qvla-rot-gptq-lc-seed1.json $R/token-w4a4-qvla-sq-gptq-lc-seed1.json \
  --out $R/token-w4a4-sq-gptq-seed1-paired.json
