#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs the pinned
# requirements. Sourced by demo.sh and test.sh; safe to run again (it skips the
# install when requirements.txt has not changed).
#   VENV=path  where the environment lives (default: <repo>/.venv)
#   PYTHON=python3.11  the interpreter to build it from (default: python3)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
stamp="$VENV/.requirements.sha256"
want="$(sha256sum "$REPO/requirements.txt" | cut -d' ' -f1)"
if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
  echo "[setup] installing pinned requirements into $VENV"
  "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REPO/requirements.txt"
  echo "$want" > "$stamp"
fi
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
