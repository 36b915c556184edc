"""gs:// end to end against a local GCS emulator (tests/gcs_emulator.py): a TFDS build
written into a bucket, training with a gs:// workdir (its compilation cache there too),
SIGKILL, resume and evaluation; the losses equal those of the same run on local disk."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests import gcs_emulator
from tests.tiny import TINY_FLAGS
from tests.xla_env import REPO, binary_env

BUCKET = "tokenflex-test"
TOTAL = 10


@pytest.fixture(scope="module")
def emulator():
  with gcs_emulator.Emulator(BUCKET) as url, gcs_emulator.env_here(url):
    yield url


def _env(url):
  # Every program is kept in the compilation cache (the tiny ones compile in under its
  # 1 s threshold) and its hits are logged.
  return binary_env(2, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_LOG_COMPILES="1",
                    **gcs_emulator.client_env(url))


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
  # The restart loaded its train step from the workdir's compilation cache in the bucket.
  assert "Persistent compilation cache hit for 'jit__lambda'" in resumed.stderr
  assert list((epath.Path(gs_work) / "compilation_cache").iterdir())
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

  # An init checkpoint in a bucket: what config.init.checkpoint reads of it.
  from tokenflex_jax.training import checkpointing  # pylint: disable=import-outside-toplevel
  assert checkpointing.saved_modules(gs_work) == ("llm", "projector", "vit")
  assert checkpointing.resolve_step(gs_work) == TOTAL


def test_tokenizer_llava_and_eval_files_read_from_a_bucket(emulator, tmp_path):
  """The other inputs a run reads: an LLM's tokenizer.json (and its config and chat
  template), LLaVA JSON with its images (built into a TFDS build in the bucket) and an
  eval JSONL with its images, each from gs:// and each as from local disk."""
  from tests.test_real_formats import _png, make_hf_tokenizer  # pylint: disable=import-outside-toplevel
  from tokenflex_jax import paths  # pylint: disable=import-outside-toplevel
  from tokenflex_jax.data import chat, llava, llava_tfds  # pylint: disable=import-outside-toplevel
  from tokenflex_jax.evaluation import eval_files  # pylint: disable=import-outside-toplevel
  local = tmp_path / "files"
  make_hf_tokenizer(str(local / "tokenizer"))
  (local / "images").mkdir()
  (local / "images" / "0.png").write_bytes(_png("red"))
  rows = [{"id": "a", "image": "0.png", "conversations": [
              {"from": "human", "value": "<image>\nWhat colour is the picture?"},
              {"from": "gpt", "value": "red"}]},
          {"id": "t", "conversations": [{"from": "human", "value": "Is it bright?"},
                                        {"from": "gpt", "value": "no"}]}]
  (local / "train.json").write_text(json.dumps(rows))
  (local / "vqa.jsonl").write_text(json.dumps({"image": "images/0.png", "question": "Colour?",
                                               "answers": ["red"] * 10}) + "\n")
  remote = f"gs://{BUCKET}/files"
  paths.upload_tree(str(local), remote)

  kwargs = dict(kind="hf", template="chatml", image_token="<|image_pad|>")
  here = chat.load_tokenizer(path=str(local / "tokenizer"), **kwargs)
  there = chat.load_tokenizer(path=f"{remote}/tokenizer", **kwargs)
  turns = rows[0]["conversations"]
  turns = [("user", turns[0]["value"]), ("assistant", turns[1]["value"])]
  assert there.conversation_ids(turns) == here.conversation_ids(turns)
  assert there.pad_id == here.pad_id  # its tokenizer_config.json was read

  read = lambda where: [(r.id, r.turns, [os.path.basename(p) for p in r.image_paths])
                        for r in llava.read_llava(f"{where}/train.json", f"{where}/images")[0]]
  assert read(remote) == read(str(local))
  build = llava_tfds.build(f"gs://{BUCKET}/tfds", f"{remote}/train.json", f"{remote}/images")
  assert build.startswith(f"gs://{BUCKET}/tfds/llava_conversations/")
  source = llava_tfds.LlavaTfdsSource(build)
  items = sorted((source[i]["id"], source[i]["images"]) for i in range(len(source)))
  assert items == [("a", ((local / "images" / "0.png").read_bytes(),)), ("t", ())]

  vqa_here = eval_files.read_vqa(str(local / "vqa.jsonl"), 16)[0]
  vqa_there = eval_files.read_vqa(f"{remote}/vqa.jsonl", 16)[0]
  assert len(vqa_there) == 1 and vqa_there[0][1:] == vqa_here[0][1:] == (
      "Colour?", ["red"] * 10, "vqa")
  np.testing.assert_array_equal(vqa_there[0][0], vqa_here[0][0])  # its image, from the bucket
