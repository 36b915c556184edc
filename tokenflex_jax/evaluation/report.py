"""Writes evaluation results: results.json, results.md (tables), accuracy.png, budget.png."""

from __future__ import annotations

import io
import json
import os
from typing import Any

from etils import epath

BUDGET_XLABEL = "mean visual tokens per question (every attempt counted)"


def markdown_table(results: dict[str, Any]) -> str:
  """Families as rows, visual-token counts as columns, accuracy in percent."""
  counts = list(results["results"])
  suite = results.get("suite", "scenes")
  size = (f"{results['examples_per_family']} examples per family" if suite == "scenes" else
          f"{suite}, {results['examples_per_family']} questions")
  lines = [f"Accuracy (%) at step {results['step']}, {size}.", "",
           "| family | granularity | chance | " + " | ".join(f"{c} tokens" for c in counts) + " |",
           "|---|---|---|" + "---|" * len(counts)]
  for name, info in results["families"].items():
    cells = [f"{100 * results['results'][c]['families'][name]:.1f}" for c in counts]
    lines.append(f"| {name} | {info['granularity']} | {100 * info['chance']:.1f} | "
                 + " | ".join(cells) + " |")
  lines.append("| **average** | | | " + " | ".join(
      f"**{100 * results['results'][c]['average']:.1f}**" for c in counts) + " |")
  lines.append("| examples/s | | | " + " | ".join(
      f"{results['results'][c]['examples_per_s']:.0f}" for c in counts) + " |")
  return "\n".join(lines) + "\n"


def auto_budget_table(results: dict[str, Any]) -> str:
  """The automatic budget's accuracy against mean visual tokens per threshold, beside
  the fixed budgets and the oracle ("" when the results have none)."""
  auto = results.get("auto_budget")
  if not auto:
    return ""
  lines = [f"Automatic budget: escalate over {auto['counts']} while the answer's "
           f"{auto['signal']} is under the threshold; visual tokens count every attempt.", "",
           "| budget | threshold | accuracy (%) | mean visual tokens |", "|---|---|---|---|"]
  for c in auto["counts"]:
    r = results["results"][str(c)]
    lines.append(f"| fixed {c} | | {100 * r['average']:.1f} | {c} |")
  for p in auto["curve"]:
    t = "always escalate" if p["threshold"] is None else f"{p['threshold']:.3g}"
    lines.append(f"| auto | {t} | {100 * p['accuracy']:.1f} | {p['mean_visual_tokens']:.1f} |")
  o = auto["oracle"]
  lines.append(f"| oracle | | {100 * o['accuracy']:.1f} | {o['mean_visual_tokens']:.1f} |")
  return "\n".join(lines) + "\n"


def save_figure(fig, ax, path: str, xlabel: str, ylabel: str) -> None:
  """The project's plot finish: axis labels, a light grid, the legend at the lower right,
  saved at 110 dpi."""
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, dpi=110, format="png")
  epath.Path(path).write_bytes(buffer.getvalue())  # local or gs://


def new_axes(figsize: tuple[float, float]) -> tuple[Any, Any]:
  """A matplotlib figure with one set of axes, drawn off-screen (matplotlib's object
  API: no pyplot, no process-wide backend)."""
  from matplotlib.figure import Figure  # pylint: disable=import-outside-toplevel
  # (imported here, not at the top: only plotting needs it, and it is slow to import)
  fig = Figure(figsize=figsize)
  return fig, fig.subplots()


def plot_budget(results: dict[str, Any], path: str) -> None:
  """Accuracy against mean visual tokens: fixed budgets, the automatic curve, the oracle."""
  auto = results["auto_budget"]
  fig, ax = new_axes((6, 4.5))
  fixed = [int(c) for c in results["results"]]
  ax.plot(fixed, [100 * results["results"][str(c)]["average"] for c in fixed], "ks-",
          label="fixed budget")
  ax.plot([p["mean_visual_tokens"] for p in auto["curve"]],
          [100 * p["accuracy"] for p in auto["curve"]], "o-", label="automatic (thresholds)")
  ax.plot([auto["oracle"]["mean_visual_tokens"]], [100 * auto["oracle"]["accuracy"]], "r*",
          markersize=14, label="oracle")
  save_figure(fig, ax, path, BUDGET_XLABEL, "average accuracy (%)")


def plot_accuracy(results: dict[str, Any], path: str) -> None:
  counts = [int(c) for c in results["results"]]
  fig, ax = new_axes((7, 4.5))
  styles = {"coarse": "-", "medium": "--", "fine": ":"}
  for name, info in results["families"].items():
    acc = [100 * results["results"][str(c)]["families"][name] for c in counts]
    ax.plot(counts, acc, styles.get(info["granularity"], "-"), marker="o",
            label=f"{name} ({info['granularity']})")
  ax.plot(counts, [100 * results["results"][str(c)]["average"] for c in counts], "k-",
          linewidth=2.5, marker="s", label="average")
  ax.set_xticks(counts)
  ax.set_ylim(0, 101)
  ax.set_title(f"TokenFLEX demo, one model evaluated at each budget (step {results['step']})")
  save_figure(fig, ax, path, "visual tokens", "accuracy (%)")


def write_results(results: dict[str, Any], out_dir: str) -> None:
  out = epath.Path(out_dir)  # local or gs://
  out.mkdir(parents=True, exist_ok=True)
  (out / "results.json").write_text(json.dumps(results, indent=2))
  (out / "results.md").write_text(markdown_table(results) + (
      "\n" + auto_budget_table(results) if "auto_budget" in results else ""))
  plot_accuracy(results, os.path.join(out_dir, "accuracy.png"))
  if "auto_budget" in results:
    plot_budget(results, os.path.join(out_dir, "budget.png"))
