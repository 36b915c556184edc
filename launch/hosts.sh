#!/usr/bin/env bash
# Trains over a plain list of hosts (GPU boxes without a scheduler): starts one train
# process per host over ssh, host 0 being the coordinator, and waits for all of them.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: bash launch/hosts.sh --hosts=H0,H1,... --workdir=DIR [options] [-- TRAIN_FLAGS]

Process i runs on host i with --coordinator_address=H0:PORT --num_processes=N
--process_id=i. Every host needs this checkout at the same path with its environment
set up (bash launch/setup_env.sh or `pip install .`) and passwordless ssh. The host
named `localhost` runs without ssh; as H0 the other hosts reach it by this machine's
name (`hostname -f`).

Required: --hosts, --workdir (a directory every host sees).
Options:
  --port=PORT          coordinator port on H0                             [8476]
  --config=FILE[:ARG]  config for the train binary                        [configs/demo.py]
  --venv=DIR           Python environment on the hosts                    [<repo>/.venv]
  --dry-run            print the commands instead of running them
  -h, --help           this help
Everything after `--` goes to the train binary.
EOF
}

# shellcheck source=launch/common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
HOSTS="" PORT=8476
declare -A VALUE_OPTIONS=([--hosts]=HOSTS [--workdir]=WORKDIR [--port]=PORT [--config]=CONFIG
                          [--venv]=VENV)
declare -A SWITCH_OPTIONS=([--dry-run]=DRY_RUN)
parse_launch_args "$@"
require HOSTS WORKDIR
IFS=',' read -r -a HOST_LIST <<< "$HOSTS"
N="${#HOST_LIST[@]}"
COORDINATOR="${HOST_LIST[0]}:$PORT"
if [[ "${HOST_LIST[0]}" == localhost && "$N" -gt 1 ]]; then  # what the others can reach
  COORDINATOR="$(hostname -f 2>/dev/null || hostname):$PORT"
fi

pids=()
for i in "${!HOST_LIST[@]}"; do
  host="${HOST_LIST[$i]}"
  cmd="cd $(printf '%q' "$REPO") && $(resuming "PYTHONPATH=$(printf '%q' "$REPO") $(printf '%q' "$VENV")/bin/python -m tokenflex_jax.train$(train_args --coordinator_address="$COORDINATOR" --num_processes="$N" --process_id="$i")")"
  if [[ "$host" == localhost ]]; then launcher=(bash -c "$cmd"); else launcher=(ssh "$host" "$cmd"); fi
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '+'; printf ' %q' "${launcher[@]}"; printf ' &\n'
  else
    "${launcher[@]}" 2>&1 | sed -u "s/^/[$host $i] /" &
    pids+=($!)
  fi
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit "$status"
