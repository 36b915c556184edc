"""The reproduction report: per-seed values, paired statistics over seeds, the criteria,
collapsed runs, each ladder's oracle, and the files."""

import json
import math
import os
import re
import subprocess

import numpy as np
import pytest

from tokenflex_jax import errors, report
from tokenflex_jax.studies import experiment, experiment_report

COUNTS = ("64", "100", "144", "196", "256")
FAMILIES = {"background": {"granularity": "coarse", "chance": 0.125},
            "marks": {"granularity": "fine", "chance": 0.125}}
SEEDS = (0, 1, 2)
# Per model and count, the accuracy of seeds 0, 1, 2 (the family average). TokenFLEX -
# fixed_64 at 64: -1, +1, -1.5 points (mean -0.5, its interval crossing -1); TokenFLEX -
# fixed_256 at 256: +3, +3, +2.5 (at least as accurate, clearly better); at 100,
# TokenFLEX - fixed_64: +2, -3, +4 (not clearly better).
ACC = {
    "fixed_64": {**{c: (0.50, 0.53, 0.51) for c in COUNTS}, "64": (0.70, 0.72, 0.71)},
    "fixed_256": {**{c: (0.40, 0.42, 0.41) for c in COUNTS}, "256": (0.80, 0.81, 0.82)},
    "tokenflex": {"64": (0.69, 0.73, 0.695), "100": (0.52, 0.50, 0.55),
                  "144": (0.72, 0.74, 0.73), "196": (0.75, 0.76, 0.78),
                  "256": (0.83, 0.84, 0.845)},
}
TRAINED = {"fixed_64": [64], "fixed_256": [256], "tokenflex": [64, 144, 256]}


def _eval(acc: dict[str, float], auto: bool) -> dict:
  """An eval results.json whose family average at each count is ``acc[count]``."""
  out = {"step": 10, "suite": "scenes", "examples_per_family": 5, "families": FAMILIES,
         "results": {c: {"visual_tokens": int(c), "average": acc[c],
                         "families": {"background": 1.0, "marks": 2 * acc[c] - 1.0},
                         "examples_per_s": 1.0} for c in COUNTS}}
  if auto:
    out["auto_budget"] = {"counts": [64, 144, 256], "signal": "log-prob", "curve": [
        {"threshold": -1.0, "accuracy": acc["64"], "mean_visual_tokens": 70.0, "families": {}},
        {"threshold": -0.5, "accuracy": acc["256"] - 0.005, "mean_visual_tokens": 140.0},
        {"threshold": None, "accuracy": acc["256"], "mean_visual_tokens": 464.0}],
        "oracle": {"accuracy": acc["256"] + 0.05, "mean_visual_tokens": 90.0}}
    skip = {"counts": [64, 256], "curve": [
        {"threshold": -1.0, "accuracy": acc["64"], "mean_visual_tokens": 64.0},
        {"threshold": None, "accuracy": acc["256"], "mean_visual_tokens": 320.0}],
        "oracle": {"accuracy": acc["256"] + 0.02, "mean_visual_tokens": 110.0}}
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
                               "position_embedding": True}, "llm": {"vocab_size": 8}}}
  with open(os.path.join(base, "stage2", "config.json"), "w") as f:
    json.dump(cfg, f)
  with open(os.path.join(base, "stage2", "eval", "results.json"), "w") as f:
    json.dump(_eval(acc, auto=len(counts) > 1), f)
  open(os.path.join(base, "eval.done"), "w").close()
  with open(os.path.join(workdir, "wall_times.tsv"), "a") as f:
    f.write(f"{name}\t{seed}\tstage1\t10\n{name}\t{seed}\tstage2\t20\n")


@pytest.fixture
def workdir(tmp_path):
  w = str(tmp_path / "repro")
  for seed in SEEDS:
    for name, acc in ACC.items():
      _write_run(w, name, seed, TRAINED[name], {c: acc[c][seed] for c in COUNTS},
                 (0.2, 0.2) if name == "fixed_64" else (0.5, 0.5))
  os.makedirs(os.path.join(w, "fixed_144", "seed0"))  # not evaluated yet: left out
  with open(os.path.join(w, "command.txt"), "w") as f:
    f.write("bash launch/reproduce.sh repro\n")
  return w


@pytest.fixture
def summary(workdir):
  return experiment.summarize(experiment.collect(workdir), "cmd", 1.0,
                              {"report": "a" * 40, "runs": "b" * 40})


def _copy(s):
  return json.loads(json.dumps(s))


def test_student_t_against_closed_forms():
  for t in (-3.0, -0.4, 0.0, 0.7, 2.0, 6.0, 40.0):
    assert experiment.t_cdf(t, 1) == pytest.approx(0.5 + math.atan(t) / math.pi, abs=1e-12)
    assert experiment.t_cdf(t, 2) == pytest.approx(0.5 + t / (2 * math.sqrt(2 + t * t)),
                                                   abs=1e-12)
  # Published two-sided 5% critical values.
  assert experiment.t_quantile(0.975, 2) == pytest.approx(4.302652729911275, abs=1e-8)
  assert experiment.t_quantile(0.975, 10) == pytest.approx(2.228138851986274, abs=1e-8)
  assert experiment.t_quantile(0.025, 4) == pytest.approx(-2.7764451051977987, abs=1e-8)
  assert experiment.betainc(2.5, 1.0, 0.3) == pytest.approx(0.3 ** 2.5, abs=1e-13)
  assert experiment.betainc(3.0, 0.5, 0.9) == pytest.approx(
      1 - experiment.betainc(0.5, 3.0, 0.1), abs=1e-13)


def test_paired_t_against_a_hand_computed_value():
  # Differences 7, 5, 4 points: mean 16/3, sample SD sqrt(7/3), SE sqrt(7/9), t with 2
  # degrees of freedom, whose two-sided p is 1 - t / sqrt(2 + t^2).
  a, b = {0: 0.85, 1: 0.80, 2: 0.78, 5: 0.1}, {0: 0.78, 1: 0.75, 2: 0.74}
  d = experiment.paired(a, b)
  se, t = math.sqrt(7 / 9), (16 / 3) / math.sqrt(7 / 9)
  assert d["seeds"] == [0, 1, 2]  # seed 5 has no partner
  assert d["diffs"] == pytest.approx([7, 5, 4]) and d["delta"] == pytest.approx(16 / 3)
  assert d["sd"] == pytest.approx(math.sqrt(7 / 3))
  assert d["ci"] == pytest.approx([16 / 3 - 4.302652729911275 * se,
                                   16 / 3 + 4.302652729911275 * se])
  assert d["p"] == pytest.approx(1 - t / math.sqrt(2 + t * t)) and d["p"] == pytest.approx(
      0.02627, abs=1e-5)
  one = experiment.paired({0: 0.5}, {0: 0.4})
  assert one["delta"] == pytest.approx(10) and one["ci"] is None and one["p"] is None
  same = experiment.paired({0: 0.5, 1: 0.6}, {0: 0.5, 1: 0.6})
  assert same["ci"] == [0.0, 0.0] and same["p"] == 1.0


def test_a_tower_matches_its_archive_to_float32_rounding_not_beyond():
  kept = '"train/loss": 4.640263081\n"train/loss": 3.5\n'
  assert experiment.tower_difference(kept, kept) is None
  # Another processor: 1e-7 relative (docs/configs.md).
  assert experiment.tower_difference(kept, '"train/loss": 4.640263557\n"train/loss": 3.5') is None
  assert "relative difference 0.029" in experiment.tower_difference(
      kept, '"train/loss": 4.640263081\n"train/loss": 3.6')
  assert "1 losses against 2 kept" in experiment.tower_difference(kept, '"train/loss": 4.6')


def test_a_resumed_tower_keeps_each_steps_last_loss(tmp_path):
  path = tmp_path / "metrics.jsonl"
  # Steps 1 and 2, killed before a save, then 1 and 2 again: the last record of each.
  rows = [(1, 9.0), (2, 8.0), (1, 4.640263081), (2, 3.5)]
  path.write_text("".join(json.dumps({"step": s, "train/loss": x}) + "\n" for s, x in rows)
                  + json.dumps({"step": 2, "eval/x": 1.0}) + "\n")
  assert experiment.tower_losses(str(path)) == '"train/loss": 4.640263081\n"train/loss": 3.5\n'


def test_spreads_are_sample_sds():
  assert experiment.mean_sd([0.7, 0.8, 0.9]) == pytest.approx({"mean": 0.8, "std": 0.1})
  assert experiment.mean_sd([0.7]) == {"mean": 0.7, "std": 0.0}


def test_collect_and_summarize(workdir):
  runs = experiment.collect(workdir)
  assert [(r.name, r.seed) for r in runs][:4] == [("fixed_64", 0), ("fixed_64", 1),
                                                   ("fixed_64", 2), ("fixed_256", 0)]
  assert runs[0].train_seconds == pytest.approx(0.2 * 4) and runs[0].wall_seconds == 30
  # A paused step does not count: the median per count, times its steps.
  path = os.path.join(workdir, "fixed_64", "seed0", "stage1", "metrics.jsonl")
  with open(path, "a") as f:
    f.write(json.dumps({"step": 3, "train/step_time_s": 100.0, "train/num_tokens": 64}) + "\n")
  assert experiment.collect(workdir)[0].train_seconds == pytest.approx(0.2 * 5)
  with open(path, "a") as f:  # steps 2 and 3 redone after a restart: counted once each
    for step in (2, 3):
      f.write(json.dumps({"step": step, "train/step_time_s": 0.2, "train/num_tokens": 64}) + "\n")
  assert experiment.collect(workdir)[0].train_seconds == pytest.approx(0.2 * 5)
  assert runs[6].name == "tokenflex"
  assert runs[6].train_visual_tokens == pytest.approx(np.mean([64, 144, 256]))
  s = experiment.summarize(runs, "cmd", 123.0, {"report": "abc", "runs": "def"})
  flex = s["models"]["tokenflex"]
  assert flex["seeds"] == 3 and flex["seed_ids"] == [0, 1, 2]
  assert flex["train_counts"] == [64, 144, 256]
  assert flex["per_seed"]["accuracy"]["64"] == [0.69, 0.73, 0.695]
  assert flex["per_seed"]["families"]["256"]["marks"] == pytest.approx([0.66, 0.68, 0.69])
  assert flex["accuracy"]["64"]["mean"] == pytest.approx(0.705)
  assert flex["accuracy"]["64"]["std"] == pytest.approx(np.std([0.69, 0.73, 0.695], ddof=1))
  assert flex["families"]["256"]["marks"]["std"] == pytest.approx(
      np.std([0.66, 0.68, 0.69], ddof=1))
  assert s["models"]["fixed_64"]["train"]["step_seconds"] == pytest.approx(0.8)
  assert s["revision"] == {"report": "abc", "report_modified": False, "runs": "def"}
  assert "design choices" in s["evaluation_split"] and "ddof=1" in s["spread"]
  assert [p["mean_visual_tokens"] for p in s["auto_budget"]] == [70.0, 140.0, 464.0]
  assert [p["threshold"] for p in s["auto_budget"]] == [-1.0, -0.5, None]
  assert all(set(p) == {"threshold", "accuracy", "mean_visual_tokens"} for p in s["auto_budget"])
  assert list(s["auto_budget_ladders"]) == ["64-144-256", "64-256"]
  skip = s["auto_budget_ladders"]["64-256"]
  assert skip["seed_ids"] == [0, 1, 2] and skip["seeds"] == 3
  assert skip["per_seed"][1]["curve"][1]["accuracy"] == 0.84
  assert skip["curve"][1]["mean_visual_tokens"] == 320.0
  assert s["oracle"]["accuracy"] == pytest.approx(np.mean([0.83, 0.84, 0.845]) + 0.05)
  assert s["graded_solvable"]["marks"]["256"] == 1.0
  assert s["collapsed"] == []
  assert experiment.restat(_copy(s)) == _copy(s)  # what --from_json renders
  with pytest.raises(ValueError, match="no evaluated runs"):
    experiment.summarize([])


def test_every_ladder_keeps_its_own_oracle(summary):
  s = summary
  assert s["auto_budget_ladders"]["64-144-256"]["oracle"]["mean_visual_tokens"] == 90.0
  assert s["auto_budget_ladders"]["64-256"]["oracle"]["mean_visual_tokens"] == 110.0
  assert s["auto_budget_router_ladders"]["64-256"]["oracle"]["mean_visual_tokens"] == 110.0
  md = experiment_report.markdown(s)
  flex_top = np.mean([0.83, 0.84, 0.845])
  rows = {line.split(" | ")[0]: line for line in md.splitlines() if line.startswith("| ")}
  assert rows["| log-prob, 64 → 144 → 256"].endswith(
      f"| {100 * (flex_top + 0.05):.1f}% at 90.0 tokens |")
  for ladder in ("log-prob, 64 → 256",
                 "supervised router (cross-fitted on the evaluation set), 64 → 256"):
    assert rows[f"| {ladder}"].endswith(f"| {100 * (flex_top + 0.02):.1f}% at 110.0 tokens |")
  assert md.count("at 110.0 tokens") == 2 and md.count("at 90.0 tokens") == 1


def test_criteria(summary):
  s = summary
  own = {d["count"]: d for d in experiment.own_count_deltas(s)}
  # At 64: within 1 point on the mean (-0.5), but the interval crosses the margin.
  assert own[64]["diffs"] == pytest.approx([-1.0, 1.0, -1.5])
  assert own[64]["delta"] == pytest.approx(-0.5) and own[64]["ci"][0] < -experiment.MARGIN
  assert not own[64]["holds"] and not own[64]["clearly_better"]
  assert own[256]["diffs"] == pytest.approx([3.0, 3.0, 2.5])
  assert own[256]["ci"][0] > 0 and own[256]["holds"] and own[256]["clearly_better"]
  # The same mean with consistent seeds: the interval clears the margin.
  steady = _copy(s)
  steady["models"]["tokenflex"]["per_seed"]["accuracy"]["64"] = [0.695, 0.715, 0.705]
  assert experiment.own_count_deltas(experiment.restat(steady))[0]["holds"]
  off = {(d["fixed"], d["count"]): d for d in experiment.off_count_deltas(s)}
  assert set(off) == {("fixed_64", c) for c in (100, 144, 196, 256)} | {
      ("fixed_256", c) for c in (64, 100, 144, 196)}
  assert off[("fixed_64", 100)]["diffs"] == pytest.approx([2.0, -3.0, 4.0])
  assert [k for k, d in off.items() if not d["clearly_better"]] == [("fixed_64", 100)]
  # marks rises 64 < 144 < 196 < 256 for tokenflex, not for the fixed models.
  assert experiment.rising_by_model(s) == {"fixed_64": [], "fixed_256": [],
                                           "tokenflex": ["marks"]}
  assert experiment.rising_families(s) == []


def test_budget_reach_is_paired_with_tokenflex(summary):
  s = summary
  reach = experiment.budget_reach(s)  # 0.5 points below TokenFLEX at 256 on every seed
  assert reach["mean_visual_tokens"] == 140.0 and reach["delta"] == pytest.approx(-0.5)
  skip = s["auto_budget_ladders"]["64-256"]
  assert experiment.budget_reach(s, skip)["mean_visual_tokens"] == 320.0
  shaky = _copy(s)  # the same mean, seeds 2 points apart: no longer shown within 1 point
  points = shaky["auto_budget_ladders"]["64-144-256"]["per_seed"]
  points[0]["curve"][1]["accuracy"] -= 0.02
  points[1]["curve"][1]["accuracy"] += 0.02
  shaky = experiment.restat(shaky)
  assert shaky["auto_budget"][1]["accuracy"] == pytest.approx(s["auto_budget"][1]["accuracy"])
  assert experiment.budget_reach(shaky)["mean_visual_tokens"] == 464.0
  short = _copy(s)
  short["auto_budget_ladders"]["64-256"]["per_seed"] = [
      {**r, "curve": r["curve"][:1]} for r in skip["per_seed"]]
  assert experiment.budget_reach(s, experiment.restat(short)["auto_budget_ladders"]["64-256"]) \
      is None


def _collapse(s, model, seed, family, value=0.13):
  """``s`` with ``model``'s ``seed`` scoring ``value`` on ``family`` at every count."""
  out = _copy(s)
  fams = out["models"][model]["per_seed"]["families"]
  for c in COUNTS:
    fams[c][family][out["models"][model]["seed_ids"].index(seed)] = value
  return experiment.restat(out)


def test_collapsed_runs_are_flagged(summary):
  s = _collapse(summary, "fixed_256", 1, "background")
  assert s["collapsed"] == [{"model": "fixed_256", "seed": 1, "family": "background",
                             "chance": 0.125, "accuracy": pytest.approx(0.13),
                             "others": 1.0}]
  assert experiment.collapsed_seeds(s) == {"fixed_256": {1}}
  # Not at chance at every count, or the other seeds not well above: not flagged.
  once = _copy(summary)
  once["models"]["fixed_256"]["per_seed"]["families"]["64"]["background"][1] = 0.13
  assert experiment.restat(once)["collapsed"] == []
  low = _collapse(_collapse(summary, "fixed_256", 1, "background"), "fixed_256", 0,
                  "background", 0.2)
  assert low["collapsed"] == []
  md = experiment_report.markdown(s)
  assert "| fixed_256 † | 256 |" in md and "| fixed_256 | 1 | background 13.0 / 100.0 |" in md
  assert "- **Collapsed runs** (fixed_256 seed 1; †): kept in the verdicts above; without " \
      "them the verdicts are the same." in md
  assert "- Collapsed runs (†) are kept in every mean, SD and test." in md


def test_verdicts_without_collapsed_runs_when_they_change(summary):
  # TokenFLEX's seed 1 collapses: with it, fixed_256 at 256 is no longer matched.
  s = _copy(summary)
  s["models"]["tokenflex"]["per_seed"]["accuracy"]["256"][1] = 0.5
  s = _collapse(experiment.restat(s), "tokenflex", 1, "background")
  assert not experiment.own_count_deltas(s)[1]["holds"]
  without = experiment.own_count_deltas(s, exclude={"tokenflex": {1}})
  assert without[1]["seeds"] == [0, 2] and without[1]["holds"]
  lines = experiment_report.verdict(s)
  i = next(i for i, line in enumerate(lines) if line.startswith("- **Collapsed runs**"))
  assert lines[i].endswith("without them the verdicts change:")
  assert lines[i + 1].startswith("  - **At each fixed model's own count**")
  assert "shown at 1 of 2 counts" in lines[i + 1]


def test_runs_at_several_revisions_say_what_code_differs(tmp_path):
  repo = str(tmp_path / "repo")
  git = lambda *a: subprocess.run(["git", "-C", repo, *a], check=True, capture_output=True,
                                  text=True).stdout.strip()
  os.makedirs(os.path.join(repo, "tokenflex_jax"))
  os.makedirs(os.path.join(repo, "launch"))
  git("init", "-q")
  revs = []
  for name, text in (("tokenflex_jax/a.py", "x = 1\n"), ("docs.md", "results\n"),
                     ("tokenflex_jax/a.py", "x = 2\n"), ("launch/run.sh", "true\n")):
    with open(os.path.join(repo, name), "w", encoding="utf-8") as f:
      f.write(text)
    git("add", "-A")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", name)
    revs.append(git("rev-parse", "--short", "HEAD"))
  same = "tokenflex_jax/, configs/ and launch/ identical at all of them"
  assert report.runs_note(revs[0], repo) is None  # one revision: nothing to say
  assert report.runs_note(",".join(revs[:2]), repo) == same
  assert report.runs_note(",".join(revs[:3]), repo).endswith("differ from the first in "
                                                             "tokenflex_jax/a.py")
  assert report.runs_note(",".join(revs), repo).endswith(
      "differ from the first in launch/run.sh, tokenflex_jax/a.py")
  # A revision reproduce.sh marked "+uncommitted" is compared at its commit.
  assert report.runs_note(f"{revs[0]},{revs[1]}+uncommitted", repo) == same
  # What reproduce.sh records: "+uncommitted" for a change to the code, not to docs.
  assert report.short_revision(repo) == revs[-1]
  with open(os.path.join(repo, "docs.md"), "w", encoding="utf-8") as f:
    f.write("new results\n")
  assert report.short_revision(repo) == revs[-1]
  with open(os.path.join(repo, "launch", "run.sh"), "w", encoding="utf-8") as f:
    f.write("false\n")
  assert report.short_revision(repo) == revs[-1] + "+uncommitted"
  assert report.short_revision(str(tmp_path)) == "unknown"
  line = experiment_report._revision({"revision": {"runs": ",".join(revs[:2]),
                                                  "runs_note": "n"}})
  assert line.startswith(f"The runs trained at `{revs[0]}`, `{revs[1]}` (n);")


def test_report_files(workdir, tmp_path):
  out = str(tmp_path / "docs")
  summary = report.write_report(workdir, out, runs_revision="c" * 40)
  for name in ("results.md", "results.json", "results_accuracy.png", "results_budget.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0
  saved = json.load(open(os.path.join(out, "results.json")))
  assert saved["command"] == "bash launch/reproduce.sh repro\n" and saved["wall_time_s"] == 270
  assert set(saved["models"]) == {"fixed_64", "fixed_256", "tokenflex"}
  assert saved["models"] == json.loads(json.dumps(summary["models"]))
  assert saved["revision"]["runs"] == "c" * 40
  assert len(saved["revision"]["report"]) == 40  # this checkout's HEAD
  md = open(os.path.join(out, "results.md")).read()
  assert "`bash launch/reproduce.sh repro`" in md and "The runs trained at `ccccccc`" in md
  # Written outside docs/, its links still reach the README and docs/measurements.md.
  readme, measurements = re.search(r"\[README\]\(([^)]+)\) · \[measurements\]\(([^)]+)\)",
                                   md).groups()
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  assert os.path.normpath(os.path.join(out, readme)) == os.path.join(repo, "README.md")
  assert os.path.normpath(os.path.join(out, measurements)) == os.path.join(
      repo, "docs", "measurements.md")
  assert experiment_report.markdown(summary).count("[README](../README.md)") == 1
  assert "mean ± sample SD (ddof=1) over seeds 0, 1, 2" in md
  assert "| fixed_64 | 64 | -1.0, +1.0, -1.5 | -0.5 [" in md and "| no |" in md
  assert "shown at 1 of 2 counts (TokenFLEX − fixed, fixed_64 at 64: -0.5 [" in md
  assert "clearly better (interval above 0) in 7 of 8 (model, count) pairs" in md
  assert "| tokenflex | 64/144/256 at 3:3:3 | swiglu, adaptive_avg | 3 |" in md
  assert "No development split" in md
  # Rendered again from its results.json: the same report.
  again = str(tmp_path / "again")
  report.render_json(os.path.join(out, "results.json"), again)
  assert open(os.path.join(again, "results.md")).read() == md
  old = _copy(saved)
  del old["models"]["tokenflex"]["per_seed"]
  with open(os.path.join(again, "old.json"), "w") as f:
    json.dump(old, f)
  with pytest.raises(errors.InputError, match="keeps no per-seed values"):
    report.render_json(os.path.join(again, "old.json"), again)


def test_the_report_says_what_its_figures_do_not_show(summary):
  lines = experiment_report.caveats(summary)
  assert lines[0].startswith("- 3 seeds: a paired 95% interval is the mean difference "
                             "± 4.30 standard errors")
  assert any("fitted and scored on these questions" in line for line in lines)
  assert not any("Collapsed" in line for line in lines)
  one = _copy(summary)
  for info in one["models"].values():
    info["seed_ids"] = info["seed_ids"][:1]
    info["per_seed"] = {"accuracy": {c: v[:1] for c, v in info["per_seed"]["accuracy"].items()},
                        "families": {c: {f: v[:1] for f, v in fams.items()} for c, fams
                                     in info["per_seed"]["families"].items()}}
  one = experiment.restat(one)
  assert experiment_report.caveats(one)[0].startswith("- 1 seed: no spread")
  assert "(one seed: no interval)" in experiment_report.markdown(one)
  assert "## What these figures do not show" in experiment_report.markdown(summary)


def _questions(path, credit_of, seed):
  """questions.npz of 200 questions, half "background" (right at every count), half
  "marks" (``credit_of(count)`` for each)."""
  rng = np.random.default_rng(seed)
  n = 200
  families = np.array(["background", "marks"])[np.arange(n) % 2]
  prompts = np.stack([np.zeros(n, int), np.where(families == "marks", 5, 6)], 1)
  record = {"prompts": prompts.astype(np.int32), "families": families}
  for c in COUNTS:
    record[f"credit_{c}"] = np.where(families == "marks", credit_of(int(c)), 1.0)
    record[f"confidence_{c}"] = rng.normal(size=n).astype(np.float32)
    record[f"seconds_{c}"] = np.float64(int(c) / 1e4)
  np.savez_compressed(path, **record)


def test_paired_table_bootstrap_and_the_budget_on_the_test_seed(workdir):
  """TokenFLEX minus each model per count and family, seed by seed ([0, 1] units); the
  paired bootstrap over seeds and questions; the budget's rules fixed on a development
  evaluation and scored on the test one; the evaluation seeds recorded."""
  for seed in SEEDS:
    for name in ACC:
      base = os.path.join(workdir, name, f"seed{seed}", "stage2", "eval")
      marks = {"tokenflex": lambda c: float(c >= 144), "fixed_256": lambda c: 0.0,
               "fixed_64": lambda c: 0.0}[name]
      _questions(os.path.join(base, "questions.npz"), marks, seed)
      with open(os.path.join(base, "results.json")) as f:
        results = json.load(f)
      with open(os.path.join(base, "results.json"), "w") as f:
        json.dump({**results, "eval_seed": 12345}, f)
      if name == "tokenflex":  # the development evaluation: config.eval.tag "dev"
        dev = os.path.join(base, "scenes_dev", "step_10")
        os.makedirs(dev)
        _questions(os.path.join(dev, "questions.npz"), marks, 100 + seed)
        with open(os.path.join(dev, "results.json"), "w") as f:
          json.dump({**results, "eval_seed": 777}, f)
        with open(os.path.join(base, "index.json"), "w") as f:
          json.dump({"evaluations": [{"suite": "scenes_dev", "step": 10,
                                      "dir": "scenes_dev/step_10"}]}, f)
  s = experiment.summarize(experiment.collect(workdir), "cmd", 1.0, {"runs": "b" * 40})
  assert s["code_revision"] == "b" * 40
  assert s["eval_seeds"] == {"development": 777, "test": 12345}
  assert s["evaluation_split"] == experiment.DEV_TEST_SPLIT
  assert s["models"]["tokenflex"]["seeds"] == 3 and s["models"]["tokenflex"]["collapsed"] == 0
  at_256 = s["paired"]["tokenflex-fixed_256"]["256"]
  assert at_256["mean"] == pytest.approx((0.03 + 0.03 + 0.025) / 3)
  assert at_256["seeds"] == 3 and at_256["ci95"][0] < at_256["mean"] < at_256["ci95"][1]
  marks = s["paired"]["tokenflex-fixed_256"]["families"]["marks"]["256"]
  assert marks["mean"] == pytest.approx(2 * at_256["mean"])  # marks = 2 * average - 1
  # The bootstrap: TokenFLEX answers every "marks" question from 144 on, fixed_256 none.
  lo, hi = s["bootstrap"]["tokenflex-fixed_256"]["256"]
  assert 0.4 < lo <= 0.5 <= hi < 0.6
  assert s["bootstrap"]["tokenflex-fixed_256"]["families"]["marks"]["256"] == [1.0, 1.0]
  assert s["bootstrap"]["tokenflex-fixed_256"]["64"] == [0.0, 0.0]
  # The budget: the router escalates "marks" from 64 to 144 (where it is right) and
  # keeps the rest at 64; the family rule asks "marks" at 256 directly. Both are as
  # accurate as 256, at 64 + 144 / 2 and (64 + 256) / 2 tokens.
  budget = s["budget_split"]
  assert budget["seeds"] == [0, 1, 2] and budget["largest"] == "fixed_256"
  for rule, tokens in (("router", 64 + 72), ("family rule", 160)):
    assert budget["rules"][rule]["accuracy"]["mean"] == pytest.approx(1.0)
    assert budget["rules"][rule]["mean_visual_tokens"]["mean"] == pytest.approx(tokens)
    assert budget["rules"][rule]["vs_largest"]["delta"] == pytest.approx(0.0)
  assert json.loads(json.dumps(s)) is not None  # results.json serialises
  md = experiment_report.markdown(s)
  assert "| router | 100.0 ± 0.0 | 136.0 |" in md and " b[+" in md
  assert "fitted on the development questions and scored on the test ones" in md
  # The development questions alone (reproduce.sh --dev_only, report --split=dev): the
  # runs whose development evaluation finished, reported as such.
  for seed in SEEDS:
    open(os.path.join(workdir, "tokenflex", f"seed{seed}", "eval_dev.done"), "w").close()
  dev_runs = experiment.collect(workdir, "dev")
  assert {r.name for r in dev_runs} == {"tokenflex"} and len(dev_runs) == 3
  dev = experiment.summarize(dev_runs, "cmd", 1.0, split="dev")
  assert dev["evaluation_split"] == experiment.DEV_DESIGN
  assert dev["eval_seeds"] == {"development": 777, "test": None}
  with pytest.raises(ValueError, match="split must be one of"):
    experiment.collect(workdir, "validation")


def test_the_report_renders_the_paired_table_and_the_split_budget(workdir):
  md = experiment_report.markdown(experiment.summarize(experiment.collect(workdir), "cmd", 1.0))
  assert "## Paired differences per count and family" in md
  assert "| tokenflex-fixed_256 | average |" in md and "| tokenflex-fixed_256 | marks |" in md
  # Without a development evaluation the report says so.
  assert "No development evaluation" in md
