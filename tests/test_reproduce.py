"""launch/reproduce.sh end to end, small: one seed, a few steps; then its files against
the results.json schema of docs/results.md, and a resumed rerun. CI runs one variant;
the slow test two, with the development pass first and the archive."""

import json
import os
import subprocess

import pytest

from configs import reproduce
from tests.tiny import TINY_FLAGS
from tests.xla_env import REPO, xla_flags
from tokenflex_jax import report
from tokenflex_jax.app.config_schema import base_config

# One CPU device, as a user's run on a laptop (not the suite's 8 simulated ones).
ONE_DEVICE = dict(os.environ, XLA_FLAGS=xla_flags())
# The tiny model of tests/tiny.py (its widths, the same code paths), a few steps.
SMALL = ("--config.total_steps=3", "--config.batch_size=8", "--config.log_every=1",
         "--config.checkpoint_every=3", "--config.eval.token_counts=(64,256)",
         "--config.eval.batch_size=16",
         *(f for f in TINY_FLAGS if f.startswith(("--config.model.", "--config.optimizer."))))


def _reproduce(workdir, out, *options, models="fixed_64,tokenflex"):
  return subprocess.run(
      ["bash", os.path.join(REPO, "launch", "reproduce.sh"), workdir, "--seeds=1",
       f"--models={models}", "--examples_per_family=4", f"--out={out}", *options,
       "--", *SMALL], capture_output=True, text=True, timeout=900, cwd=REPO, env=ONE_DEVICE)


def _assert_report_files(out):
  for name in ("results.md", "results.json", "results_accuracy.png", "results_budget.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name


def _assert_nothing_reruns(workdir, out, **kwargs):
  walls = open(os.path.join(workdir, "wall_times.tsv")).read().splitlines()
  again = _reproduce(workdir, out, **kwargs)  # everything finished: nothing reruns
  assert again.returncode == 0, again.stderr[-3000:]
  assert open(os.path.join(workdir, "wall_times.tsv")).read().splitlines() == walls
  assert "stage1" not in again.stdout and "done:" in again.stdout


def test_variants_change_only_what_they_name():
  base = reproduce.get_config("model=tokenflex,seed=0,stage=2").to_dict()
  for name, (counts, probs, projector) in reproduce.VARIANTS.items():
    c = reproduce.get_config(f"model={name},seed=2,stage=1")
    assert c.token_counts == counts and c.token_probs == probs and c.stage == 1
    assert c.seed == 2 and c.data.seed == 3 and c.eval.examples_per_family == 1000
    assert all(c.model.projector[k] == v for k, v in projector.items())
    c2 = reproduce.get_config(f"model={name},seed=0,stage=2").to_dict()
    differ = {k for k in base if base[k] != c2[k]}
    allowed = {"token_counts", "token_probs", "model"} | (
        {"total_steps"} if name in reproduce.EQUAL_COMPUTE_STEPS else set())
    assert differ <= allowed, (name, differ)
  assert set(base_config()) >= set(base)  # overrides only
  with pytest.raises(ValueError, match="model must be"):
    reproduce.get_config("model=nope")
  # The development split: other questions (another eval seed) in their own folder.
  dev = reproduce.get_config("model=tokenflex,seed=0,stage=2,split=dev")
  assert (dev.eval.seed, dev.eval.tag, dev.eval.save_router) == (
      reproduce.EVAL_SEEDS["development"], "dev", True)
  assert reproduce.get_config("model=fixed_64,split=dev").eval.save_router is False
  test = reproduce.get_config("model=tokenflex,seed=0,stage=2")
  assert (test.eval.seed, test.eval.tag) == (reproduce.EVAL_SEEDS["test"], "")


def test_one_variant_trains_evaluates_reports_and_is_not_rerun(tmp_path):
  workdir, out = str(tmp_path / "w"), str(tmp_path / "docs")
  first = _reproduce(workdir, out, models="tokenflex")
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  _assert_report_files(out)
  s = json.load(open(os.path.join(out, "results.json")))
  assert list(s["models"]) == ["tokenflex"] and s["examples_per_family"] == 4
  model = s["models"]["tokenflex"]
  assert model["seeds"] == 1 and set(model["accuracy"]) == {"64", "256"}
  assert 0 < model["train"]["mean_visual_tokens"] < 256 and model["train"]["step_seconds"] > 0
  assert s["eval_seeds"] == {"development": reproduce.EVAL_SEEDS["development"],
                             "test": reproduce.EVAL_SEEDS["test"]}
  assert os.path.exists(os.path.join(workdir, "tokenflex", "seed0", "stage2", "router.json"))
  walls = open(os.path.join(workdir, "wall_times.tsv")).read().splitlines()
  assert len(walls) == 1 + 4  # stage 0, then stages 1 and 2 and both evaluations
  # The revision the runs trained at, as the report reads it.
  assert open(os.path.join(workdir, "revisions.txt")).read().split() == [
      report.short_revision()]
  assert s["revision"]["runs"] == report.short_revision()
  _assert_nothing_reruns(workdir, out, models="tokenflex")


@pytest.mark.slow  # CI runs one variant (above).
def test_reproduce_small_writes_the_report_and_resumes(tmp_path):
  workdir, out = str(tmp_path / "w"), str(tmp_path / "docs")
  # First the development questions alone (choosing the recipe): no test question asked.
  design = _reproduce(workdir, str(tmp_path / "design"), "--dev_only")
  assert design.returncode == 0, design.stdout[-3000:] + design.stderr[-3000:]
  d = json.load(open(tmp_path / "design" / "results.json"))
  assert d["eval_seeds"] == {"development": reproduce.EVAL_SEEDS["development"], "test": None}
  assert set(d["models"]) == {"fixed_64", "tokenflex"}
  assert not os.path.exists(os.path.join(workdir, "tokenflex", "seed0", "eval.done"))
  # Then the test questions: the trained stages are reused.
  archive = str(tmp_path / "archive")
  first = _reproduce(workdir, out, f"--archive={archive}")
  assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
  assert "stage1" not in first.stdout and "tokenflex seed 0: eval" in first.stdout
  _assert_report_files(out)
  s = json.load(open(os.path.join(out, "results.json")))
  assert set(s["models"]) == {"fixed_64", "tokenflex"}
  for name, model in s["models"].items():
    assert model["seeds"] == 1 and isinstance(model["seeds"], int)
    assert model["train_counts"] == list(reproduce.VARIANTS[name][0])
    assert model["train_probs"] == pytest.approx(reproduce.VARIANTS[name][1])
    assert set(model["accuracy"]) == {"64", "256"}
    for stat in model["accuracy"].values():
      assert set(stat) == {"mean", "std"} and 0.0 <= stat["mean"] <= 1.0 and stat["std"] == 0.0
    assert model["train"]["mean_visual_tokens"] > 0 and model["train"]["step_seconds"] > 0
  assert s["models"]["fixed_64"]["train"]["mean_visual_tokens"] == 64
  assert s["auto_budget"] and all(
      set(p) == {"threshold", "accuracy", "mean_visual_tokens"} for p in s["auto_budget"])
  assert s["auto_budget"][-1]["mean_visual_tokens"] == 64 + 256  # +inf: every attempt
  assert set(s["oracle"]) == {"accuracy", "mean_visual_tokens"}
  assert set(s["auto_budget_ladders"]) == {"64-256"}  # the trained counts evaluated
  assert 0.0 <= s["oracle"]["accuracy"] <= 1.0 and s["examples_per_family"] == 4
  assert "reproduce.sh" in s["command"] and s["wall_time_s"] > 0
  md = open(os.path.join(out, "results.md")).read()
  assert "## Verdict" in md and "| fixed_64 | 64 | swiglu, adaptive_avg | 1 |" in md
  walls = open(os.path.join(workdir, "wall_times.tsv")).read().splitlines()
  assert len(walls) == 1 + 2 * 4  # stage 0, then stages 1, 2 and both evals of each variant
  assert s["eval_seeds"] == {"development": reproduce.EVAL_SEEDS["development"],
                             "test": reproduce.EVAL_SEEDS["test"]}
  assert set(s["paired"]) == {"tokenflex-fixed_64"}
  assert set(s["paired"]["tokenflex-fixed_64"]["families"]) == set(s["families"])
  assert set(s["budget_split"]["rules"]) >= {"router", "log-probability", "family rule",
                                             "oracle", "fixed_64", "fixed_256"}
  assert os.path.exists(os.path.join(workdir, "tokenflex", "seed0", "stage2", "router.json"))

  _assert_nothing_reruns(workdir, out)

  # The archive keeps the finished runs without checkpoints; another workdir (another
  # session) takes them as finished and writes the same report without training.
  kept = [os.path.relpath(os.path.join(d, f), archive)
          for d, _, files in os.walk(archive) for f in files]
  assert "tokenflex/seed0/stage2/router.json" in kept
  assert "train/loss" in open(os.path.join(archive, "stage0_losses.txt")).read()
  assert not [k for k in kept if "checkpoint" in k or k.startswith("stage0/")], kept
  elsewhere = _reproduce(str(tmp_path / "w2"), str(tmp_path / "docs2"), f"--archive={archive}")
  assert elsewhere.returncode == 0, elsewhere.stdout[-3000:] + elsewhere.stderr[-3000:]
  assert "stage0" not in elsewhere.stdout and "stage1" not in elsewhere.stdout
  s2 = json.load(open(tmp_path / "docs2" / "results.json"))
  assert s2["models"] == s["models"] and s2["paired"] == s["paired"]


@pytest.mark.parametrize("arg,message", [
    ("--models=fixed_64,nope", "unknown variant 'nope'"),
    ("--seeds=0", "--seeds must be a positive integer"),
    # Folders that cannot be written (under a regular file): refused before any training.
    ("--archive={tmp}/file/archive", "--archive: cannot write to {tmp}/file/archive"),
    ("--out={tmp}/file/docs", "--out: cannot write to {tmp}/file/docs")])
def test_bad_arguments_are_refused_in_one_line(tmp_path, arg, message):
  (tmp_path / "file").write_text("")
  arg, message = arg.format(tmp=tmp_path), message.format(tmp=tmp_path)
  result = subprocess.run(["bash", os.path.join(REPO, "launch", "reproduce.sh"),
                           str(tmp_path / "w"), arg], capture_output=True, text=True,
                          timeout=120, cwd=REPO)
  assert result.returncode == 2 and message in result.stderr
  assert len(result.stderr.strip().splitlines()) == 1
  assert not os.path.exists(tmp_path / "w")  # nothing started
