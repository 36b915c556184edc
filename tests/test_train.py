"""The trainer end to end on a tiny model: compiles, resume after a kill, overrides, eval."""

import copy
import json
import logging as py_logging
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from absl import flags
from PIL import Image

from tests.tiny import TINY_FLAGS, losses, tiny_config
from tests.xla_env import REPO, binary_env
from tokenflex_jax import errors, eval as eval_binary, predict
from tokenflex_jax.app import cli, config_schema, run_tokenizer, trained_model
from tokenflex_jax.data import scenes
from tokenflex_jax.data.tokenizer import Tokenizer
from tokenflex_jax.evaluation import auto_budget, outputs
from tokenflex_jax.train import train
from tokenflex_jax.training import checkpointing

TOTAL = 40


class _CompileCounter(py_logging.Handler):
  def __init__(self):
    super().__init__()
    self.messages = []

  def emit(self, record):
    self.messages.append(record.getMessage())


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
  """An uninterrupted in-process run; records which programs were compiled."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  config = tiny_config(total_steps=TOTAL, checkpoint_every=4, eval_every=TOTAL)
  counter = _CompileCounter()
  logger = py_logging.getLogger("jax")
  logger.addHandler(counter)
  jax.config.update("jax_log_compiles", True)
  try:
    train(config, workdir)
  finally:
    jax.config.update("jax_log_compiles", False)
    logger.removeHandler(counter)
  return workdir, config, counter.messages


def test_one_compile_per_bucket(reference_run):
  workdir, config, messages = reference_run
  # Each bucket's step is compiled exactly once, ahead of time; the loop never compiles
  # (the periodic evaluation's decoding has images too, but no float32 loss mask).
  train_compiles = [m for m in messages if "Compiling" in m and "float32[8,32,32,3]" in m
                    and "float32[8,24]" in m]
  assert len(train_compiles) == len(config.token_counts), "\n".join(train_compiles)
  seen = {n for _, n in losses(workdir).values()}
  assert seen == set(config.token_counts)


def test_metrics_and_checkpoints_written(reference_run):
  workdir, config, _ = reference_run
  record = losses(workdir)
  assert sorted(record) == list(range(1, TOTAL + 1))
  assert checkpointing.latest_step(workdir) == TOTAL
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(e.startswith("events.out.tfevents") for e in events)
  # Loss falls on this easy data even for the tiny model.
  first = sum(record[s][0] for s in range(1, 6)) / 5
  last = sum(record[s][0] for s in range(TOTAL - 4, TOTAL + 1)) / 5
  assert last < first
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert json.load(f)["total_steps"] == TOTAL
  del config


def test_periodic_evaluation_writes_per_step_results_and_scalars(reference_run):
  """eval_every=40 of 40: the eval binary's evaluation at step 40, its files in the
  step's folder, and per-count accuracies among the metrics (TensorBoard's too); the
  cadence itself: tests/test_loop.py."""
  workdir, config, _ = reference_run
  for step in (40,):
    with open(os.path.join(workdir, "eval", "scenes", f"step_{step}", "results.json"),
              encoding="utf-8") as f:
      results = json.load(f)
    assert results["step"] == step
    assert set(results["results"]) == {str(n) for n in config.eval.token_counts}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    evals = [r for r in map(json.loads, f) if "eval/64tokens/average" in r]
  assert [r["step"] for r in evals] == [40]
  assert all(0 <= r["eval/100tokens/background"] <= 1 for r in evals)
  assert not any(k.startswith("train/") for r in evals for k in r)


def _train_command(workdir):
  return [sys.executable, "-m", "tokenflex_jax.train", "--config=configs/demo.py",
          f"--workdir={workdir}", f"--config.total_steps={TOTAL}", "--config.checkpoint_every=4",
          *TINY_FLAGS]


def test_sigterm_saves_and_exits_cleanly(tmp_path):
  workdir = str(tmp_path / "sigterm")
  cmd = _train_command(workdir)
  # One bucket (one compile): the path from the signal to the exit code is the same.
  cmd = [c for c in cmd if not c.startswith(("--config.total_steps", "--config.token_"))] + [
      "--config.total_steps=100000", "--config.checkpoint_every=100000",
      "--config.token_counts=(64,)", "--config.token_probs=(1.0,)"]
  proc = subprocess.Popen(cmd, cwd=REPO, env=binary_env(8), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(workdir, "metrics.jsonl")
  deadline = time.time() + 240
  while (not os.path.exists(metrics) or os.path.getsize(metrics) == 0) and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  _, stderr = proc.communicate(timeout=120)
  # Saved, then the exit code that tells a launcher to restart.
  assert proc.returncode == errors.PREEMPTED_EXIT_CODE, stderr[-3000:]
  assert "run the same command again to resume" in stderr.splitlines()[-1]
  assert "SIGTERM received" in stderr
  step = checkpointing.latest_step(workdir)
  assert step is not None and 0 < step < 100000


def _parse(*args):
  """The binaries' own flags, parsed from ``args`` into a fresh FlagValues."""
  argv = ["prog", *args, "--workdir=/tmp/unused"]
  fv = flags.FlagValues()
  config, _ = cli.define_flags(fv, sys_argv=argv)
  fv(argv)
  return config.value


def test_config_overrides_from_the_command_line():
  c = _parse(f"--config={REPO}/configs/demo.py:stage=1", "--config.optimizer.learning_rate=0.1",
             "--config.token_counts=(144,)", "--config.token_probs=(1.0,)",
             "--config.model.projector.pooling=resize_avg")
  assert c.stage == 1 and c.lr_multipliers.vit == 0.0
  assert c.optimizer.learning_rate == 0.1
  assert tuple(c.token_counts) == (144,) and tuple(c.token_probs) == (1.0,)
  assert c.model.projector.pooling == "resize_avg"
  # Without overrides: the file's defaults. The image size is one field referenced twice.
  default = _parse(f"--config={REPO}/configs/demo.py")
  assert default.stage == 2 and tuple(default.token_counts) == (64, 144, 256)
  assert _parse(f"--config={REPO}/configs/demo.py",
                "--config.model.vit.image_size=64").data.image_size == 64
  with pytest.raises(Exception, match="no_such_key"):
    _parse(f"--config={REPO}/configs/demo.py", "--config.no_such_key=1")
  with pytest.raises(Exception, match="stage must be 0, 1 or 2"):
    _parse(f"--config={REPO}/configs/demo.py:stage=7")


def test_bad_config_is_rejected_with_the_field_name(tmp_path):
  with pytest.raises(ValueError, match="config.token_probs"):
    train(tiny_config(token_probs=(0.5, 0.5, 0.5)), str(tmp_path / "bad"))
  with pytest.raises(ValueError, match="config.model.projector.pooling"):
    train(tiny_config(model__projector__pooling="max"), str(tmp_path / "bad2"))


def test_eval_writes_results_with_the_schema(reference_run):
  workdir, config, _ = reference_run
  # The periodic evaluation at step 40 is there already: kept unless asked.
  with pytest.raises(errors.UserError, match="already holds an evaluation of 'scenes' at "
                                             "step 40; pass --config.eval.overwrite=True"):
    eval_binary.run_eval(config, workdir)
  config = copy.deepcopy(config)
  config.eval.overwrite = True
  results = eval_binary.run_eval(config, workdir)
  out = os.path.join(workdir, "eval", "scenes", f"step_{TOTAL}")
  index = outputs.read_index(os.path.join(workdir, "eval"))
  assert [(e["suite"], e["step"], e["source"]) for e in index] == [("scenes", TOTAL, "eval")]
  assert index[0]["average"] == {c: r["average"] for c, r in results["results"].items()}
  for name in ("results.json", "results.md", "accuracy.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  with open(os.path.join(out, "results.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved == json.loads(json.dumps(outputs.results_json(results)))
  assert os.path.exists(os.path.join(out, outputs.QUESTIONS_FILE))  # the rest, beside it
  assert saved["step"] == TOTAL
  assert set(saved["families"]) == set(config.data.families)
  for info in saved["families"].values():
    assert info["granularity"] in ("coarse", "medium", "fine")
    assert 0 < info["chance"] < 1
  assert set(saved["results"]) == {"64", "100"}
  for count, res in saved["results"].items():
    assert res["visual_tokens"] == int(count)
    assert set(res["families"]) == set(config.data.families)
    assert all(0 <= a <= 1 for a in res["families"].values())
    assert res["average"] == pytest.approx(sum(res["families"].values()) / len(res["families"]))
    assert res["examples_per_s"] > 0
  table = open(os.path.join(out, "results.md"), encoding="utf-8").read()
  assert "| 64 tokens | 100 tokens |" in table
  assert all(f"| {name} |" in table for name in config.data.families)


def test_benchmark_sweep_writes_the_table_and_plot_and_keeps_them(reference_run, tmp_path):
  """The trained tiny model on small files of all eight VLMEvalKit layouts: a table row
  per benchmark and a column per count, the plot, each benchmark's own results and
  predictions; a second sweep refuses before any work and leaves them as they are."""
  from tests.test_benchmark_eval import layout, write_tsv
  from tokenflex_jax.app import benchmark_sweep
  from tokenflex_jax.evaluation import benchmarks
  workdir, config, _ = reference_run
  for name in benchmarks.BENCHMARKS:
    write_tsv(tmp_path / f"{name}.tsv", layout(name))
  (tmp_path / "notes.tsv").write_text("index\n")  # not a benchmark's name: left out
  files = benchmark_sweep.benchmark_files(str(tmp_path))
  assert [os.path.basename(f) for f in files] == [f"{b}.tsv" for b in benchmarks.BENCHMARKS]
  config = copy.deepcopy(config)
  config.eval.max_prompt_length = 96
  config.eval.token_counts = (64, 144)  # two trained counts: the automatic budget too
  table = benchmark_sweep.sweep(config, workdir, files)
  out = os.path.join(workdir, "eval", "benchmarks", f"step_{TOTAL}")
  assert list(table["benchmarks"]) == list(benchmarks.BENCHMARKS)
  assert all(set(row) == {"64", "144", "auto"} for row in table["benchmarks"].values())
  assert table["benchmarks"]["MMVet"]["64"] is None
  assert table["benchmarks"]["MMVet"]["auto"]["value"] is None
  scored = [row["64"] for name, row in table["benchmarks"].items() if name != "MMVet"]
  assert all(0 <= v <= 100 for v in scored)
  assert table["average"]["64"] == pytest.approx(sum(scored) / len(scored))
  assert all(64 <= row["auto"]["mean_visual_tokens"] <= 64 + 144
             for row in table["benchmarks"].values())
  md = open(os.path.join(out, "table.md"), encoding="utf-8").read()
  assert "| MMStar |" in md and "| **average** |" in md
  assert "| MathVista_MINI† |" in md and "† MathVista_MINI: the rows VLMEvalKit" in md
  assert set(table["needs_judge_share"]) == {"MathVista_MINI"}
  assert "| 64 tokens | 144 tokens | auto |" in md
  assert os.path.getsize(os.path.join(out, "accuracy.png")) > 0
  for name in benchmarks.BENCHMARKS:
    assert os.path.exists(os.path.join(workdir, "eval", name, f"step_{TOTAL}",
                                       "predictions_144.tsv"))
  before = open(os.path.join(out, "table.json"), encoding="utf-8").read()
  with pytest.raises(errors.UserError, match="already holds a benchmark table"):
    benchmark_sweep.sweep(config, workdir, files)
  assert open(os.path.join(out, "table.json"), encoding="utf-8").read() == before


def test_eval_reports_the_automatic_budget(reference_run):
  workdir, config, _ = reference_run
  config = copy.deepcopy(config)
  config.eval.token_counts = (64, 144)
  config.eval.overwrite = True
  results = eval_binary.run_eval(config, workdir)
  auto = results["auto_budget"]
  assert auto["counts"] == [64, 144]
  fixed = {int(c): r["average"] for c, r in results["results"].items()}
  curve = auto["curve"]
  # The lowest threshold stops everything at 64; the last (null) escalates everything.
  assert curve[0]["mean_visual_tokens"] == 64
  assert curve[0]["accuracy"] == pytest.approx(fixed[64])
  assert curve[-1]["threshold"] is None and curve[-1]["mean_visual_tokens"] == 64 + 144
  assert curve[-1]["accuracy"] == pytest.approx(fixed[144])
  tokens = [p["mean_visual_tokens"] for p in curve]
  assert tokens == sorted(tokens)  # a higher threshold escalates more
  oracle = auto["oracle"]
  assert oracle["accuracy"] >= max(fixed.values()) - 1e-9
  assert 64 <= oracle["mean_visual_tokens"] <= 144
  out = os.path.join(workdir, "eval", "scenes", f"step_{TOTAL}")
  assert os.path.getsize(os.path.join(out, "budget.png")) > 0
  assert "| oracle |" in open(os.path.join(out, "results.md"), encoding="utf-8").read()


def test_a_router_saved_by_eval_decides_predicts_budget(reference_run, tmp_path):
  workdir, config, _ = reference_run
  config = copy.deepcopy(config)
  config.eval.overwrite, config.eval.save_router = True, True
  with pytest.raises(errors.ConfigError, match="config.eval.save_router"):
    eval_binary.run_eval(config, workdir)  # (64, 100): one trained count, no router
  config.eval.token_counts, config.eval.seed = (64, 144), 7  # a development seed
  path = os.path.join(workdir, "router.json")
  try:
    results = eval_binary.run_eval(config, workdir)
    # Every question's record: its family, and per count its credit and confidence.
    record = outputs.read_questions(os.path.join(workdir, "eval", "scenes", f"step_{TOTAL}",
                                                 outputs.QUESTIONS_FILE))
    assert record["counts"] == [64, 144] and len(record["prompts"]) == len(record["families"])
    for c in (64, 144):
      for family, accuracy in results["results"][str(c)]["families"].items():
        assert record["credit"][c][record["families"] == family].mean() == pytest.approx(
            accuracy)
      assert record["seconds"][c] > 0 and np.all(record["confidence"][c] <= 0)
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
    assert saved == results["router"]
    assert saved["fitted_on"]["step"] == TOTAL and saved["fitted_on"]["eval_seed"] == 7
    assert saved["counts"] == [64, 144]
    router = auto_budget.Router.from_json(saved)
    example = scenes.generate_example(5, 0, families=("marks",))
    image = str(tmp_path / "scene.png")
    Image.fromarray(example["image"]).save(image)
    question = example["question"]
    at_64 = predict.predict(workdir, image, question, num_tokens=64)
    tokenizer = Tokenizer(os.path.join(workdir, "tokenizer.model"))
    prompt = np.asarray([tokenizer.prompt_ids(question, config.data.image_first)])
    stops = router.stops(64, prompt, np.asarray([at_64.confidence]))[0]
    auto = predict.predict(workdir, image, question, "auto")
    assert auto.signal == "router"
    assert auto.num_tokens == (64 if stops else 144)
    assert auto.visual_tokens == (64 if stops else 64 + 144)
    for threshold, count in ((None, 144), (-2.0, 64)):  # never / always stops at 64
      with open(path, "w", encoding="utf-8") as f:
        json.dump({**saved, "threshold": threshold}, f)
      assert predict.predict(workdir, image, question, "auto").num_tokens == count
    with open(path, "w", encoding="utf-8") as f:  # fitted on another step: not used
      json.dump({**saved, "fitted_on": {**saved["fitted_on"], "step": TOTAL - 1}}, f)
    assert predict.predict(workdir, image, question, "auto").signal == "log-probability"
  finally:
    if os.path.exists(path):
      os.remove(path)


def test_eval_refuses_a_config_describing_another_model(reference_run):
  workdir, config, _ = reference_run
  other = copy.deepcopy(config)
  other.model.visual_position_span = config.model.visual_position_span + 1
  with pytest.raises(ValueError, match="visual_position_span"):
    eval_binary.run_eval(other, workdir)
  other = copy.deepcopy(config)
  other.model.remat_policy = "full"  # performance flags: the same model
  other.model.scan_layers = not config.model.scan_layers
  other = config_schema.to_spec(other)
  trained_model.check_same_model(other, workdir, run_tokenizer.loader(other, workdir)())


def test_predict_answers_one_question(reference_run, tmp_path):
  workdir, config, _ = reference_run
  example = scenes.generate_example(5, 0, families=("background",))
  path = str(tmp_path / "scene.png")
  Image.fromarray(example["image"]).save(path)
  tokenizer = Tokenizer(os.path.join(workdir, "tokenizer.model"))
  result = predict.predict(workdir, path, example["question"], num_tokens=100)
  answer = result.text
  # Whatever the tiny model says, it is text the tokenizer can produce, not ids or padding.
  assert isinstance(answer, str) and "<" not in answer
  assert tokenizer.decode(tokenizer.encode(answer)) == answer
  assert result.num_tokens == 100 and result.visual_tokens == 100
  assert result.confidence <= 0
  # auto: the trained counts in order; a threshold of 0 is never reached (a log-prob is
  # below 0), so every count is tried and the largest answers.
  config_auto = copy.deepcopy(config)
  config_auto.eval.auto_threshold = 0.0
  auto = predict.predict(workdir, path, example["question"], "auto", config=config_auto)
  assert auto.num_tokens == max(config.token_counts)
  assert auto.visual_tokens == sum(config.token_counts)
  config_auto.eval.auto_threshold = -1e9  # always confident: the smallest count answers
  auto = predict.predict(workdir, path, example["question"], "auto", config=config_auto)
  assert auto.num_tokens == auto.visual_tokens == min(config.token_counts)
  with pytest.raises(ValueError, match="'auto'"):
    predict.predict(workdir, path, example["question"], "many")
  with pytest.raises(ValueError, match="num_visual_tokens=150"):
    predict.predict(workdir, path, example["question"], num_tokens=150)
  with pytest.raises(ValueError, match="missing.png"):
    predict.predict(workdir, str(tmp_path / "missing.png"), "?", num_tokens=64)
  del config


def test_position_probe_of_a_trained_workdir(reference_run):
  from tokenflex_jax.probe import probe
  workdir, config, _ = reference_run
  got = probe(workdir, num_images=32)
  assert set(got) == {"vit patches"} | {f"tokens at {n}" for n in config.eval.token_counts}
  assert all(v["row"] <= 1.0 and v["col"] <= 1.0 for v in got.values())
  # The projector's position embedding (on in the demo) makes the tokens' place (row and
  # column together) readable, where the briefly trained ViT's patches carry none.
  assert config.model.projector.position_embedding
  place = lambda r: (r["row"] + r["col"]) / 2
  for n in config.eval.token_counts:
    assert place(got[f"tokens at {n}"]) > place(got["vit patches"]) + 0.1, got
