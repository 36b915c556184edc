#!/usr/bin/env bash
# The paper's experiment in miniature: fixed-token models against TokenFLEX and its
# ablations, several seeds, one shared stage-0 vision tower, then docs/results.md.
set -euo pipefail

usage() {
  cat <<'EOF_USAGE'
Usage: bash launch/reproduce.sh [WORKDIR] [options] [-- TRAIN_FLAGS]

Trains every variant of configs/reproduce.py (stage 1 then stage 2 of the demo's recipe)
for each seed, from one stage-0 vision tower in WORKDIR/stage0, evaluates each at
64/100/144/196/256 visual tokens and writes the report (results.md, results.json and
plots). Seeds run in order, so after each seed the report covers every variant.
Re-running resumes: a finished stage or evaluation is skipped, an interrupted one
resumes from its checkpoint. WORKDIR defaults to ./workdirs/reproduce.

Options:
  --seeds=N                 seeds 0..N-1                                   [3]
  --models=A,B,...          variants to run (configs/reproduce.py)         [all]
  --examples_per_family=N   eval questions per family                      [1000]
  --out=DIR                 where the report goes                          [<repo>/docs]
  -h, --help                this help
Everything after `--` goes to every training stage and the evaluation (a small run:
-- --config.total_steps=4).
EOF_USAGE
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SEEDS=3 MODELS="" EXAMPLES=1000 OUT="$REPO/docs" RUN_DIR="" POSITIONAL=RUN_DIR
declare -A VALUE_OPTIONS=([--seeds]=SEEDS [--models]=MODELS
                          [--examples_per_family]=EXAMPLES [--out]=OUT)
declare -A SWITCH_OPTIONS=()
parse_launch_args "$@"
source "$REPO/launch/setup_env.sh"
cd "$REPO"
W="$(realpath -m "${RUN_DIR:-$REPO/workdirs/reproduce}")"
OUT="$(realpath -m "$OUT")"
KNOWN="$(python -c 'from configs import reproduce; print(",".join(reproduce.VARIANTS))')"
MODELS="${MODELS:-$KNOWN}"
IFS=',' read -r -a MODEL_LIST <<< "$MODELS"
for name in "${MODEL_LIST[@]}"; do
  if [[ ",$KNOWN," != *",$name,"* ]]; then
    echo "$LAUNCHER: --models: unknown variant '$name'; known: $KNOWN" >&2; exit 2
  fi
done
if [[ ! "$SEEDS" =~ ^[1-9][0-9]*$ ]]; then
  echo "$LAUNCHER: --seeds must be a positive integer, got '$SEEDS'" >&2; exit 2
fi
mkdir -p "$W"
printf '%q ' bash launch/reproduce.sh "$@" > "$W/command.txt"
echo >> "$W/command.txt"
# The code revision of every invocation that trained here (a resumed run may add one).
rev="$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)"
if ! git -C "$REPO" diff --quiet HEAD 2>/dev/null; then rev="$rev+uncommitted"; fi
grep -qxF "$rev" "$W/revisions.txt" 2>/dev/null || echo "$rev" >> "$W/revisions.txt"
start=$(date +%s)
log() { echo "[reproduce $(( $(date +%s) - start ))s] $*"; }

# run NAME SEED STAGE CMD...: runs CMD unless WORKDIR/NAME/seedSEED/STAGE.done exists,
# then records its wall time in WORKDIR/wall_times.tsv.
run() {
  local name=$1 seed=$2 stage=$3; shift 3
  local done_file="$W/$name/seed$seed/$stage.done"
  [[ "$name" == stage0 ]] && done_file="$W/stage0.done"
  if [[ -f "$done_file" ]]; then return; fi
  log "$name seed $seed: $stage"
  local t0; t0=$(date +%s)
  "$@"
  printf '%s\t%s\t%s\t%s\n' "$name" "$seed" "$stage" "$(( $(date +%s) - t0 ))" \
    >> "$W/wall_times.tsv"
  mkdir -p "$(dirname "$done_file")"; touch "$done_file"
}

run stage0 - stage0 python -m tokenflex_jax.pretrain_vision \
  --config=configs/reproduce.py:stage=0 --workdir="$W/stage0" "${TRAIN_FLAGS[@]}"
for (( seed = 0; seed < SEEDS; seed++ )); do
  for name in "${MODEL_LIST[@]}"; do
    D="$W/$name/seed$seed"
    C="configs/reproduce.py:model=$name,seed=$seed"
    run "$name" "$seed" stage1 python -m tokenflex_jax.train --config="$C,stage=1" \
      --workdir="$D/stage1" --config.init.vision_checkpoint="$W/stage0" "${TRAIN_FLAGS[@]}"
    run "$name" "$seed" stage2 python -m tokenflex_jax.train --config="$C,stage=2" \
      --workdir="$D/stage2" --config.init.checkpoint="$D/stage1" "${TRAIN_FLAGS[@]}"
    run "$name" "$seed" eval python -m tokenflex_jax.eval --config="$C,stage=2" \
      --workdir="$D/stage2" --config.eval.examples_per_family="$EXAMPLES" \
      --config.eval.overwrite=True "${TRAIN_FLAGS[@]}"
  done
  log "seed $seed done: writing the report to $OUT"
  python -m tokenflex_jax.report --workdir="$W" --out="$OUT" \
    --runs_revision="$(paste -sd, "$W/revisions.txt")"
done
log "done: $OUT/results.md"
