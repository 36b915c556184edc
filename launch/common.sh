#!/usr/bin/env bash
# The argument parsing shared by the cluster launchers (hosts.sh, slurm.sh, tpu_pod.sh);
# sourced by them, not run. Each launcher declares its options, then calls
# parse_launch_args "$@":
#   VALUE_OPTIONS   --name=VALUE options: option -> the variable it sets
#   SWITCH_OPTIONS  bare switches: option -> the variable set to 1
#   POSITIONAL      the variable the one positional argument goes to ("": none allowed)
# Everything after `--` lands in TRAIN_FLAGS, passed on untouched: a launcher must not
# add a tuple-valued --config.* flag of its own, since ml_collections concatenates a
# tuple field given twice instead of keeping the last value.

# Defaults every launcher shares (each may override them before parsing).
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC2034  # VENV, DRY_RUN: read by the launchers that source this file
VENV="${VENV:-$REPO/.venv}" CONFIG="configs/demo.py" WORKDIR="" DRY_RUN=0 POSITIONAL=""
TRAIN_FLAGS=()
LAUNCHER="$(basename "$0")"

# Parses the launcher's arguments into the variables its option tables name; prints the
# launcher's usage and exits 0 on -h/--help, exits 2 with a message on anything unknown.
parse_launch_args() {
  local key
  while [[ $# -gt 0 ]]; do
    key="${1%%=*}"
    if [[ "$1" == -h || "$1" == --help ]]; then
      usage; exit 0
    elif [[ "$1" == --* && "$1" == *=* && -n "${VALUE_OPTIONS[$key]:-}" ]]; then
      printf -v "${VALUE_OPTIONS[$key]}" '%s' "${1#*=}"
    elif [[ -n "$1" && -n "${SWITCH_OPTIONS[$1]:-}" ]]; then
      printf -v "${SWITCH_OPTIONS[$1]}" '%s' 1
    elif [[ "$1" == -- ]]; then
      shift; TRAIN_FLAGS=("$@"); break
    elif [[ -z "$POSITIONAL" ]]; then
      echo "$LAUNCHER: unknown argument $1 (see --help)" >&2; exit 2
    elif [[ "$1" == -* ]]; then
      echo "$LAUNCHER: unknown option $1 (see --help)" >&2; exit 2
    elif [[ -z "${!POSITIONAL}" ]]; then
      printf -v "$POSITIONAL" '%s' "$1"
    else
      echo "$LAUNCHER: unexpected argument $1 (see --help)" >&2; exit 2
    fi
    shift
  done
}

# require VAR...: exits 2 naming --var for the first one that is empty.
require() {
  local required
  for required in "$@"; do
    if [[ -z "${!required}" ]]; then
      echo "$LAUNCHER: --${required,,} is required (see --help)" >&2; exit 2
    fi
  done
}

# resuming CMD: the shell command line CMD in a loop that runs it again while it exits
# with 75, the train binary's "saved on SIGTERM or a preemption notice: restart me"
# (tokenflex_jax/errors.py); it ends with CMD's status otherwise (0 when done). POSIX sh,
# safe under `set -e`, so it works in a batch script and over ssh alike.
resuming() {
  # shellcheck disable=SC2016  # $? and $rc belong to the shell that runs the loop
  printf 'while :; do %s && exit 0 || rc=$?; [ "$rc" -eq 75 ] || exit "$rc"; echo "preempted (exit 75): restarting from the last checkpoint" >&2; done' "$1"
}

# The train binary's arguments, each shell-quoted with a leading space: --config,
# --workdir, then the given extra flags (none is fine), then the user's TRAIN_FLAGS.
# shellcheck disable=SC2120,SC2119
train_args() {
  printf ' %q' --config="$CONFIG" --workdir="$WORKDIR" "$@" "${TRAIN_FLAGS[@]}"
}
