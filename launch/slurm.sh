#!/usr/bin/env bash
# Trains on a SLURM GPU cluster: writes a batch script that runs one train process per
# node (all its GPUs) or one per GPU, and submits it with sbatch.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/slurm.sh --partition=P --nodes=N --workdir=DIR [options] [-- TRAIN_FLAGS]

Every process runs `python -m tokenflex_jax.train`; jax.distributed finds the
coordinator, the process count and each process's index from SLURM itself.

Required: --partition, --nodes, --workdir (a directory every node sees, e.g. NFS/Lustre,
or a gs:// path; then the job script and SLURM's log go to <repo>/workdirs/slurm/NAME).
Options:
  --gpus-per-node=G    GPUs per node                                      [8]
  --per-gpu            one process per GPU (default: one process per node, all its GPUs)
  --time=HH:MM:SS      wall-time limit                                    [24:00:00]
  --account=A          SLURM account
  --job-name=NAME      [tokenflex]
  --config=FILE[:ARG]  config for the train binary                        [configs/demo.py]
  --venv=DIR           Python environment on the nodes                    [<repo>/.venv]
  --dry-run            print the batch script and the sbatch command, submit nothing
  -h, --help           this help
Everything after `--` goes to the train binary, e.g. -- --config.mesh.shape='(-1,8,1)'

Example:
  bash launch/slurm.sh --partition=gpu --nodes=2 --gpus-per-node=8 \
    --workdir=/shared/runs/tokenflex1 --dry-run
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
PARTITION="" NODES="" GPUS=8 PER_GPU=0 TIME="24:00:00" ACCOUNT="" JOB="tokenflex"
declare -A VALUE_OPTIONS=([--partition]=PARTITION [--nodes]=NODES [--workdir]=WORKDIR
                          [--gpus-per-node]=GPUS [--time]=TIME [--account]=ACCOUNT
                          [--job-name]=JOB [--config]=CONFIG [--venv]=VENV)
declare -A SWITCH_OPTIONS=([--per-gpu]=PER_GPU [--dry-run]=DRY_RUN)
parse_launch_args "$@"
require PARTITION NODES WORKDIR
if ! [[ "$NODES" =~ ^[1-9][0-9]*$ && "$GPUS" =~ ^[1-9][0-9]*$ ]]; then
  echo "slurm.sh: --nodes and --gpus-per-node must be positive integers" >&2; exit 2
fi

TASKS_PER_NODE=1
GPU_LINE="#SBATCH --gpus-per-node=$GPUS"
if [[ "$PER_GPU" == 1 ]]; then
  TASKS_PER_NODE="$GPUS"
  GPU_LINE="#SBATCH --gpus-per-task=1"
fi
ACCOUNT_LINE=""
if [[ -n "$ACCOUNT" ]]; then ACCOUNT_LINE="#SBATCH --account=$ACCOUNT"; fi
TRAIN_ARGS="$(train_args)"

# One task: the train binary, its exit 75 (saved, restart me) reported as 0 with the mark
# (no single quote in it: the job script quotes it with them). The task's shell outlives a
# SIGTERM (SLURM signals every process of the step) and waits for the binary's save; the
# binary keeps its own handler (a trapped signal is reset in a child).
# shellcheck disable=SC2016  # expanded by the task's shell
TASK='trap : TERM INT; rc=0; "$@" || rc=$?; if [ "$rc" -eq 75 ]; then [ "$SLURM_PROCID" != 0 ] || touch "$MARK"; exit 0; fi; exit "$rc"'

# The job script and SLURM's log need a local path (a gs:// workdir is not one).
if [[ "$WORKDIR" == gs://* ]]; then JOB_DIR="$REPO/workdirs/slurm/$JOB"; else JOB_DIR="$WORKDIR"; fi
SCRIPT="#!/usr/bin/env bash
#SBATCH --job-name=$JOB
#SBATCH --partition=$PARTITION
#SBATCH --nodes=$NODES
#SBATCH --ntasks-per-node=$TASKS_PER_NODE
$GPU_LINE
#SBATCH --time=$TIME
#SBATCH --output=$JOB_DIR/slurm-%j.out
$ACCOUNT_LINE
# $((NODES * TASKS_PER_NODE)) processes over $((NODES * GPUS)) GPUs (with one process per GPU,
# SLURM gives each task its own GPU).
set -euo pipefail
cd $(printf '%q' "$REPO")
export PYTHONPATH=$(printf '%q' "$REPO")
# Exit 75: saved on SIGTERM / a preemption notice; run again from that checkpoint. Each
# task reports its 75 to SLURM as 0 and task 0 leaves the mark MARK: srun's
# --kill-on-bad-exit would kill a task still finishing the save once another exits 75.
export MARK=$(printf '%q' "$JOB_DIR")/.preempted-\$SLURM_JOB_ID
while :; do
  rm -f \"\$MARK\"
  srun --kill-on-bad-exit=1 bash -c '$TASK' task $(printf '%q' "$VENV")/bin/python -m tokenflex_jax.train$TRAIN_ARGS
  [ -e \"\$MARK\" ] || exit 0
  echo \"preempted (exit 75): restarting from the last checkpoint\" >&2
done
"

if [[ "$DRY_RUN" == 1 ]]; then
  printf '%s' "$SCRIPT"
  echo "+ mkdir -p $JOB_DIR && sbatch <the script above>"
  exit 0
fi
mkdir -p "$JOB_DIR"
printf '%s' "$SCRIPT" > "$JOB_DIR/slurm_job.sh"
sbatch "$JOB_DIR/slurm_job.sh"
