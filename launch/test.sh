#!/usr/bin/env bash
# Sets up the environment and runs the test suite on 8 simulated host devices.
#   bash launch/test.sh              fast suite (what CI runs)
#   bash launch/test.sh --all        also the slow end-to-end tests
#   bash launch/test.sh -k sharding  extra arguments go to pytest
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
REQUIREMENTS="requirements.txt requirements-test.txt requirements-tpu.txt"
# shellcheck source=launch/setup_env.sh
source "$REPO/launch/setup_env.sh"
cd "$REPO"
marker=(-m "not slow")
if [[ "${1:-}" == "--all" ]]; then marker=(); shift; fi
exec python -m pytest -q --durations=20 "${marker[@]}" "$@" tests
