"""Real multi-process JAX on 127.0.0.1 (gloo collectives): every host draws the same
bucket at every step, and 2 processes train exactly like 1."""

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

from tests.tiny import TINY_FLAGS, losses
from tests.xla_env import REPO, binary_env
from tokenflex_jax import errors
from tokenflex_jax.training import checkpointing

# Two processes of one job must not share the 2 cores with another test's work: their
# coordination waits on the slower one (launch/test.sh runs these alone).
pytestmark = pytest.mark.serial


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _no_cache(env: dict[str, str]) -> dict[str, str]:
  """``env`` without the suite's shared compilation cache (conftest.py): it buys
  nothing here, and processes of one multi-process run would share its entries."""
  return {k: v for k, v in env.items() if not k.startswith("JAX_PERSISTENT_CACHE")
          and k != "JAX_COMPILATION_CACHE_DIR"}


def test_bucket_choice_identical_across_processes(tmp_path):
  out, port, n = str(tmp_path / "draws.json"), free_port(), 2
  env = {k: v for k, v in _no_cache(binary_env()).items() if k != "XLA_FLAGS"}
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_buckets_worker", str(i),
                             str(n), str(port), out], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(n)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
  with open(out, encoding="utf-8") as f:
    result = json.load(f)
  assert result["process_count"] == n and result["device_count"] == 4 * n
  draws = result["draws"]
  assert len(draws) == n and draws[0] == draws[1]
  assert set(draws[0]) == {64, 144, 256}  # A real mixture, not one constant bucket.


# --- Training across processes --------------------------------------------------------

TOTAL = 20


TWO_BUCKETS = ("--config.token_counts=(64,144)", "--config.token_probs=(0.5,0.5)")
# CI's version compiles one bucket (test_bucket_choice_identical_across_processes draws them).
ONE_BUCKET = ("--config.token_counts=(64,)", "--config.token_probs=(1.0,)")


def _flags(workdir, mesh, binary="train", buckets=TWO_BUCKETS):
  tiny = [f for f in TINY_FLAGS
          if not f.startswith(("--config.mesh.shape=", "--config.token_"))]
  return [sys.executable, "-m", f"tokenflex_jax.{binary}", "--config=configs/demo.py",
          f"--workdir={workdir}", f"--config.total_steps={TOTAL}",
          "--config.checkpoint_every=4", f"--config.mesh.shape={mesh}", *buckets, *tiny]


def _env(devices):
  return _no_cache(binary_env(devices))


def _start_two(workdir, binary="train", buckets=TWO_BUCKETS):
  port = free_port()
  return [subprocess.Popen(
      _flags(workdir, "(1,-1,1)", binary, buckets) + [
          f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]


def _finish(procs, timeout=600, returncode=0):
  logs = [p.communicate(timeout=timeout)[0] for p in procs]
  assert all(p.returncode == returncode for p in procs), "\n".join(log[-3000:] for log in logs)
  return logs


def _assert_same(got, ref, steps, rel):
  for step in steps:
    assert got[step][1] == ref[step][1], f"bucket differs at step {step}"
    assert got[step][0] == pytest.approx(ref[step][0], rel=rel, abs=1e-6), f"step {step}"


def _train_two_like_one(tmp_path, buckets=TWO_BUCKETS):
  """FSDP over 8 devices: 2 processes x 4 == 1 process x 8, through a SIGTERM and a
  restart. Returns (the 1-process losses, the 2-process workdir, a copy of it as it was
  at the SIGTERM, the step saved then)."""
  ref_dir, two_dir, other_dir = (str(tmp_path / d) for d in ("one", "two", "other_mesh"))
  ref = subprocess.run(_flags(ref_dir, "(1,-1,1)", buckets=buckets), cwd=REPO, env=_env(8),
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  reference = losses(ref_dir)
  assert sorted(reference) == list(range(1, TOTAL + 1))

  # Two processes; SIGTERM reaches only process 1, yet both save the same step and stop.
  procs = _start_two(two_dir, buckets=buckets)
  first_ckpt = os.path.join(two_dir, "checkpoints", "4")
  deadline = time.time() + 300
  while not os.path.isdir(first_ckpt) and time.time() < deadline:
    assert all(p.poll() is None for p in procs), procs[0].communicate()[0][-3000:]
    time.sleep(0.02)
  procs[1].send_signal(signal.SIGTERM)
  logs = _finish(procs, returncode=errors.PREEMPTED_EXIT_CODE)  # Saved; restart me.
  stopped = checkpointing.latest_step(two_dir)
  assert 4 <= stopped < TOTAL, f"stopped at {stopped}: the run ended before SIGTERM"
  assert all(f"every process saves step {stopped}" in log for log in logs)
  _assert_same(losses(two_dir), reference, range(1, stopped + 1), rel=1e-5)
  shutil.copytree(two_dir, other_dir)

  # Both processes restart and resume from the collective checkpoint.
  logs = _finish(_start_two(two_dir, buckets=buckets))
  assert f"at step {stopped}" in logs[0]
  _assert_same(losses(two_dir), reference, range(stopped + 1, TOTAL + 1), rel=1e-5)
  return reference, two_dir, other_dir, stopped


def test_two_processes_train_and_resume_like_one(tmp_path):
  _train_two_like_one(tmp_path, buckets=ONE_BUCKET)


# CI runs the part above at one bucket (test_two_processes_train_and_resume_like_one).
@pytest.mark.slow
def test_two_processes_train_resume_evaluate_and_reshard_like_one(tmp_path):
  """The above; then evaluation split over 2 processes equals 1 process's, and the
  2-process checkpoint resumes in 1 process on a (2,2,2) mesh."""
  reference, two_dir, other_dir, stopped = _train_two_like_one(tmp_path)

  # Evaluation: each process decodes its rows of every batch; the gathered predictions
  # score exactly as one process decoding everything.
  one = subprocess.run(_flags(two_dir, "(1,-1,1)", "eval"), cwd=REPO, env=_env(8),
                       capture_output=True, text=True, timeout=600)
  assert one.returncode == 0, one.stderr[-3000:]
  results = os.path.join(two_dir, "eval", "scenes", f"step_{TOTAL}", "results.json")
  with open(results, encoding="utf-8") as f:
    single = json.load(f)
  os.remove(results)
  _finish(_start_two(two_dir, "eval"))
  with open(results, encoding="utf-8") as f:
    gathered = json.load(f)
  assert gathered["step"] == single["step"] == TOTAL
  for count, result in single["results"].items():
    assert gathered["results"][count]["families"] == result["families"], count

  # The same checkpoint, one process, another mesh shape (data, fsdp, tensor) = (2, 2, 2).
  other = subprocess.run(_flags(other_dir, "(2,2,2)"), cwd=REPO, env=_env(8),
                         capture_output=True, text=True, timeout=600)
  assert other.returncode == 0, other.stderr[-3000:]
  assert f"at step {stopped}" in other.stderr
  assert "data position is recomputed from the step" in other.stderr
  _assert_same(losses(other_dir), reference, range(stopped + 1, TOTAL + 1), rel=1e-4)


@pytest.mark.slow  # The CI suite runs the plain path across processes (above).
def test_two_processes_with_a_count_per_microbatch_train_like_one(tmp_path):
  """`config.count_per_microbatch` across 2 processes: every process runs the same
  microbatch programs in the same order, and the losses are 1 process's."""
  extra = ["--config.batch_size=16", "--config.microbatches=2",
           "--config.count_per_microbatch=True",
           "--config.total_steps=6"]
  one, two = str(tmp_path / "one"), str(tmp_path / "two")
  ref = subprocess.run(_flags(one, "(1,-1,1)") + extra, cwd=REPO, env=_env(8),
                       capture_output=True, text=True, timeout=600)
  assert ref.returncode == 0, ref.stderr[-3000:]
  port = free_port()
  _finish([subprocess.Popen(
      _flags(two, "(1,-1,1)") + extra + [f"--coordinator_address=127.0.0.1:{port}",
                                         "--num_processes=2", f"--process_id={i}"],
      cwd=REPO, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)])
  with open(os.path.join(one, "metrics.jsonl"), encoding="utf-8") as f:
    draws = [json.loads(line)["train/num_tokens"] for line in f]
  assert any(n not in (64, 144) for n in draws)  # some steps mix the two counts
  reference, got = losses(one), losses(two)
  assert sorted(got) == list(range(1, 7))
  for step in got:
    assert got[step][0] == pytest.approx(reference[step][0], rel=1e-5, abs=1e-6), step
