#!/usr/bin/env bash
# The prepared GPU check: every GPU figure in one command (docs/performance.md, "The GPU
# check"). On a lent GPU machine it installs the wheels carried in .whl/ (the list:
# launch/gpu_wheels.txt; fetched here by `bash launch/gpu_wheels.sh`) and runs
# `python -m tokenflex_jax.gpu_check` on configs/gpu_bench.py:size=1b with the image's
# python3, writing OUT/gpu.json, OUT/gpu.md and OUT/gpu_check.log within 8 minutes.
# --dry runs the same code on this CPU at tiny shapes, in the project's environment (CI).
#   bash launch/gpu_check.sh [--dry] [--out=DIR]   (OUT defaults to $OUT, else workdirs/gpu_check)
# From a session lent the device: run(command="bash launch/gpu_check.sh", carry=[".whl"],
# timeout_s=540).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DRY=0 DEST="${OUT:-$REPO/workdirs/gpu_check}"
usage() { sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --dry) DRY=1 ;;
    --out=*) DEST="${1#--out=}" ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
mkdir -p "$DEST"
DEST="$(realpath "$DEST")"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error
if [[ "$DRY" == 1 ]]; then
  REQUIREMENTS="requirements.txt requirements-test.txt"
  # shellcheck source=launch/setup_env.sh
  source "$REPO/launch/setup_env.sh"
  cd "$REPO"
  JAX_PLATFORMS=cpu exec python -m tokenflex_jax.gpu_check --dry \
    --config=configs/gpu_bench.py:size=tiny --workdir="$DEST"
fi
cd "$REPO"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$REPO"
else
  echo "gpu_check.sh: no .whl/ here: run 'bash launch/gpu_wheels.sh' and carry .whl" >&2
  export PYTHONPATH="$REPO"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
# The GPU or nothing (a run that found no GPU must fail, not measure the CPU); JAX takes
# half the GPU's memory, the PyTorch peer in the same process the rest.
export JAX_PLATFORMS=cuda,cpu XLA_PYTHON_CLIENT_MEM_FRACTION=0.5
set -o pipefail
timeout 480 python3 -m tokenflex_jax.gpu_check --config=configs/gpu_bench.py:size=1b \
  --workdir="$DEST" 2>&1 | tee "$DEST/gpu_check.log"
