#!/usr/bin/env bash
# Creates (or reuses) the project's virtual environment and installs the pinned
# requirements. Sourced by demo.sh and test.sh; safe to run again (it skips the
# install when the requirement files have not changed).
#   VENV=path  where the environment lives (default: <repo>/.venv)
#   PYTHON=python3.11  the interpreter to build it from (default: python3)
#   REQUIREMENTS="requirements.txt requirements-test.txt"  the files to install
#     (default: requirements.txt; test.sh adds the test tools)
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$REPO/.venv}"
PYTHON="${PYTHON:-python3}"

if [[ ! -x "$VENV/bin/python" ]]; then
  echo "[setup] creating virtual environment $VENV"
  "$PYTHON" -m venv "$VENV"
fi
read -r -a files <<< "${REQUIREMENTS:-requirements.txt}"
for file in "${files[@]}"; do
  stamp="$VENV/.${file%.txt}.sha256"
  want="$(sha256sum "$REPO/$file" | cut -d' ' -f1)"
  if [[ ! -f "$stamp" || "$(cat "$stamp")" != "$want" ]]; then
    echo "[setup] installing the pins of $file into $VENV"
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -r "$REPO/$file"
    echo "$want" > "$stamp"
  fi
done
export PATH="$VENV/bin:$PATH"
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
