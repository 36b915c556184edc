"""Renders a reproduction summary (`experiment.summarize`) as docs/results.md, its
results.json and plots (results_accuracy.png, results_budget.png)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

from tokenflex_jax.evaluation import experiment
from tokenflex_jax.evaluation.report import BUDGET_XLABEL, new_axes, save_figure

MAIN = ("fixed_64", "fixed_144", "fixed_256", "tokenflex")


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def _pm(stat: Mapping[str, float]) -> str:
  return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _trained(info: Mapping[str, Any]) -> str:
  counts = "/".join(map(str, info["train_counts"]))
  if len(info["train_counts"]) == 1:
    return counts
  total = sum(info["train_probs"])
  return f"{counts} at {':'.join(f'{10 * p / total:.0f}' for p in info['train_probs'])}"


def _accuracy_table(s: Mapping[str, Any]) -> list[str]:
  counts = [str(c) for c in s["eval_counts"]]
  lines = ["| model | trained at | projector | seeds | " + " | ".join(counts) + " |",
           "|---|---|---|---|" + "---|" * len(counts)]
  for name, info in s["models"].items():
    proj = info.get("projector", {})
    proj_s = (f"{proj.get('mlp', 'swiglu')}, {proj.get('pooling', 'adaptive_avg')}"
              + ("" if proj.get("position_embedding", False) else ", no pos. emb."))
    cells = [(f"**{_pm(info['accuracy'][c])}**" if int(c) in info["train_counts"]
              else _pm(info["accuracy"][c])) for c in counts]
    lines.append(f"| {name} | {_trained(info)} | {proj_s} | {info['seeds']} | "
                 + " | ".join(cells) + " |")
  return lines


def _delta_row(first: str, second: str, d: Mapping[str, Any], models: Mapping[str, Any],
               verdict: bool) -> str:
  """One row of a TokenFLEX-against-a-fixed-model table: the two leading cells, both
  accuracies at ``d``'s count, the difference with its spread, and the verdict."""
  c = str(d["count"])
  return (f"| {first} | {second} | {_pm(models[d['fixed']]['accuracy'][c])} | "
          f"{_pm(models['tokenflex']['accuracy'][c])} | {d['delta']:+.1f} "
          f"(spread {d['spread']:.1f}) | {'yes' if verdict else 'no'} |")


def _own_count_section(s: Mapping[str, Any]) -> list[str]:
  deltas = experiment.own_count_deltas(s)
  if not deltas:
    return ["(needs `tokenflex` and at least one fixed model)"]
  models = s["models"]
  lines = ["| count | fixed model | fixed | TokenFLEX | TokenFLEX − fixed (points) | "
           "within the spread or better |", "|---|---|---|---|---|---|"]
  lines += [_delta_row(str(d["count"]), d["fixed"], d, models, d["holds"]) for d in deltas]
  lines += ["", "Per family at each fixed model's own count (mean over seeds, %; "
            "TokenFLEX − fixed in brackets):", ""]
  fams = list(s["families"])
  lines += ["| count | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
  for d in deltas:
    c = str(d["count"])
    fixed, flex = models[d["fixed"]]["families"][c], models["tokenflex"]["families"][c]
    lines.append(f"| {c} | " + " | ".join(
        f"{_pct(flex[f]['mean'])} ({100 * (flex[f]['mean'] - fixed[f]['mean']):+.1f})"
        for f in fams) + " |")
  return lines


def _off_count_section(s: Mapping[str, Any]) -> list[str]:
  deltas = experiment.off_count_deltas(s)
  if not deltas:
    return ["(needs `tokenflex` and at least one fixed model)"]
  models = s["models"]
  lines = ["| fixed model | count | fixed | TokenFLEX | TokenFLEX − fixed (points) | "
           "clearly better (> spread and > 1) |", "|---|---|---|---|---|---|"]
  lines += [_delta_row(d["fixed"], str(d["count"]), d, models, d["clearly_better"])
            for d in deltas]
  return lines


def _family_section(s: Mapping[str, Any]) -> list[str]:
  counts = [str(c) for c in s["eval_counts"]]
  lines = ["| family | granularity | chance | model | " + " | ".join(counts) + " |",
           "|---|---|---|---|" + "---|" * len(counts)]
  for fam, info in s["families"].items():
    for name in (n for n in MAIN if n in s["models"]):
      stats = s["models"][name]["families"]
      lines.append(f"| {fam} | {info['granularity']} | {_pct(info['chance'])} | {name} | "
                   + " | ".join(_pct(stats[c][fam]["mean"]) for c in counts) + " |")
  graded = s.get("graded_solvable", {})
  if graded:
    lines += ["", "Share of the budget-graded families' questions whose answer survives the "
              "pooling (geometry alone, `evaluation/pooling_geometry.py`, adaptive_avg):", "",
              "| family | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
    for fam, shares in graded.items():
      lines.append(f"| {fam} | " + " | ".join(_pct(shares[c]) for c in counts) + " |")
  return lines


def _cost_section(s: Mapping[str, Any]) -> list[str]:
  models = s["models"]
  base = models.get("fixed_256")
  lines = ["Step time: per count, the median step time times that count's steps, stages 1 "
           "and 2 (compiles excluded; robust to the machine being shared for a while). Wall "
           "time: the two stages' processes, start-up and compiles included, as measured. "
           "Both are medians over the seeds.",
           "", "| model | mean visual tokens per training example | step time, stages 1+2 (s) | "
           "wall time, stages 1+2 (s) | step time / fixed_256's |", "|---|---|---|---|---|"]
  for name, info in models.items():
    t = info["train"]
    ratio = (f"{t['step_seconds'] / base['train']['step_seconds']:.2f}" if base else "-")
    lines.append(f"| {name} | {t['mean_visual_tokens']:.1f} | {t['step_seconds']:.0f} | "
                 f"{t['wall_seconds']:.0f} | {ratio} |")
  return lines


def _ladders(s: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{"signal, order": mean curve} for the confidence and the router, every escalation
  order; the primary one alone for evals without them."""
  out = {}
  for name, ladder in s.get("auto_budget_ladders", {}).items():
    out[f"log-prob, {name.replace('-', ' → ')}"] = ladder
  for name, ladder in s.get("auto_budget_router_ladders", {}).items():
    seeds = ladder["seeds"]
    out[f"router, {name.replace('-', ' → ')} ({seeds} seed{'s' * (seeds != 1)})"] = ladder
  if not out and s["auto_budget"]:
    name = "-".join(map(str, s.get("auto_budget_counts", []))) or "primary"
    out[f"log-prob, {name.replace('-', ' → ')}"] = {"curve": s["auto_budget"],
                                                     "oracle": s["oracle"]}
  return out


def _threshold(t: float | None) -> str:
  return "always escalate" if t is None else f"{t:.3g}"


def _budget_section(s: Mapping[str, Any]) -> list[str]:
  ladders = _ladders(s)
  if not ladders:
    return ["(needs an evaluated `tokenflex`)"]
  flex = s["models"]["tokenflex"]
  top = max(flex["train_counts"])
  lines = ["The model answers at the smallest count of an escalation order and again at the "
           "next while the signal is under the threshold; every attempt counts. Signals: "
           "`log-prob`, the answer's mean token log-probability; `router`, a logistic "
           "regression of whether the answer is right from the question's tokens and that "
           "log-probability, cross-fitted on the evaluation set (2 folds; "
           "`evaluation/auto_budget.py`). Mean over seeds, threshold by threshold (the k-th "
           "threshold is the same decile of each seed's smallest-count signal).", ""]
  lines += ["| budget | threshold | accuracy (%) | mean visual tokens | % of "
            f"{top} |", "|---|---|---|---|---|"]
  for c in s["eval_counts"]:
    lines.append(f"| fixed {c} | | {_pct(flex['accuracy'][str(c)]['mean'])} | {c} | "
                 f"{100 * c / top:.0f} |")
  for name, ladder in ladders.items():
    for p in ladder["curve"]:
      lines.append(f"| auto, {name} | {_threshold(p['threshold'])} | "
                   f"{_pct(p['accuracy'])} | {p['mean_visual_tokens']:.1f} | "
                   f"{100 * p['mean_visual_tokens'] / top:.0f} |")
  o = s["oracle"]
  lines.append(f"| oracle (the smallest count that answers best) | | {_pct(o['accuracy'])} | "
               f"{o['mean_visual_tokens']:.1f} | {100 * o['mean_visual_tokens'] / top:.0f} |")
  return lines


def verdict(s: Mapping[str, Any]) -> list[str]:
  """The issue's criteria, each stated as met or not from the numbers above."""
  lines = []
  own = experiment.own_count_deltas(s)
  if own:
    bad = [d for d in own if not d["holds"]]
    lines.append(
        "- **At each fixed model's own count**: TokenFLEX is "
        + ("at least as accurate within the seeds' spread at every count"
           if not bad else "below the fixed model beyond the spread at "
           + ", ".join(f"{d['count']} ({d['delta']:+.1f} points, spread {d['spread']:.1f})"
                       for d in bad))
        + " (" + ", ".join(f"{d['count']}: {d['delta']:+.1f}" for d in own) + ").")
  off = experiment.off_count_deltas(s)
  if off:
    won = sum(d["clearly_better"] for d in off)
    lines.append(f"- **Off the fixed models' own counts**: TokenFLEX is clearly better in "
                 f"{won} of {len(off)} (model, count) pairs; the mean difference is "
                 f"{sum(d['delta'] for d in off) / len(off):+.1f} points.")
  rising = experiment.rising_families(s)
  per_model = experiment.rising_by_model(s)
  lines.append("- **Accuracy rising with the count (64 < 144 < 196 < 256) for every model**: "
               + (", ".join(rising) if rising else "no family") + "; per model: "
               + "; ".join(f"{m} {', '.join(f) or 'none'}" for m, f in per_model.items()) + ".")
  if s["auto_budget"]:
    top = max(s["models"]["tokenflex"]["train_counts"])
    for name, ladder in _ladders(s).items():
      reach = experiment.budget_reach(s, ladder["curve"])
      order = name
      if reach:
        lines.append(f"- **Automatic budget, {order}**: within 1 point of TokenFLEX at {top} "
                     f"tokens at {reach['mean_visual_tokens']:.1f} mean visual tokens "
                     f"({100 * reach['mean_visual_tokens'] / top:.0f}% of {top}; the target is "
                     f"at most 60%); the oracle needs {s['oracle']['mean_visual_tokens']:.1f}.")
      else:
        best = max(ladder["curve"], key=lambda p: p["accuracy"])
        lines.append(f"- **Automatic budget, {order}**: never within 1 point of TokenFLEX at "
                     f"{top} tokens; its best is {_pct(best['accuracy'])}% at "
                     f"{best['mean_visual_tokens']:.1f} tokens.")
  return lines


# Models whose accuracy varies more than this over seeds (an SD, at any count) are flagged.
UNSTABLE_SD = 0.10


def caveats(s: Mapping[str, Any]) -> list[str]:
  """What the report's figures cannot support, read from the summary ``s``."""
  seeds = min(info["seeds"] for info in s["models"].values())
  unstable = [name for name, info in s["models"].items()
              if max(a["std"] for a in info["accuracy"].values()) > UNSTABLE_SD]
  lines = [
      f"- ± is the population standard deviation over seeds (ddof=0); with {seeds} seeds the "
      f"sample SD is {((seeds / (seeds - 1)) ** 0.5 if seeds > 1 else float('nan')):.2f}x "
      "larger. \"Within the spread\" compares a mean difference with the spread; it is not "
      "a test. The summary keeps no per-seed values, so no paired test over seeds is made.",
      "- The design choices of the demo recipe (the projector's position embedding, the "
      "visual tokens' rotary layout) were made on these same evaluation questions: there "
      "was no separate development split.",
      "- The router rows of the automatic budget are a supervised router, cross-fitted on "
      "this evaluation set; `predict --num_tokens=auto` escalates on the answer's "
      "log-probability (the log-prob rows).",
      "- The code revision of the runs is not recorded in the summary."]
  if unstable:
    lines.insert(1, f"- {', '.join(unstable)}: a spread over {100 * UNSTABLE_SD:.0f} points "
                 "at some count (a seed far from the others, a sign of a collapsed run); "
                 "every seed is averaged in, none set apart.")
  return lines


def markdown(s: Mapping[str, Any]) -> str:
  hours = s["wall_time_s"] / 3600
  seeds = sorted({info["seeds"] for info in s["models"].values()})
  out = ["# Results: the paper's experiment in miniature", "",
         "[README](../README.md) · [measurements](measurements.md) (how these were diagnosed "
         "and what was tried)", "",
         f"Written by `python -m tokenflex_jax.report`, called by `{s['command'].strip()}` "
         f"after each seed; the stages finished so far took {s['wall_time_s']:.0f} s "
         f"({hours:.1f} h) of wall time in all, on the machine of docs/measurements.md. "
         f"Every number is what that command printed. {s['examples_per_family']} questions "
         f"per family, {len(s['families'])} families; accuracy is the family average in %, "
         f"mean ± standard deviation over {'/'.join(map(str, seeds))} "
         f"seed{'s' * (seeds != [1])}; bold: a count "
         "the model trained on.", "",
         "## Verdict", "", *verdict(s), "",
         "## What these figures do not show", "", *caveats(s), "",
         "## Average accuracy at each visual-token count", "", *_accuracy_table(s), "",
         "![accuracy](results_accuracy.png)", "",
         "## TokenFLEX against each fixed model at that model's own count", "",
         *_own_count_section(s), "",
         "## The fixed models off their own count", "", *_off_count_section(s), "",
         "## Per family", "", *_family_section(s), "",
         "## Training cost: dynamic against fixed-256", "", *_cost_section(s), "",
         "## Automatic budget (TokenFLEX, `--num_tokens=auto`)", "", *_budget_section(s), "",
         "![automatic budget](results_budget.png)", ""]
  return "\n".join(out)


def plot_accuracy(s: Mapping[str, Any], path: str) -> None:
  counts = s["eval_counts"]
  fig, ax = new_axes((7.5, 4.8))
  for name, info in s["models"].items():
    mean = [100 * info["accuracy"][str(c)]["mean"] for c in counts]
    std = [100 * info["accuracy"][str(c)]["std"] for c in counts]
    style = "--" if name.startswith(experiment.FIXED_PREFIX) else "-"
    width = 2.5 if name == experiment.FLEX else 1.2
    ax.errorbar(counts, mean, yerr=std, fmt=style, marker="o", capsize=3, linewidth=width,
                label=name)
  ax.set_xticks(counts)
  ax.set_title("Fixed-token models against TokenFLEX (mean ± std over seeds)")
  save_figure(fig, ax, path, "visual tokens at evaluation", "average accuracy (%)")


def plot_budget(s: Mapping[str, Any], path: str) -> None:
  fig, ax = new_axes((6.5, 4.5))
  flex = s["models"][experiment.FLEX]
  counts = s["eval_counts"]
  ax.plot(counts, [100 * flex["accuracy"][str(c)]["mean"] for c in counts], "ks-",
          label="TokenFLEX, fixed budget")
  for name, ladder in _ladders(s).items():
    ax.plot([p["mean_visual_tokens"] for p in ladder["curve"]],
            [100 * p["accuracy"] for p in ladder["curve"]], "o-",
            label=f"automatic, {name}")
  ax.plot([s["oracle"]["mean_visual_tokens"]], [100 * s["oracle"]["accuracy"]], "r*",
          markersize=14, label="oracle")
  top = max(flex["train_counts"])
  ax.axvline(0.6 * top, color="gray", linestyle=":", label=f"60% of {top}")
  save_figure(fig, ax, path, BUDGET_XLABEL, "average accuracy (%)")


def write(s: Mapping[str, Any], out_dir: str) -> None:
  """docs/results.md, results.json, results_accuracy.png and results_budget.png."""
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(s, f, indent=2)
  with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown(s))
  plot_accuracy(s, os.path.join(out_dir, "results_accuracy.png"))
  if s["auto_budget"]:
    plot_budget(s, os.path.join(out_dir, "results_budget.png"))
