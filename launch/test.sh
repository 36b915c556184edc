#!/usr/bin/env bash
# Sets up the environment and runs the test suite on 8 simulated host devices.
#   bash launch/test.sh              fast suite (what CI runs)
#   bash launch/test.sh --all        also the slow end-to-end tests
#   bash launch/test.sh -k sharding  extra arguments go to pytest
# TEST_WORKERS=N: pytest processes for the first part (default: the cores, at most 4).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS="requirements.txt requirements-test.txt requirements-tpu.txt"
# shellcheck source=launch/setup_env.sh
source "$REPO/launch/setup_env.sh"
cd "$REPO"
only="not slow and "
if [[ "${1:-}" == "--all" ]]; then only=""; shift; fi
cores="$(nproc)"
workers="${TEST_WORKERS:-$(( cores < 4 ? cores : 4 ))}"
# Two parts. First every test not marked serial, one test file per worker at a time (a
# single pytest process mostly compiles, on one core). Then those marked serial (several
# processes of one job) alone. pytest's exit status 5 means "no test selected": fine for
# one part (-k), returned when neither part selects a test.
status=5
run_part() {
  local rc=0
  python -m pytest -q --durations=20 "$@" tests || rc=$?
  if [[ $rc -ne 5 && $status -eq 5 ]] || [[ $rc -ne 0 && $rc -ne 5 ]]; then status=$rc; fi
}
run_part -n "$workers" --dist loadfile -m "${only}not serial" "$@"
run_part -m "${only}serial" "$@"
exit "$status"
