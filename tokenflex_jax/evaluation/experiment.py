"""The reproduction's report (``launch/reproduce.sh``): every variant's evaluations
gathered over seeds into the paper-style tables, ``results.json`` and plots.

A reproduction workdir holds ``stage0/`` (the shared ViT), ``NAME/seedK/stage{1,2}/``
per variant and seed (the newest evaluation of the scenes suite in ``stage2/eval/``),
``wall_times.tsv`` (name, seed, stage, seconds per finished stage) and
``command.txt``. Accuracies are averages over the suite's families, in [0, 1]; a
spread is the standard deviation over seeds (0 with one seed).
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tokenflex_jax.evaluation import pooling_geometry
from tokenflex_jax.evaluation import outputs

FIXED_PREFIX = "fixed_"
FLEX = "tokenflex"
# Order of the variants in tables (others follow alphabetically).
ORDER = ("fixed_64", "fixed_144", "fixed_256", "tokenflex", "ratio_111", "ratio_532",
         "gelu_mlp", "resize_pool", "tokenflex_nope")


@dataclasses.dataclass(frozen=True)
class Run:
  """One variant and seed, evaluated."""
  name: str
  seed: int
  config: dict[str, Any]       # stage 2's config.json
  eval: dict[str, Any]         # stage2/eval/scenes/step_<N>/results.json
  train_seconds: float         # stages 1 and 2: per count, median step time x its steps
  train_visual_tokens: float   # mean visual tokens per training example, stages 1 and 2
  wall_seconds: float          # wall time of stages 1 and 2 (start-up and compiles included)


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _metrics(path: str) -> tuple[float, list[float]]:
  """(training seconds, every step's train/num_tokens) of a metrics.jsonl. The seconds
  are, per visual-token count, the median step time times that count's steps: robust to
  a machine paused or shared for a while (a restart's first step, a test run beside it)."""
  times: dict[float, list[float]] = {}
  tokens = []
  with open(path, encoding="utf-8") as f:
    for line in f:
      row = json.loads(line)
      if "train/step_time_s" in row:
        times.setdefault(row["train/num_tokens"], []).append(row["train/step_time_s"])
        tokens.append(row["train/num_tokens"])
  seconds = sum(float(np.median(t)) * len(t) for t in times.values())
  return seconds, tokens


def wall_times(workdir: str) -> dict[tuple[str, str, str], float]:
  """{(name, seed, stage): seconds} from wall_times.tsv (a rerun stage: its last line)."""
  out: dict[tuple[str, str, str], float] = {}
  path = os.path.join(workdir, "wall_times.tsv")
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      for line in f:
        name, seed, stage, seconds = line.rstrip("\n").split("\t")
        out[(name, seed, stage)] = float(seconds)
  return out


def collect(workdir: str) -> list[Run]:
  """Every evaluated run of a reproduction workdir, in `ORDER` then by seed."""
  walls = wall_times(workdir)
  runs = []
  for name in sorted(os.listdir(workdir)):
    for seed_dir in sorted(os.listdir(os.path.join(workdir, name))
                           if os.path.isdir(os.path.join(workdir, name)) else ()):
      match = re.fullmatch(r"seed(\d+)", seed_dir)
      base = os.path.join(workdir, name, seed_dir)
      if not match or not os.path.exists(os.path.join(base, "eval.done")):
        continue
      results = outputs.latest_results_file(os.path.join(base, "stage2", "eval"), "scenes")
      seconds, tokens = 0.0, []
      for stage in ("stage1", "stage2"):
        s, t = _metrics(os.path.join(base, stage, "metrics.jsonl"))
        seconds, tokens = seconds + s, tokens + t
      wall = sum(walls.get((name, match.group(1), stage), 0.0) for stage in ("stage1", "stage2"))
      runs.append(Run(name, int(match.group(1)),
                      _read_json(os.path.join(base, "stage2", "config.json")),
                      _read_json(results), seconds, float(np.mean(tokens)), wall))
  rank = {n: i for i, n in enumerate(ORDER)}
  return sorted(runs, key=lambda r: (rank.get(r.name, len(ORDER)), r.name, r.seed))


def _mean_std(values: Sequence[float]) -> dict[str, float]:
  return {"mean": float(np.mean(values)), "std": float(np.std(values))}


def _mean_threshold(values: Sequence[float | None]) -> float | None:
  """None (always escalate) if any seed's is None, else the mean."""
  return None if any(v is None for v in values) else float(np.mean(values))


def _curve_mean(results: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
  """The automatic-budget curve and oracle of several seeds, averaged point by point (the
  k-th threshold of every seed is the same quantile of its smallest count's confidence)."""
  length = min(len(r["curve"]) for r in results)
  curve = [{"threshold": _mean_threshold([r["curve"][i]["threshold"] for r in results]),
            **{key: float(np.mean([r["curve"][i][key] for r in results]))
               for key in ("accuracy", "mean_visual_tokens")}} for i in range(length)]
  oracle = {key: float(np.mean([r["oracle"][key] for r in results]))
            for key in ("accuracy", "mean_visual_tokens")}
  return {"counts": list(results[0]["counts"]), "curve": curve, "oracle": oracle}


def _ladders_mean(evals: Sequence[Mapping[str, Any]], key: str) -> dict[str, dict[str, Any]]:
  """{ladder name: mean curve} of results[key] over the evals that have it, with the
  number of seeds behind each."""
  having = [e[key] for e in evals if key in e]
  if not having:
    return {}
  names = set.intersection(*(set(h) for h in having))
  return {n: {**_curve_mean([h[n] for h in having]), "seeds": len(having)}
          for n in sorted(names, key=lambda n: (-n.count("-"), n))}


def _auto_budget(runs: Sequence[Run]) -> tuple[dict[str, Any], dict[str, dict[str, Any]],
                                              dict[str, dict[str, Any]]]:
  """(the primary escalation's mean curve or {}, {ladder: mean curve} of the confidence,
  the same of the router)."""
  evals = [r.eval for r in runs if "auto_budget" in r.eval]
  if not evals:
    return {}, {}, {}
  return (_curve_mean([e["auto_budget"] for e in evals]),
          _ladders_mean(evals, "auto_budget_ladders"),
          _ladders_mean(evals, "auto_budget_router_ladders"))


def summarize(runs: Sequence[Run], command: str = "", wall_time_s: float = 0.0
              ) -> dict[str, Any]:
  """The results.json of ``runs`` (see the module docstring and docs/results.md)."""
  if not runs:
    raise ValueError("no evaluated runs: nothing to summarize (did stage 2's eval finish?)")
  by_name: dict[str, list[Run]] = {}
  for r in runs:
    by_name.setdefault(r.name, []).append(r)
  counts = list(runs[0].eval["results"])
  families = list(runs[0].eval["families"])
  models = {}
  for name, group in by_name.items():
    cfg = group[0].config
    models[name] = {
        "train_counts": list(cfg["token_counts"]), "train_probs": list(cfg["token_probs"]),
        "projector": {k: cfg["model"]["projector"][k] for k in ("pooling", "mlp",
                                                                "position_embedding")
                      if k in cfg["model"]["projector"]},
        "seeds": len(group),
        "accuracy": {c: _mean_std([r.eval["results"][c]["average"] for r in group])
                     for c in counts},
        "families": {c: {f: _mean_std([r.eval["results"][c]["families"][f] for r in group])
                         for f in families} for c in counts},
        # Medians over seeds: a seed whose stages shared the CPU with other work does
        # not move them.
        "train": {"step_seconds": float(np.median([r.train_seconds for r in group])),
                  "wall_seconds": float(np.median([r.wall_seconds for r in group])),
                  "mean_visual_tokens": float(np.mean([r.train_visual_tokens for r in group]))},
    }
  primary, ladders, routed = _auto_budget(by_name.get(FLEX, []))
  return {"command": command, "wall_time_s": wall_time_s, "eval_counts": [int(c) for c in counts],
          "examples_per_family": runs[0].eval["examples_per_family"],
          "families": runs[0].eval["families"], "models": models,
          "auto_budget": primary.get("curve", []), "oracle": primary.get("oracle", {}),
          "auto_budget_counts": primary.get("counts", []), "auto_budget_ladders": ladders,
          "auto_budget_router_ladders": routed,
          "graded_solvable": {f: {c: pooling_geometry.solvable_share(f, int(c))
                                  for c in counts}
                              for f in pooling_geometry.GRADED_SIDES if f in families}}


def _delta(a: Mapping[str, float], b: Mapping[str, float]) -> tuple[float, float]:
  """(a - b, their combined spread) in points."""
  return 100 * (a["mean"] - b["mean"]), 100 * float(np.hypot(a["std"], b["std"]))


def _fixed_models(summary: Mapping[str, Any], name: str):
  """(fixed model name, its summary) for every fixed model, none when ``name`` is missing."""
  if name not in summary["models"]:
    return
  for fixed, info in summary["models"].items():
    if fixed.startswith(FIXED_PREFIX):
      yield fixed, info


def own_count_deltas(summary: Mapping[str, Any], name: str = FLEX) -> list[dict[str, Any]]:
  """``name`` minus each fixed model at that model's own count, per count (points)."""
  mine, out = summary["models"].get(name, {}).get("accuracy", {}), []
  for fixed, info in _fixed_models(summary, name):
    c = str(info["train_counts"][0])
    if c in mine:
      delta, spread = _delta(mine[c], info["accuracy"][c])
      out.append({"fixed": fixed, "count": int(c), "delta": delta, "spread": spread,
                  "holds": delta >= -spread})
  return out


def off_count_deltas(summary: Mapping[str, Any], name: str = FLEX) -> list[dict[str, Any]]:
  """``name`` minus each fixed model at every count that model did not train on."""
  mine, out = summary["models"].get(name, {}).get("accuracy", {}), []
  for fixed, info in _fixed_models(summary, name):
    for c in summary["eval_counts"]:
      if c not in info["train_counts"]:
        delta, spread = _delta(mine[str(c)], info["accuracy"][str(c)])
        out.append({"fixed": fixed, "count": c, "delta": delta, "spread": spread,
                    "clearly_better": delta > max(spread, 1.0)})
  return out


def _rises(info: Mapping[str, Any], family: str, counts: Sequence[int]) -> bool:
  means = [info["families"][str(c)][family]["mean"] for c in counts]
  return all(a < b for a, b in zip(means, means[1:]))


def rising_by_model(summary: Mapping[str, Any], counts: Sequence[int] = (64, 144, 196, 256)
                    ) -> dict[str, list[str]]:
  """{model: the families whose mean accuracy rises strictly along ``counts``}."""
  return {name: [f for f in summary["families"] if _rises(info, f, counts)]
          for name, info in summary["models"].items()
          if all(str(c) in info["families"] for c in counts)}


def rising_families(summary: Mapping[str, Any], counts: Sequence[int] = (64, 144, 196, 256)
                    ) -> list[str]:
  """Families whose mean accuracy rises strictly along ``counts`` for every model."""
  per_model = rising_by_model(summary, counts)
  return [f for f in summary["families"] if all(f in fams for fams in per_model.values())]


def budget_reach(summary: Mapping[str, Any], curve: Sequence[Mapping[str, Any]] | None = None,
                 tolerance: float = 0.01) -> dict[str, Any] | None:
  """The cheapest point of ``curve`` (default: the primary automatic budget) within
  ``tolerance`` of TokenFLEX at its largest count, or None when no point gets there."""
  curve = summary["auto_budget"] if curve is None else curve
  if not curve or FLEX not in summary["models"]:
    return None
  top = str(max(summary["models"][FLEX]["train_counts"]))
  target = summary["models"][FLEX]["accuracy"][top]["mean"] - tolerance
  hits = [p for p in curve if p["accuracy"] >= target]
  return min(hits, key=lambda p: p["mean_visual_tokens"]) if hits else None
