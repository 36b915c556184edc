#!/usr/bin/env bash
# Trains on a Cloud TPU VM slice: create it, put the code on every worker, start the
# train binary on all workers at once, stream the logs, delete it.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/tpu_pod.sh COMMAND --project=P --zone=Z --name=N [options] [-- TRAIN_FLAGS]

Commands:
  create   create the slice (a queued resource with --queued, needed for large slices)
  setup    copy this checkout to every worker and install the pinned package there
  train    start `python -m tokenflex_jax.train` on all workers at once (--worker=all),
           then stream worker 0's log; each worker finds the others itself
           (jax.distributed on a TPU pod needs no coordinator flags)
  logs     stream worker 0's training log until the run ends
  delete   delete the slice (and its queued resource)
  all      create, setup, train, delete

Required: --project, --zone, --name.
Options:
  --accelerator=TYPE   slice type, e.g. v5p-64 (32 chips, 8 hosts), v4-32   [v5p-8]
  --version=RUNTIME    TPU VM software version                             [v2-alpha-tpuv5]
  --queued             create through a queued resource (waits for capacity)
  --spot               spot capacity
  --config=FILE[:ARG]  config for the train binary                         [configs/demo.py]
  --workdir=DIR        run directory every worker sees: a gs:// bucket path (or NFS);
                       required by `train`
  --dry-run            print the commands instead of running them
  -h, --help           this help
Everything after `--` goes to the train binary, e.g. -- --config.batch_size=1024

Example (prints what it would do):
  bash launch/tpu_pod.sh all --project=my-proj --zone=us-east5-a --name=tokenflex \
    --accelerator=v5p-64 --queued --workdir=gs://my-bucket/run1 --dry-run
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
COMMAND="" PROJECT="" ZONE="" NAME="" ACCEL="v5p-8" VERSION="v2-alpha-tpuv5" QUEUED=0 SPOT=0
declare -A VALUE_OPTIONS=([--project]=PROJECT [--zone]=ZONE [--name]=NAME
                          [--accelerator]=ACCEL [--version]=VERSION [--config]=CONFIG
                          [--workdir]=WORKDIR)
declare -A SWITCH_OPTIONS=([--queued]=QUEUED [--spot]=SPOT [--dry-run]=DRY_RUN)
POSITIONAL=COMMAND
parse_launch_args "$@"

case "$COMMAND" in
  create|setup|train|logs|delete|all) ;;
  "") echo "tpu_pod.sh: missing COMMAND (see --help)" >&2; exit 2 ;;
  *) echo "tpu_pod.sh: unknown command '$COMMAND' (see --help)" >&2; exit 2 ;;
esac
require PROJECT ZONE NAME
if [[ "$COMMAND" == train || "$COMMAND" == all ]] && [[ -z "$WORKDIR" ]]; then
  echo "tpu_pod.sh: --workdir is required to train (a directory every worker sees)" >&2
  exit 2
fi

REMOTE_DIR="tokenflex_jax"           # on each worker, relative to the home directory
LOG="train.log"
GCLOUD=(gcloud compute tpus)
WHERE=(--project="$PROJECT" --zone="$ZONE")

# Runs a command, or prints it (shell-quoted) under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'; printf ' %q' "$@"; printf '\n'
  else
    "$@"
  fi
}

ssh_all() {
  run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=all --command="$1"
}

create() {
  local extra=()
  if [[ "$SPOT" == 1 ]]; then extra+=(--spot); fi
  if [[ "$QUEUED" == 1 ]]; then
    run "${GCLOUD[@]}" queued-resources create "$NAME" "${WHERE[@]}" --node-id="$NAME" \
      --accelerator-type="$ACCEL" --runtime-version="$VERSION" "${extra[@]}"
    echo "[tpu_pod] waiting for queued resource $NAME to become ACTIVE"
    if [[ "$DRY_RUN" == 0 ]]; then
      until [[ "$("${GCLOUD[@]}" queued-resources describe "$NAME" "${WHERE[@]}" \
                 --format='value(state.state)')" == ACTIVE ]]; do sleep 30; done
    fi
  else
    run "${GCLOUD[@]}" tpu-vm create "$NAME" "${WHERE[@]}" --accelerator-type="$ACCEL" \
      --version="$VERSION" "${extra[@]}"
  fi
}

setup() {
  local tarball="/tmp/tokenflex_jax-$NAME.tar.gz"
  run git -C "$REPO" archive --format=tar.gz -o "$tarball" HEAD
  run "${GCLOUD[@]}" tpu-vm scp "$tarball" "$NAME:tokenflex_jax.tar.gz" "${WHERE[@]}" --worker=all
  # The pinned requirements plus libtpu for the pinned jax; then the package itself.
  ssh_all "set -e; rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR && tar xzf tokenflex_jax.tar.gz -C $REMOTE_DIR && python3 -m venv venv && venv/bin/pip install -q -r $REMOTE_DIR/requirements.txt && venv/bin/pip install -q \"jax[tpu]==\$(venv/bin/python -c 'import jax; print(jax.__version__)')\" && venv/bin/pip install -q --no-deps ./$REMOTE_DIR"
}

train() {
  # Restarted on exit 75 (saved on a preemption notice); stops on any other failure.
  ssh_all "cd $REMOTE_DIR && nohup bash -c $(printf '%q' "$(resuming "../venv/bin/python -m tokenflex_jax.train$(train_args)")") > ../$LOG 2>&1 &"
  logs
}

# Follows worker 0's log until its training process exits (then `all` deletes the slice).
logs() {
  run "${GCLOUD[@]}" tpu-vm ssh "$NAME" "${WHERE[@]}" --worker=0 --command="pid=\$(pgrep -o -f 'tokenflex_jax[.]train'); if [ -n \"\$pid\" ]; then tail -n +1 -F --pid=\$pid $LOG; else cat $LOG; fi"
}

delete() {
  if [[ "$QUEUED" == 1 ]]; then
    run "${GCLOUD[@]}" queued-resources delete "$NAME" "${WHERE[@]}" --force --quiet
  else
    run "${GCLOUD[@]}" tpu-vm delete "$NAME" "${WHERE[@]}" --quiet
  fi
}

case "$COMMAND" in
  all) create; setup; train; delete ;;
  *) "$COMMAND" ;;
esac
