"""The reproduction report: aggregation over seeds, the criteria, and the files."""

import json
import os

import numpy as np
import pytest

from tokenflex_jax import report
from tokenflex_jax.evaluation import experiment, experiment_report

COUNTS = ("64", "100", "144", "196", "256")
FAMILIES = {"background": {"granularity": "coarse", "chance": 0.125},
            "marks": {"granularity": "fine", "chance": 0.125}}


def _eval(acc: dict[str, float], auto: bool) -> dict:
  """An eval results.json whose families both score ``acc[count]``."""
  out = {"step": 10, "suite": "scenes", "examples_per_family": 5, "families": FAMILIES,
         "results": {c: {"visual_tokens": int(c), "average": acc[c],
                         "families": {"background": 1.0, "marks": 2 * acc[c] - 1.0},
                         "examples_per_s": 1.0} for c in COUNTS}}
  if auto:
    out["auto_budget"] = {"counts": [64, 144, 256], "curve": [
        {"threshold": -1.0, "accuracy": acc["64"], "mean_visual_tokens": 70.0},
        {"threshold": -0.5, "accuracy": acc["256"] - 0.005, "mean_visual_tokens": 140.0},
        {"threshold": None, "accuracy": acc["256"], "mean_visual_tokens": 464.0}],
        "oracle": {"accuracy": acc["256"] + 0.05, "mean_visual_tokens": 90.0}}
    skip = {"counts": [64, 256], "curve": [
        {"threshold": -1.0, "accuracy": acc["64"], "mean_visual_tokens": 64.0},
        {"threshold": None, "accuracy": acc["256"], "mean_visual_tokens": 320.0}],
        "oracle": out["auto_budget"]["oracle"]}
    out["auto_budget_ladders"] = {"64-144-256": out["auto_budget"], "64-256": skip}
    out["auto_budget_router_ladders"] = {"64-256": {**skip, "curve": [
        {"threshold": 0.5, "accuracy": acc["256"], "mean_visual_tokens": 100.0}]}}
  return out


def _write_run(workdir, name, seed, counts, acc, step_times=(0.5, 0.5)):
  base = os.path.join(workdir, name, f"seed{seed}")
  for stage, t in zip(("stage1", "stage2"), step_times):
    os.makedirs(os.path.join(base, stage, "eval"), exist_ok=True)
    with open(os.path.join(base, stage, "metrics.jsonl"), "w") as f:
      for i, n in enumerate(counts * 2):
        f.write(json.dumps({"step": i + 1, "train/step_time_s": t, "train/num_tokens": n}) + "\n")
  cfg = {"token_counts": list(counts), "token_probs": [1 / len(counts)] * len(counts),
         "model": {"projector": {"pooling": "adaptive_avg", "mlp": "swiglu",
                               "position_embedding": True}}}
  with open(os.path.join(base, "stage2", "config.json"), "w") as f:
    json.dump(cfg, f)
  with open(os.path.join(base, "stage2", "eval", "results.json"), "w") as f:
    json.dump(_eval(acc, auto=len(counts) > 1), f)
  open(os.path.join(base, "eval.done"), "w").close()
  with open(os.path.join(workdir, "wall_times.tsv"), "a") as f:
    f.write(f"{name}\t{seed}\tstage1\t10\n{name}\t{seed}\tstage2\t20\n")


def _flat(value):
  return {c: value for c in COUNTS}


@pytest.fixture
def workdir(tmp_path):
  w = str(tmp_path / "repro")
  for seed, shift in ((0, 0.0), (1, 0.02)):
    _write_run(w, "fixed_64", seed, [64], {**_flat(0.5 + shift), "64": 0.7 + shift},
               (0.2, 0.2))
    _write_run(w, "fixed_256", seed, [256], {**_flat(0.4 + shift), "256": 0.8 + shift})
    _write_run(w, "tokenflex", seed, [64, 144, 256],
               {"64": 0.69 + shift, "100": 0.6, "144": 0.72, "196": 0.75, "256": 0.82 + shift})
  os.makedirs(os.path.join(w, "fixed_144", "seed0"))  # not evaluated yet: left out
  with open(os.path.join(w, "command.txt"), "w") as f:
    f.write("bash launch/reproduce.sh repro\n")
  return w


def test_collect_and_summarize(workdir):
  runs = experiment.collect(workdir)
  assert [(r.name, r.seed) for r in runs] == [("fixed_64", 0), ("fixed_64", 1), ("fixed_256", 0),
                                              ("fixed_256", 1), ("tokenflex", 0), ("tokenflex", 1)]
  assert runs[0].train_seconds == pytest.approx(0.2 * 4) and runs[0].wall_seconds == 30
  # A paused step does not count: the median per count, times its steps.
  path = os.path.join(workdir, "fixed_64", "seed0", "stage1", "metrics.jsonl")
  with open(path, "a") as f:
    f.write(json.dumps({"step": 3, "train/step_time_s": 100.0, "train/num_tokens": 64}) + "\n")
  assert experiment.collect(workdir)[0].train_seconds == pytest.approx(0.2 * 5)
  assert runs[4].train_visual_tokens == pytest.approx(np.mean([64, 144, 256]))
  s = experiment.summarize(runs, "cmd", 123.0)
  flex = s["models"]["tokenflex"]
  assert flex["seeds"] == 2 and flex["train_counts"] == [64, 144, 256]
  assert flex["accuracy"]["64"]["mean"] == pytest.approx(0.70)
  assert flex["accuracy"]["64"]["std"] == pytest.approx(0.01)
  assert flex["families"]["256"]["marks"]["mean"] == pytest.approx(2 * 0.83 - 1)
  assert s["models"]["fixed_64"]["train"]["step_seconds"] == pytest.approx(0.8)
  assert [p["mean_visual_tokens"] for p in s["auto_budget"]] == [70.0, 140.0, 464.0]
  assert [p["threshold"] for p in s["auto_budget"]] == [-1.0, -0.5, None]
  assert set(s["auto_budget_ladders"]) == {"64-144-256", "64-256"}
  assert s["auto_budget_ladders"]["64-256"]["curve"][1]["mean_visual_tokens"] == 320.0
  assert s["oracle"]["accuracy"] == pytest.approx(0.88)
  assert s["graded_solvable"]["marks"]["256"] == 1.0
  with pytest.raises(ValueError, match="no evaluated runs"):
    experiment.summarize([])


def test_criteria(workdir):
  s = experiment.summarize(experiment.collect(workdir))
  own = {d["count"]: d for d in experiment.own_count_deltas(s)}
  # 1 point below fixed_64, with a spread of 1 point on each side: within the spread.
  assert own[64]["delta"] == pytest.approx(-1.0)
  assert own[64]["spread"] == pytest.approx(np.hypot(1.0, 1.0)) and own[64]["holds"]
  worse = json.loads(json.dumps(s))
  worse["models"]["tokenflex"]["accuracy"]["64"]["mean"] = 0.68
  assert not experiment.own_count_deltas(worse)[0]["holds"]
  assert own[256]["delta"] == pytest.approx(2.0) and own[256]["holds"]
  off = experiment.off_count_deltas(s)
  assert {(d["fixed"], d["count"]) for d in off} == {
      ("fixed_64", c) for c in (100, 144, 196, 256)} | {("fixed_256", c) for c in (64, 100, 144, 196)}
  assert all(d["clearly_better"] for d in off if d["count"] != 100 or d["fixed"] == "fixed_256")
  # marks rises 64 < 144 < 196 < 256 for tokenflex, but not for the fixed models.
  assert experiment.rising_families(s) == []
  assert experiment.rising_by_model(s) == {"fixed_64": [], "fixed_256": [],
                                           "tokenflex": ["marks"]}
  assert experiment.rising_families({"families": FAMILIES, "models": {
      "tokenflex": s["models"]["tokenflex"]}}) == ["marks"]
  reach = experiment.budget_reach(s)
  assert reach["mean_visual_tokens"] == 140.0  # 0.825 is within 1 point of 0.83
  skip = s["auto_budget_ladders"]["64-256"]["curve"]
  assert experiment.budget_reach(s, skip)["mean_visual_tokens"] == 320.0
  assert experiment.budget_reach(s, skip[:1]) is None


def test_report_files(workdir, tmp_path):
  out = str(tmp_path / "docs")
  summary = report.write_report(workdir, out)
  for name in ("results.md", "results.json", "results_accuracy.png", "results_budget.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  saved = json.load(open(os.path.join(out, "results.json")))
  assert saved["command"] == "bash launch/reproduce.sh repro\n" and saved["wall_time_s"] == 180
  assert set(saved["models"]) == {"fixed_64", "fixed_256", "tokenflex"}
  assert saved["models"] == json.loads(json.dumps(summary["models"]))
  md = open(os.path.join(out, "results.md")).read()
  assert "`bash launch/reproduce.sh repro`" in md
  assert "| 64 | fixed_64 | 71.0 ± 1.0 | 70.0 ± 1.0 | -1.0 (spread 1.4) | yes |" in md
  assert "**Automatic budget, log-prob, 64 → 144 → 256**: within 1 point" in md
  assert "| auto, log-prob, 64 → 256 | always escalate | 83.0 | 320.0 | 125 |" in md
  assert "**Automatic budget, router, 64 → 256 (2 seeds)**: within 1 point of TokenFLEX " \
      "at 256 tokens at 100.0 mean visual tokens (39% of 256" in md
  assert "| tokenflex | 64/144/256 at 3:3:3 | swiglu, adaptive_avg | 2 |" in md
  assert experiment_report.verdict(summary)[0].startswith("- **At each fixed model's own count")


def test_the_report_says_what_its_figures_do_not_show(workdir):
  s = experiment.summarize(experiment.collect(workdir))
  lines = experiment_report.caveats(s)
  assert lines[0].startswith("- ± is the population standard deviation over seeds (ddof=0); "
                             "with 2 seeds the sample SD is 1.41x larger.")
  assert not any("a spread over" in line for line in lines)  # spreads of 1 point here
  shaky = json.loads(json.dumps(s))
  shaky["models"]["fixed_256"]["accuracy"]["144"]["std"] = 0.15
  assert experiment_report.caveats(shaky)[1].startswith(
      "- fixed_256: a spread over 10 points at some count")
  assert "## What these figures do not show" in experiment_report.markdown(s)
