#!/usr/bin/env bash
# The benchmark: sets up the environment (with the PyTorch peer's torch and
# transformers, from requirements-test.txt) and runs `python -m tokenflex_jax.bench` on
# configs/bench.py, writing OUT/bench.json and OUT/bench.md (docs/performance.md).
#   bash launch/bench.sh [--out=DIR] [--config=FILE] [-- BENCH FLAGS...]
# e.g. bash launch/bench.sh --out=/tmp/bench -- --rounds=5 --nopeer --config.batch_size=8
# Run it alone on the machine: it measures wall-clock time.
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="$REPO/workdirs/bench" CONFIG="configs/bench.py" FLAGS=()
usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --out=*) OUT="${1#--out=}" ;;
    --config=*) CONFIG="${1#--config=}" ;;
    --) shift; FLAGS=("$@"); break ;;
    *) echo "bench.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
REQUIREMENTS="requirements.txt requirements-test.txt"
# shellcheck source=launch/setup_env.sh
source "$REPO/launch/setup_env.sh"
cd "$REPO"
OUT="$(realpath -m "$OUT")"
exec python -m tokenflex_jax.bench --config="$CONFIG" --workdir="$OUT" ${FLAGS[@]+"${FLAGS[@]}"}
