# Shared by the selection benches (sourced, not run).
# eval_once CKPT FILE [qvla eval args]: evaluates CKPT at 20 episodes per task unless FILE already holds an
# evaluation of these very weights; one of other weights (a checkpoint rebuilt since) is refused, never reused.
eval_once() {
  local ck=$1 file=$2; shift 2
  if [ -f $file ]; then
    .venv/bin/python -c "import json,sys; from qvla.checkpoint import sha256
found, now = json.load(open(sys.argv[2])).get('weights_sha256'), sha256(sys.argv[1] + '/model.safetensors')
sys.exit(0 if found == now else f'{sys.argv[2]} was made from other weights than {sys.argv[1]} holds: delete it')" $ck $file
  else .venv/bin/qvla eval --policy $ck --episodes-per-task 20 --workers 2 "$@" --out $file; fi
}

# build_once CKPT QUANTIZE-ARGS...: qvla quantize into CKPT unless it is there
build_once() {
  local ck=$1; shift
  [ -f $ck/config.json ] || .venv/bin/qvla quantize "$@" --out $ck
}

# regen_episodes DIR...: the calibration observations are not kept in git; rebuild a calibration directory's
# episodes/ (qvla calibrate is deterministic) with the episode count, seed and suite its manifest records, and
# refuse the result unless it was made by the same policy weights and its episodes are the manifest's (ids, policy
# calls, outcomes, and the observations' sha256 where the manifest records one). A refused or failed rebuild
# leaves nothing behind and returns 1.
regen_episodes() {
  local d tmp n seed policy suite
  for d in "$@"; do
    [ -d "$d/episodes" ] && continue
    mkdir -p runs
    tmp=$(mktemp -d runs/regen.XXXX)
    read -r n seed policy suite < <(.venv/bin/python -c "import json,sys; m = json.load(open(sys.argv[1]))
print(len(m['episodes']), m['seed'], m['policy'], m['suite'])" "$d/manifest.json")
    if .venv/bin/qvla calibrate --policy "$policy" --suite "$suite" --episodes "$n" --seed "$seed" --out "$tmp/calib" \
        && .venv/bin/python bench/same_episodes.py "$tmp/calib/manifest.json" "$d/manifest.json"; then
      mv "$tmp/calib/episodes" "$d/episodes"
      rm -rf "$tmp"
    else
      rm -rf "$tmp"
      echo "regen_episodes: could not rebuild $d/episodes" >&2
      return 1
    fi
  done
}

# reuse_fp FROM TO: TO's FP run is FROM's (fp.json and its .jsonl), unless TO has one; qvla select and qvla table
# check it again (same weights, same episodes) before using it
reuse_fp() {
  mkdir -p $2
  for f in fp.json fp.jsonl; do [ -f $2/$f ] || cp $1/$f $2/$f; done
}

# chosen DIR: the checkpoint qvla select chose into DIR
chosen() {
  .venv/bin/python -c "import json,sys; print(json.load(open(sys.argv[1]))['chosen'])" $1/selection.json
}
