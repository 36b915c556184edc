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
  --suite=v1|v2             question families (configs/reproduce.py SUITES) [v1]
  --dev_only                evaluate on the development questions alone, report on them
                            (for choosing the recipe; no test question is asked)
  --out=DIR                 where the report goes                          [<repo>/docs]
  --archive=DIR             keep each finished run's small files (metrics, configs,
                            evaluations, router; no checkpoints) in DIR, and take the
                            runs DIR holds as finished: a reproduction spread over
                            machines or sessions, whose DIR is committed      [none]
  -h, --help                this help
Everything after `--` goes to every training stage and the evaluation (a small run:
-- --config.total_steps=4).
EOF_USAGE
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
SEEDS=3 MODELS="" EXAMPLES=1000 OUT="$REPO/docs" RUN_DIR="" SUITE=v1 ARCHIVE=""
POSITIONAL=RUN_DIR
declare -A VALUE_OPTIONS=([--seeds]=SEEDS [--models]=MODELS [--examples_per_family]=EXAMPLES
                          [--out]=OUT [--suite]=SUITE [--archive]=ARCHIVE)
DEV_ONLY=0
declare -A SWITCH_OPTIONS=([--dev_only]=DEV_ONLY)
parse_launch_args "$@"
source "$REPO/launch/setup_env.sh"
cd "$REPO"
W="$(realpath -m "${RUN_DIR:-$REPO/workdirs/reproduce}")"
OUT="$(realpath -m "$OUT")"
# The variants, and those trained at several counts: their development evaluation fits
# the router and the thresholds; a fixed-count variant's is asked only under --dev_only.
# (One Python start: importing the configs takes seconds.)
{ read -r KNOWN; read -r SEVERAL; } < <(python -c 'from configs import reproduce
print(",".join(reproduce.VARIANTS))
print(",".join(n for n, v in reproduce.VARIANTS.items() if len(v[0]) > 1))')
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
# writable DIR WHAT: DIR made and written to now, or one line naming WHAT (before hours
# of training find out).
writable() {
  local probe="$1/.reproduce-write-probe-$$"
  if ! { mkdir -p "$1" && : > "$probe" && rm -f "$probe"; } 2>/dev/null; then
    echo "$LAUNCHER: $2: cannot write to $1" >&2; exit 2
  fi
}
[[ -n "$ARCHIVE" ]] && writable "$(realpath -m "$ARCHIVE")" --archive
writable "$OUT" --out
writable "$W" "the run folder"
# merge FILE...: the lines of every FILE, each once, in order of first appearance.
merge() { { cat "$@" 2>/dev/null || true; } | awk '!seen[$0]++'; }
if [[ -n "$ARCHIVE" ]]; then
  ARCHIVE="$(realpath -m "$ARCHIVE")"
  mkdir -p "$ARCHIVE"
  # Runs finished elsewhere (through this invocation's last evaluation): their files and
  # done markers, so they are not run again.
  for f in wall_times.tsv revisions.txt; do
    merge "$W/$f" "$ARCHIVE/$f" > "$W/$f.merged"; mv "$W/$f.merged" "$W/$f"
  done
  last=eval.done; [[ "$DEV_ONLY" == 1 ]] && last=eval_dev.done
  for kept in "$ARCHIVE"/*/seed*/"$last"; do
    [[ -f "$kept" ]] || continue
    rel="$(dirname "${kept#"$ARCHIVE"/}")"
    [[ -f "$W/$rel/$last" ]] && continue
    (cd "$ARCHIVE" && find "$rel" -type f -print0 | xargs -0 cp --parents -t "$W")
  done
fi
printf '%q ' bash launch/reproduce.sh "$@" > "$W/command.txt"
echo >> "$W/command.txt"
# The code revision of every invocation that trained here (a resumed run may add one);
# "+uncommitted" where the code differs from it (not the archive or the report).
rev="$(python -c 'from tokenflex_jax import report; print(report.short_revision())')"
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
  RAN=1
  mkdir -p "$(dirname "$done_file")"; touch "$done_file"
}

# archive_run NAME SEED: a finished run's small files into $ARCHIVE (all or nothing: a run
# there counts as finished).
# The metrics keep what the report reads (each step's count, time and loss).
archive_run() {
  [[ -z "$ARCHIVE" ]] && return
  (cd "$W" && find "$1/seed$2" -type f \( -name '*.done' -o -name metrics.jsonl \
     -o -name config.json -o -name router.json -o -name index.json -o -name results.json \
     -o -name questions.npz \) -print0 | xargs -0 cp --parents -t "$ARCHIVE")
  python - "$ARCHIVE/$1/seed$2" <<'EOF_SLIM'
import glob, json, sys
KEEP = ("step", "train/num_tokens", "train/step_time_s", "train/loss")
for path in glob.glob(f"{sys.argv[1]}/*/metrics.jsonl"):
  rows = [json.loads(line) for line in open(path, encoding="utf-8")]
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      if "train/step_time_s" in row:
        f.write(json.dumps({k: row[k] for k in KEEP if k in row}) + "\n")
EOF_SLIM
  cp "$W/wall_times.tsv" "$W/revisions.txt" "$ARCHIVE/"
  check_tower
}

# The shared vision tower, trained when a run first needs it.
stage0() {
  run stage0 - stage0 python -m tokenflex_jax.pretrain_vision \
    --config="configs/reproduce.py:stage=0,suite=$SUITE" --workdir="$W/stage0" "${TRAIN_FLAGS[@]}"
  check_tower
}

# check_tower: the tower's losses must match those the archive keeps (kept on first use)
# to a relative 1e-4: every run of a reproduction starts from the same tower. Another
# processor rounds float32 otherwise (about 1e-7 relative), another tower by far more.
check_tower() {
  [[ -z "$ARCHIVE" || ! -f "$W/stage0/metrics.jsonl" ]] && return
  local kept="$ARCHIVE/stage0_losses.txt" now
  now="$(python -c 'import sys; from tokenflex_jax.studies import experiment
print(experiment.tower_losses(sys.argv[1]), end="")' "$W/stage0/metrics.jsonl")"
  if [[ ! -f "$kept" ]]; then echo "$now" > "$kept"
  elif ! python -c 'import sys; from tokenflex_jax.studies import experiment
problem = experiment.tower_difference(open(sys.argv[1]).read(), sys.argv[2])
sys.exit(problem and print(problem, file=sys.stderr) or bool(problem))' "$kept" "$now"; then
    echo "$LAUNCHER: the stage-0 tower trained here differs from $kept" >&2; exit 1
  fi
}

RAN=0  # set by run: something ran since the last report
for (( seed = 0; seed < SEEDS; seed++ )); do
  for name in "${MODEL_LIST[@]}"; do
    D="$W/$name/seed$seed"
    C="configs/reproduce.py:model=$name,seed=$seed,suite=$SUITE"
    [[ -f "$D/stage1.done" ]] || stage0
    run "$name" "$seed" stage1 python -m tokenflex_jax.train --config="$C,stage=1" \
      --workdir="$D/stage1" --config.init.vision_checkpoint="$W/stage0" "${TRAIN_FLAGS[@]}"
    run "$name" "$seed" stage2 python -m tokenflex_jax.train --config="$C,stage=2" \
      --workdir="$D/stage2" --config.init.checkpoint="$D/stage1" "${TRAIN_FLAGS[@]}"
    # The development questions first (thresholds, the router), then the test ones.
    if [[ "$DEV_ONLY" == 1 || ",$SEVERAL," == *",$name,"* ]]; then
      run "$name" "$seed" eval_dev python -m tokenflex_jax.eval --config="$C,stage=2,split=dev" \
        --workdir="$D/stage2" --config.eval.examples_per_family="$EXAMPLES" \
        --config.eval.overwrite=True "${TRAIN_FLAGS[@]}"
    fi
    if [[ "$DEV_ONLY" == 0 ]]; then
      run "$name" "$seed" eval python -m tokenflex_jax.eval --config="$C,stage=2" \
        --workdir="$D/stage2" --config.eval.examples_per_family="$EXAMPLES" \
        --config.eval.overwrite=True "${TRAIN_FLAGS[@]}"
    fi
    archive_run "$name" "$seed"
  done
  # After a seed that ran something, and after the last (a resumed invocation does not
  # redraw the report of seeds it only skipped).
  if [[ "$RAN" == 1 || $(( seed + 1 )) == "$SEEDS" ]]; then
    log "seed $seed done: writing the report to $OUT"
    python -m tokenflex_jax.report --workdir="$W" --out="$OUT" \
      --runs_revision="$(paste -sd, "$W/revisions.txt")" \
      --split="$([[ "$DEV_ONLY" == 1 ]] && echo dev || echo test)"
    RAN=0
  fi
done
log "done: $OUT/results.md"
