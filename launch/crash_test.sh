#!/usr/bin/env bash
# The crash harness: trains the demo config, SIGKILLs it N times (some inside an
# asynchronous checkpoint save), restarts it each time and compares with an
# uninterrupted run (docs/failures.md). The last line reads
# `N kills (M during a save): bit-identical=true|false`.
#   bash launch/crash_test.sh [--kills=N] [--workdir=DIR] [-- HARNESS FLAGS [-- TRAIN FLAGS]]
# e.g. bash launch/crash_test.sh --kills=10 --workdir=/tmp/crash -- --total_steps=60
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
KILLS=10 WORKDIR="" FLAGS=()
usage() { sed -n '2,7p' "$0" | sed 's/^# \{0,1\}//'; }
while [[ $# -gt 0 ]]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --kills=*) KILLS="${1#--kills=}" ;;
    --workdir=*) WORKDIR="${1#--workdir=}" ;;
    --) shift; FLAGS=("$@"); break ;;
    *) echo "crash_test.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done
# shellcheck source=launch/setup_env.sh
source "$REPO/launch/setup_env.sh"
cd "$REPO"
if [[ -z "$WORKDIR" ]]; then WORKDIR="$(mktemp -d "${TMPDIR:-/tmp}/crash_test.XXXXXX")"; fi
WORKDIR="$(realpath -m "$WORKDIR")"
echo "crash_test.sh: workdir $WORKDIR"
exec python -m tokenflex_jax.crash_test --workdir="$WORKDIR" --kills="$KILLS" \
  ${FLAGS[@]+"${FLAGS[@]}"}
