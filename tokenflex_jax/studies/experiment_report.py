"""Renders a reproduction summary (`experiment.summarize`) as docs/results.md, its
results.json and plots (results_accuracy.png, results_budget.png)."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Mapping, Sequence
from typing import Any

from tokenflex_jax.evaluation.report import new_axes, save_figure, BUDGET_XLABEL
from tokenflex_jax.studies import experiment

MAIN = ("fixed_64", "fixed_144", "fixed_256", "tokenflex")
ROUTER = "supervised router (cross-fitted on the evaluation set)"


def _pct(x: float) -> str:
  return f"{100 * x:.1f}"


def _pm(stat: Mapping[str, float]) -> str:
  return f"{100 * stat['mean']:.1f} ± {100 * stat['std']:.1f}"


def _seeds(ids: Sequence[int]) -> str:
  return ", ".join(map(str, ids))


def _paired(d: Mapping[str, Any]) -> str:
  """"+4.3 [-1.7, +10.3], p = 0.09" (points; the interval and p need two seeds)."""
  if d["ci"] is None:
    return f"{d['delta']:+.1f} (one seed: no interval)"
  return f"{d['delta']:+.1f} [{d['ci'][0]:+.1f}, {d['ci'][1]:+.1f}], p = {d['p']:.2g}"


def _trained(info: Mapping[str, Any]) -> str:
  counts = "/".join(map(str, info["train_counts"]))
  if len(info["train_counts"]) == 1:
    return counts
  total = sum(info["train_probs"])
  return f"{counts} at {':'.join(f'{10 * p / total:.0f}' for p in info['train_probs'])}"


def _accuracy_table(s: Mapping[str, Any]) -> list[str]:
  counts = [str(c) for c in s["eval_counts"]]
  collapsed = experiment.collapsed_seeds(s)
  lines = ["| model | trained at | projector | seeds | " + " | ".join(counts) + " |",
           "|---|---|---|---|" + "---|" * len(counts)]
  for name, info in s["models"].items():
    proj = info.get("projector", {})
    proj_s = (f"{proj.get('mlp', 'swiglu')}, {proj.get('pooling', 'adaptive_avg')}"
              + ("" if proj.get("position_embedding", False) else ", no pos. emb."))
    cells = [(f"**{_pm(info['accuracy'][c])}**" if int(c) in info["train_counts"]
              else _pm(info["accuracy"][c])) for c in counts]
    mark = " †" if name in collapsed else ""
    lines.append(f"| {name}{mark} | {_trained(info)} | {proj_s} | {info['seeds']} | "
                 + " | ".join(cells) + " |")
  return lines


def _collapsed_section(s: Mapping[str, Any]) -> list[str]:
  """† rows: each collapsed (model, seed), its families, and the model without it."""
  runs = s.get("collapsed", [])
  if not runs:
    return ["No collapsed run (a seed at a family's chance while the model's other seeds "
            "are well above it)."]
  lines = [f"† Collapsed runs: a seed within {100 * experiment.COLLAPSE_BAND:.0f} points of a "
           "family's chance at every count, the model's other seeds at least "
           f"{100 * experiment.COLLAPSE_GAP:.0f} above; kept in every mean and SD above.", "",
           "| model | seed | at chance on: that seed / the others (mean over counts, %) "
           "| the model with / without the seed |", "|---|---|---|---|"]
  for (name, seed), fams in _by_run(runs).items():
    info = s["models"][name]
    top = max(info["train_counts"])
    values = experiment.seed_values(info, top)
    rest = [v for k, v in values.items() if k != seed]
    without = experiment.mean_sd(rest)
    lines.append(f"| {name} | {seed} | " + ", ".join(
        f"{c['family']} {_pct(c['accuracy'])} / {_pct(c['others'])}" for c in fams)
        + f" | at {top}: {_pm(info['accuracy'][str(top)])} / {_pm(without)} |")
  return lines


def _by_run(runs: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], list[Mapping[str, Any]]]:
  out: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
  for c in runs:
    out.setdefault((c["model"], c["seed"]), []).append(c)
  return out


def _delta_table(deltas: Sequence[Mapping[str, Any]], key: str, header: str) -> list[str]:
  """TokenFLEX against fixed models, one row per (fixed model, count): the per-seed
  differences, their mean with its 95% interval and p, and the verdict ``key``."""
  lines = ["| fixed model | count | TokenFLEX − fixed per seed (points) | mean [95% CI], "
           f"paired t-test | {header} |", "|---|---|---|---|---|"]
  for d in deltas:
    lines.append(f"| {d['fixed']} | {d['count']} | "
                 + ", ".join(f"{x:+.1f}" for x in d["diffs"])
                 + f" | {_paired(d)} | {'yes' if d[key] else 'no'} |")
  return lines


def _comparison_section(s: Mapping[str, Any]) -> list[str]:
  own, off = experiment.own_count_deltas(s), experiment.off_count_deltas(s)
  if not own:
    return ["(needs `tokenflex` and at least one fixed model)"]
  return ["At each fixed model's own count (seed k against seed k; 95% Student-t "
          "interval, two-sided paired t-test):", "",
          *_delta_table(own, "holds", f"at least as accurate (CI above −{experiment.MARGIN:g})"),
          "", "Off the fixed models' own counts:", "",
          *_delta_table(off, "clearly_better", "clearly better (CI above 0)")]


def _family_section(s: Mapping[str, Any]) -> list[str]:
  counts = [str(c) for c in s["eval_counts"]]
  names = [n for n in MAIN if n in s["models"]]
  others = [n for n in s["models"] if n not in MAIN]
  lines = ["Mean over seeds, %; the family's granularity and chance on its first row"
           + (f"; {', '.join(others)} per family: results.json" if others else "") + ".", "",
           "| family | model | " + " | ".join(counts) + " |", "|---|---|" + "---|" * len(counts)]
  for fam, info in s["families"].items():
    for i, name in enumerate(names):
      stats = s["models"][name]["families"]
      head = f"{fam} ({info['granularity']}, {_pct(info['chance'])})" if i == 0 else ""
      lines.append(f"| {head} | {name} | "
                   + " | ".join(_pct(stats[c][fam]["mean"]) for c in counts) + " |")
  graded = s.get("graded_solvable", {})
  if graded:
    lines += ["", "Share of the budget-graded families' questions whose answer survives the "
              "pooling (geometry alone, `studies/pooling_geometry.py`, adaptive_avg):", "",
              "| family | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
    for fam, shares in graded.items():
      lines.append(f"| {fam} | " + " | ".join(_pct(shares[c]) for c in counts) + " |")
  return lines


def _cost_section(s: Mapping[str, Any]) -> list[str]:
  models = s["models"]
  base = models.get("fixed_256")
  lines = ["Stages 1 and 2, medians over seeds. Step time: per count, the median step time "
           "times that count's steps (compiles excluded); wall time: the stages' processes "
           "as measured.", "",
           "| model | visual tokens per example | step time (s) | wall time (s) | "
           "step time / fixed_256's |", "|---|---|---|---|---|"]
  for name, info in models.items():
    t = info["train"]
    ratio = (f"{t['step_seconds'] / base['train']['step_seconds']:.2f}" if base else "-")
    lines.append(f"| {name} | {t['mean_visual_tokens']:.1f} | {t['step_seconds']:.0f} | "
                 f"{t['wall_seconds']:.0f} | {ratio} |")
  return lines


def _ladders(s: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
  """{"signal, order": ladder} for the log-probability and the router, every order."""
  out = {}
  for key, signal in (("auto_budget_ladders", "log-prob"),
                      ("auto_budget_router_ladders", ROUTER)):
    for name, ladder in s.get(key, {}).items():
      out[f"{signal}, {name.replace('-', ' → ')}"] = ladder
  return out


def _budget_rows(s: Mapping[str, Any]) -> list[tuple[str, dict[str, Any], dict | None]]:
  """(signal and order, ladder, `experiment.budget_reach` of it) per ladder."""
  return [(name, ladder, experiment.budget_reach(s, ladder))
          for name, ladder in _ladders(s).items()]


def _budget_section(s: Mapping[str, Any]) -> list[str]:
  rows = _budget_rows(s)
  if not rows or experiment.FLEX not in s["models"]:
    return ["(needs an evaluated `tokenflex`)"]
  flex = s["models"][experiment.FLEX]
  top = max(flex["train_counts"])
  lines = ["The model answers at the smallest count of an escalation order and again at the "
           "next while the signal is under the threshold; every attempt counts. Signals: "
           "`log-prob`, the answer's mean token log-probability (what `predict "
           "--num_tokens=auto` uses), and the " + ROUTER + " (`evaluation/auto_budget.py`). "
           "A curve is the mean over seeds threshold by threshold (every point: results.json "
           "and the plot); a point counts when it is within 1 point of TokenFLEX at "
           f"{top} seed by seed. The oracle answers each question at the smallest count of "
           "that order that answers it best.", "",
           f"| signal, order | cheapest point within 1 point of TokenFLEX at {top} "
           f"({_pct(flex['accuracy'][str(top)]['mean'])}%): accuracy, tokens, point − "
           "TokenFLEX | that order's oracle |", "|---|---|---|"]
  for name, ladder, reach in rows:
    o = ladder["oracle"]
    point = ("none" if reach is None else
             f"{_pct(reach['accuracy'])}%, {reach['mean_visual_tokens']:.1f} "
             f"({100 * reach['mean_visual_tokens'] / top:.0f}% of {top}), {_paired(reach)}")
    seeds = "" if ladder["seeds"] == flex["seeds"] else f" ({ladder['seeds']} seeds)"
    lines.append(f"| {name}{seeds} | {point} | {_pct(o['accuracy'])}% at "
                 f"{o['mean_visual_tokens']:.1f} tokens |")
  return lines


def _list(deltas: Sequence[Mapping[str, Any]]) -> str:
  """"fixed_64 at 64: -0.9 [...], p = ...; fixed_144 at 144: ..." of own-count deltas."""
  return "; ".join(f"{d['fixed']} at {d['count']}: {_paired(d)}" for d in deltas)


def _comparison_verdicts(s: Mapping[str, Any], exclude: Mapping[str, Any] | None = None
                         ) -> list[str]:
  """The own- and off-count verdict lines (without the seeds in ``exclude``)."""
  lines = []
  own = experiment.own_count_deltas(s, exclude=exclude)
  if own:
    shown = [d for d in own if d["holds"]]
    lines.append(
        "- **At each fixed model's own count**, TokenFLEX at least as accurate (paired 95% "
        f"interval above −{experiment.MARGIN:g} point): "
        + ("shown at every count" if len(shown) == len(own) else
           f"shown at {len(shown)} of {len(own)} counts")
        + " (TokenFLEX − fixed, " + _list(own) + ").")
  off = experiment.off_count_deltas(s, exclude=exclude)
  if off:
    won = sum(d["clearly_better"] for d in off)
    lines.append(
        f"- **Off the fixed models' own counts**, TokenFLEX clearly better (interval above 0) "
        f"in {won} of {len(off)} (model, count) pairs (table below); mean difference "
        f"{sum(d['delta'] for d in off) / len(off):+.1f} points.")
  return lines


def _collapsed_verdict(s: Mapping[str, Any]) -> list[str]:
  """Whether the comparison verdicts change without the collapsed runs."""
  collapsed = experiment.collapsed_seeds(s)
  involved = {n: k for n, k in collapsed.items()
              if n == experiment.FLEX or n.startswith(experiment.FIXED_PREFIX)}
  runs = ", ".join(f"{n} seed {k}" for n, seeds in collapsed.items() for k in sorted(seeds))
  if not collapsed:
    return []
  if not involved:
    return [f"- **Collapsed runs** ({runs}; †): none in TokenFLEX or the fixed models, so "
            "the verdicts above do not depend on them."]
  same = all([d[key] for d in f(s)] == [d[key] for d in f(s, exclude=involved)]
             for f, key in ((experiment.own_count_deltas, "holds"),
                            (experiment.off_count_deltas, "clearly_better")))
  line = (f"- **Collapsed runs** ({runs}; †): kept in the verdicts above; without them the "
          + ("verdicts are the same." if same else "verdicts change:"))
  return [line] + ([] if same else ["  " + v for v in _comparison_verdicts(s, involved)])


def _budget_verdicts(s: Mapping[str, Any]) -> list[str]:
  """One line: which escalation orders meet the target (within 1 point of TokenFLEX at
  its largest count, paired, at 60% of that count or less), and the cheapest."""
  if experiment.FLEX not in s["models"] or not _ladders(s):
    return []
  rows = [(name, reach) for name, _, reach in _budget_rows(s) if reach]
  top = max(s["models"][experiment.FLEX]["train_counts"])
  met = [name for name, reach in rows if reach["mean_visual_tokens"] <= 0.6 * top]
  line = (f"- **Automatic budget** (target: within 1 point of TokenFLEX at {top}, paired, "
          f"at ≤ 60% of {top} tokens): " + (f"met by {', '.join(met)}" if met else
                                            "met by no escalation order"))
  if rows:
    cheapest = min(r["mean_visual_tokens"] for _, r in rows)
    names = [name for name, r in rows if r["mean_visual_tokens"] == cheapest]
    line += (f"; the cheapest within 1 point: {' and '.join(names)} at {cheapest:.1f} "
             f"tokens ({100 * cheapest / top:.0f}%)")
  return [line + "."]


def verdict(s: Mapping[str, Any]) -> list[str]:
  """The issue's criteria, each stated as met or not from the per-seed numbers."""
  rising = experiment.rising_families(s)
  per_model = experiment.rising_by_model(s)
  return [*_comparison_verdicts(s), *_collapsed_verdict(s),
          "- **Mean accuracy rising with the count (64 < 144 < 196 < 256) for every model**: "
          + (", ".join(rising) if rising else "no family") + "; per model: "
          + "; ".join(f"{m} {', '.join(f) or 'none'}" for m, f in per_model.items()) + ".",
          *_budget_verdicts(s)]


def _revision(s: Mapping[str, Any]) -> str:
  r = s.get("revision", {})
  shas = [sha.strip()[:7] for sha in (r.get("runs") or "").split(",") if sha.strip()]
  runs = (f"The runs trained at {', '.join(f'`{sha}`' for sha in shas)}" if shas
          else "The runs' code revision is not recorded")
  note = f" ({r['runs_note']})" if r.get("runs_note") else ""
  report = (f"`{r['report'][:7]}`" + (" with uncommitted changes" if r.get("report_modified")
                                      else "") if r.get("report") else "an unrecorded revision")
  return f"{runs}{note}; this report was rendered at {report}."


def _share_interval(stat: Mapping[str, Any], boot: Sequence[float] | None) -> str:
  """"+2.8 [+1.0, +4.6] b[+2.1, +3.5]" (points): the paired mean, its Student-t interval
  over seeds and the bootstrap interval over seeds and questions."""
  if stat["mean"] is None:
    return "-"
  out = f"{100 * stat['mean']:+.1f}"
  if stat["ci95"]:
    out += f" [{100 * stat['ci95'][0]:+.1f}, {100 * stat['ci95'][1]:+.1f}]"
  if boot:
    out += f" b[{100 * boot[0]:+.1f}, {100 * boot[1]:+.1f}]"
  return out


def _paired_section(s: Mapping[str, Any]) -> list[str]:
  """TokenFLEX minus each model per count and family (`experiment.paired_table`)."""
  if not s.get("paired"):
    return ["No TokenFLEX runs: nothing to pair."]
  counts = [str(c) for c in s["eval_counts"]]
  lines = ["Points, TokenFLEX minus the model, seed by seed (collapsed seeds of either left "
           "out): the mean [95% Student-t interval over seeds] b[95% paired bootstrap over "
           "seeds and questions].", "",
           "| pair | family | " + " | ".join(counts) + " |",
           "|---|---|" + "---|" * len(counts)]
  for pair, table in s["paired"].items():
    boot = s.get("bootstrap", {}).get(pair, {})
    lines.append(f"| {pair} | average | " + " | ".join(
        _share_interval(table[c], boot.get(c)) for c in counts) + " |")
    for family, per_count in table["families"].items():
      fboot = boot.get("families", {}).get(family, {})
      lines.append(f"| {pair} | {family} | " + " | ".join(
          _share_interval(per_count[c], fboot.get(c)) for c in counts) + " |")
  return lines


def _split_budget_section(s: Mapping[str, Any]) -> list[str]:
  """The budget's rules fixed on the development seed, on the test seed
  (`experiment.budget_table`)."""
  budget = s.get("budget_split")
  if not budget:
    return ["No development evaluation: every budget figure above is on the questions it "
            "was chosen on."]
  lines = [f"Each rule fixed on the development seed ({s['eval_seeds']['development']}), "
           f"scored on the test seed ({s['eval_seeds']['test']}), seeds "
           f"{_seeds(budget['seeds'])}; every attempt's tokens and seconds counted; "
           f"thresholds: the cheapest within {100 * budget['tolerance']:.0f} point of the "
           "best. Against: the paired difference from the largest fixed count's accuracy.", "",
           "| rule | accuracy % | visual tokens | seconds a question | against "
           f"{budget['largest']} |", "|---|---|---|---|---|"]
  for rule, row in budget["rules"].items():
    lines.append(f"| {rule} | {_pm(row['accuracy'])} | "
                 f"{row['mean_visual_tokens']['mean']:.1f} | "
                 f"{1000 * row['mean_seconds']['mean']:.2f} ms | {_paired(row['vs_largest'])} |")
  return lines


def caveats(s: Mapping[str, Any]) -> list[str]:
  """What the report's figures cannot support, read from the summary ``s``."""
  seeds = min(info["seeds"] for info in s["models"].values())
  split = s.get("evaluation_split", experiment.EVALUATION_SPLIT)
  lines = [
      f"- {seeds} seeds: a paired 95% interval is the mean difference ± "
      f"{experiment.t_quantile(0.5 + experiment.CONFIDENCE / 2, seeds - 1):.2f} standard "
      "errors, so differences of a few points are shown neither way (not shown is not "
      "worse). The t-test assumes roughly normal per-seed differences." if seeds > 1 else
      "- 1 seed: no spread, interval or test; every verdict needs two seeds or more.",
      f"- {split[0].upper()}{split[1:]}.",
      f"- The {ROUTER} is fitted and scored on these questions (2 folds): not an estimate "
      "for new questions" + ("; the last section's router, fitted on the development "
                             "questions and scored on the test ones, is, and is the one "
                             "`predict --num_tokens=auto` uses." if s.get("budget_split") else
                             "; `predict --num_tokens=auto` escalates on the log-probability "
                             "unless a router was saved (eval --config.eval.save_router).")]
  if s.get("collapsed"):
    lines.append("- Collapsed runs (†) are kept in every mean, SD and test.")
  if s.get("per_seed_source"):
    lines.append(f"- Per-seed values: {s['per_seed_source']}.")
  return lines


def markdown(s: Mapping[str, Any], docs: str = ".") -> str:
  """results.md; ``docs``: the path from where it is written to docs/ (for its links)."""
  link = lambda target: posixpath.normpath(posixpath.join(docs, target))
  hours = s["wall_time_s"] / 3600
  ids = sorted({k for info in s["models"].values() for k in info["seed_ids"]})
  out = ["# Results: the paper's experiment in miniature", "",
         f"[README]({link('../README.md')}) · [measurements]({link('measurements.md')}) "
         "(how these were diagnosed "
         "and what was tried)", "",
         f"Written by `python -m tokenflex_jax.report`, called by `{s['command'].strip()}` "
         f"after each seed; the stages took {s['wall_time_s']:.0f} s ({hours:.1f} h) of wall "
         f"time in all, on the machine of docs/measurements.md. {s['examples_per_family']} "
         f"questions per family, {len(s['families'])} families; accuracy is the family "
         f"average in %, mean ± sample SD (ddof=1) over seeds {_seeds(ids)}; bold: a count "
         "the model trained on. Seed k of every model shares the stage-0 ViT, the init seed, "
         "the token-count draws and the data order, and every run answers the same "
         "questions: models are compared seed by seed. " + _revision(s), "",
         "## Verdict", "", *verdict(s), "",
         "## What these figures do not show", "", *caveats(s), "",
         "## Average accuracy at each visual-token count", "", *_accuracy_table(s), "",
         *_collapsed_section(s), "",
         "![accuracy](results_accuracy.png)", "",
         "## TokenFLEX against the fixed models", "", *_comparison_section(s), "",
         "## Per family", "", *_family_section(s), "",
         "## Training cost: dynamic against fixed-256", "", *_cost_section(s), "",
         "## Automatic budget (TokenFLEX, `--num_tokens=auto`)", "", *_budget_section(s), "",
         "![automatic budget](results_budget.png)", "",
         "## Paired differences per count and family", "", *_paired_section(s), "",
         "## The budget chosen on development questions", "", *_split_budget_section(s), ""]
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
  ax.set_title("Fixed-token models against TokenFLEX (mean ± sample SD over seeds)")
  save_figure(fig, ax, path, "visual tokens at evaluation", "average accuracy (%)")


def plot_budget(s: Mapping[str, Any], path: str) -> None:
  """TokenFLEX's fixed budgets, every ladder's mean curve, and each escalation order's own
  oracle (a star of the colour of that order's first curve; both signals share it)."""
  fig, ax = new_axes((6.5, 4.5))
  flex = s["models"][experiment.FLEX]
  counts = s["eval_counts"]
  ax.plot(counts, [100 * flex["accuracy"][str(c)]["mean"] for c in counts], "ks-",
          label="TokenFLEX, fixed budget")
  oracles: dict[str, tuple[Mapping[str, float], str]] = {}
  for name, ladder in _ladders(s).items():
    label = name.replace(ROUTER, "supervised router (cross-fitted on eval)")
    (line,) = ax.plot([p["mean_visual_tokens"] for p in ladder["curve"]],
                      [100 * p["accuracy"] for p in ladder["curve"]], "o-", markersize=3,
                      label=f"automatic, {label}")
    order = " → ".join(map(str, ladder["counts"]))
    oracles.setdefault(order, (ladder["oracle"], line.get_color()))
  for order, (oracle, color) in oracles.items():
    ax.plot([oracle["mean_visual_tokens"]], [100 * oracle["accuracy"]], "*", color=color,
            markersize=12, label=f"oracle, {order}")
  top = max(flex["train_counts"])
  ax.axvline(0.6 * top, color="gray", linestyle=":", label=f"60% of {top}")
  save_figure(fig, ax, path, BUDGET_XLABEL, "average accuracy (%)")


def write(s: Mapping[str, Any], out_dir: str, docs_dir: str | None = None) -> None:
  """results.md, results.json, results_accuracy.png and results_budget.png into
  ``out_dir`` (docs/ itself, or elsewhere with ``docs_dir`` the docs/ its links point
  to)."""
  os.makedirs(out_dir, exist_ok=True)
  docs = "." if docs_dir is None else os.path.relpath(docs_dir, out_dir).replace(os.sep, "/")
  with open(os.path.join(out_dir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(s, f, indent=2)
  with open(os.path.join(out_dir, "results.md"), "w", encoding="utf-8") as f:
    f.write(markdown(s, docs))
  plot_accuracy(s, os.path.join(out_dir, "results_accuracy.png"))
  if s["auto_budget"]:
    plot_budget(s, os.path.join(out_dir, "results_budget.png"))
