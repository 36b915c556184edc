"""gs:// end to end against a local GCS emulator (tests/gcs_emulator.py): a TFDS build
written into a bucket, training with a gs:// workdir, SIGKILL, resume and evaluation;
the losses equal those of the same run on local disk."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.tiny import TINY_FLAGS

gcs_emulator = pytest.importorskip("tests.gcs_emulator")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BUCKET = "tokenflex-test"
TOTAL = 10


@pytest.fixture(scope="module")
def emulator():
  with gcs_emulator.Emulator(BUCKET) as url:
    gcs_emulator.apply_env_here(url)
    yield url


def _env(url):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=2", **gcs_emulator.client_env(url))
  env.pop("PYTEST_CURRENT_TEST", None)
  return env


def _command(binary, workdir, data_dir):
  tiny = [f for f in TINY_FLAGS if not f.startswith(("--config.mesh.", "--config.token_",
                                                      "--config.eval.token_counts="))]
  return [sys.executable, "-m", f"tokenflex_jax.{binary}", "--config=configs/demo.py",
          f"--workdir={workdir}", *tiny, "--config.mesh.shape=(1,-1,1)",
          "--config.token_counts=(64,)", "--config.token_probs=(1.0,)",
          "--config.eval.token_counts=(64,)", "--config.eval.examples_per_family=2",
          f"--config.total_steps={TOTAL}", "--config.checkpoint_every=2",
          "--config.data.source=tfds", f"--config.data.tfds_dir={data_dir}"]


def _run(args, env):
  out = subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-4000:]
  return out


def _losses(text):
  """{step: loss} of a metrics.jsonl's text, the last record of a step winning."""
  return {r["step"]: r["train/loss"] for r in map(json.loads, text.splitlines())
          if "train/loss" in r}


def test_gs_workdir_and_data_train_resume_and_evaluate_like_local(emulator, tmp_path):
  from etils import epath  # pylint: disable=import-outside-toplevel
  env = _env(emulator)
  build = [sys.executable, "-m", "tokenflex_jax.data.tfds_builder", "--num_train=64",
           "--num_validation=16"]
  gs_data, gs_work = f"gs://{BUCKET}/tfds", f"gs://{BUCKET}/runs/w"
  _run(build + [f"--data_dir={gs_data}"], env)
  _run(build + [f"--data_dir={tmp_path / 'tfds'}"], env)
  assert list(epath.Path(gs_data).glob("tokenflex_scenes/*/*/dataset_info.json"))

  local = tmp_path / "w"
  _run(_command("train", str(local), str(tmp_path / "tfds")), env)
  reference = _losses((local / "metrics.jsonl").read_text())
  assert sorted(reference) == list(range(1, TOTAL + 1))

  # gs:// run, SIGKILLed once its step-4 checkpoint is committed (commit_success.txt).
  proc = subprocess.Popen(_command("train", gs_work, gs_data), cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  committed = epath.Path(gs_work) / "checkpoints" / "4" / "commit_success.txt"
  deadline = time.time() + 300
  while not committed.exists() and time.time() < deadline:
    assert proc.poll() is None, proc.stderr.read()[-3000:]
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert proc.returncode == -signal.SIGKILL
  resumed = _run(_command("train", gs_work, gs_data), env)
  assert "resumed from gs://" in resumed.stderr
  got = _losses((epath.Path(gs_work) / "metrics.jsonl").read_text())
  assert got == reference  # identical, step for step

  _run(_command("eval", gs_work, gs_data), env)
  results = json.loads((epath.Path(gs_work) / "eval" / "scenes" / f"step_{TOTAL}" /
                        "results.json").read_text())
  assert results["step"] == TOTAL and set(results["results"]) == {"64"}
  index = json.loads((epath.Path(gs_work) / "eval" / "index.json").read_text())
  assert [(e["suite"], e["step"]) for e in index["evaluations"]] == [("scenes", TOTAL)]
  for name in ("config.json", "tokenizer.model"):
    assert (epath.Path(gs_work) / name).exists(), name
  assert list((epath.Path(gs_work) / "tensorboard").glob("events.out.tfevents.*"))
  assert not (tmp_path / "runs").exists() and not os.path.exists("gs:")  # no local stray
