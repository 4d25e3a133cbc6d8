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

# the calibration observations are not kept in git: each directory must have been regenerated first
need_episodes() {
  for d in "$@"; do
    [ -d $d/episodes ] || { echo "$d lacks its episodes: qvla calibrate --policy microvla-chunk with the manifest's"\
      "--episodes/--seed into an empty directory, then copy its episodes/ there" >&2; exit 1; }
  done
}
