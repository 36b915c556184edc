#!/usr/bin/env bash
# The main job: set up the environment, train the demo TokenFLEX model on the
# embedded procedural VQA suite, and evaluate it at every visual-token budget.
#   bash launch/demo.sh [WORKDIR]          (default WORKDIR: ./workdirs/demo)
# Extra arguments after WORKDIR go to every stage and the evaluation, e.g.
#   bash launch/demo.sh /tmp/demo --config.batch_size=16
# Re-running resumes: finished stages are skipped by their own checkpoints.
set -euo pipefail
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
  sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; exit 0
fi
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$REPO/launch/setup_env.sh"
WORKDIR="$(realpath -m "${1:-$REPO/workdirs/demo}")"
shift || true
cd "$REPO"
mkdir -p "$WORKDIR"
start=$(date +%s)
log() { echo "[demo $(( $(date +%s) - start ))s] $*"; }

log "stage 0: vision pre-training -> $WORKDIR/stage0"
python -m tokenflex_jax.pretrain_vision --config=configs/demo.py:stage=0 \
  --workdir="$WORKDIR/stage0" "$@"
log "stage 1: alignment (ViT frozen) -> $WORKDIR/stage1"
python -m tokenflex_jax.train --config=configs/demo.py:stage=1 --workdir="$WORKDIR/stage1" \
  --config.init.vision_checkpoint="$WORKDIR/stage0" "$@"
log "stage 2: full TokenFLEX tuning -> $WORKDIR/stage2"
python -m tokenflex_jax.train --config=configs/demo.py:stage=2 --workdir="$WORKDIR/stage2" \
  --config.init.checkpoint="$WORKDIR/stage1" "$@"
log "evaluating at every visual-token budget"
# A rerun evaluates again (the same checkpoint, the same results) instead of refusing.
python -m tokenflex_jax.eval --config=configs/demo.py:stage=2 --workdir="$WORKDIR/stage2" \
  --config.eval.overwrite=True "$@"
results="$(find "$WORKDIR/stage2/eval/scenes" -maxdepth 1 -name 'step_*' | sort -V | tail -n 1)"
log "done. Results: $results/results.md and accuracy.png"
cat "$results/results.md"
