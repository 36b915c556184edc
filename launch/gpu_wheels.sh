#!/usr/bin/env bash
# Fetches the wheels of launch/gpu_wheels.txt, for the GPU machine's Python 3.12 on x86-64,
# into .whl/ at the repository's root (ignored by git; carried with `carry: [".whl"]`).
#   bash launch/gpu_wheels.sh [DIR]
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
case "${1:-}" in
  -h|--help) sed -n '2,4p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
  -*) echo "gpu_wheels.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
esac
DEST="${1:-$REPO/.whl}"
mkdir -p "$DEST"
platforms=()
for p in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 \
         manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64; do
  platforms+=(--platform "$p")
done
grep -v '^\s*\(#\|$\)' "$REPO/launch/gpu_wheels.txt" | while read -r requirement; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d "$DEST" "$requirement"
done
ls -l "$DEST"
