"""The reproduction's report (``launch/reproduce.sh``): every variant's evaluations
gathered over seeds into results.json (the summary), compared seed by seed, for the
tables and plots of `experiment_report`.

A reproduction workdir holds ``stage0/`` (the shared ViT), ``NAME/seedK/stage{1,2}/``
per variant and seed (the newest evaluation of the scenes suite in ``stage2/eval/``),
``wall_times.tsv`` (name, seed, stage, seconds per finished stage) and
``command.txt``. Accuracies are averages over the suite's families, in [0, 1].

Seeds are paired: seed K of every variant starts from the workdir's one stage-0 ViT
with ``config.seed = K`` and ``config.data.seed = K + 1`` (configs/reproduce.py: the
same init seed, token-count draws and data order), and every run answers the same
evaluation questions (``config.eval.seed``). So variants are compared seed by seed: the
mean of the per-seed differences, their sample SD, a 95% Student-t interval and a
two-sided paired t-test (`paired`).

The summary (results.json)::

  command: str; wall_time_s: float; eval_counts: [int]; examples_per_family: int
  families: {family: {"granularity": str, "chance": float}}
  spread: str                        what "std" is (`SPREAD`)
  evaluation_split: str              where the design choices were made (`EVALUATION_SPLIT`)
  revision: {"report": sha | None, "report_modified": bool, "runs": sha | None, ...}
  models: {name: {
      train_counts: [int]; train_probs: [float]; projector: {pooling, mlp, position_embedding}
      seeds: int; seed_ids: [int]    ascending; every per-seed list follows this order
      per_seed: {"accuracy": {count: [float]}, "families": {count: {family: [float]}}}
      accuracy: {count: {"mean", "std"}}; families: {count: {family: {"mean", "std"}}}
          (std: the sample standard deviation over seeds, ddof=1; 0.0 with one seed)
      train: {"step_seconds", "wall_seconds": medians over seeds, "mean_visual_tokens"}}}
  collapsed: [{"model", "seed", "family", "chance", "accuracy", "others"}]   (`collapsed_runs`)
  auto_budget_ladders, auto_budget_router_ladders: {order "64-144-256": ladder}
      ladder: {"counts": [int], "seeds": int, "seed_ids": [int],
               "per_seed": [{"curve": [point], "oracle": {"accuracy", "mean_visual_tokens"}}],
               "curve": [point], "oracle": {...}}   (curve, oracle: means over seeds; the
               k-th point of every seed is the same quantile of its smallest count's signal)
      point: {"threshold": float | None (always escalate), "accuracy", "mean_visual_tokens"}
  auto_budget, oracle, auto_budget_counts: the primary ladder's mean curve, oracle, counts
  graded_solvable: {family: {count: share}}

  code_revision: str | None          the revision the runs trained at
  eval_seeds: {"development": int | None, "test": int | None}
  paired: {"tokenflex-OTHER": {count: {"mean", "ci95": [lo, hi], "sd", "p", "seeds"},
           "families": {family: {count: ...}}}}   accuracies in [0, 1] (`paired_table`)
  bootstrap: {"tokenflex-OTHER": {count: [lo, hi], "families": {...}}}  (`bootstrap_table`)
  budget_split: {"tolerance", "seeds", "largest", "rules": {rule: {"accuracy",
      "mean_visual_tokens", "mean_seconds", "vs_largest"}}, "per_seed"}  (`budget_table`)
  models.NAME.collapsed: int          its seeds collapsed on some family

Everything but ``train``, ``graded_solvable``, ``bootstrap`` and ``budget_split``
(which read each question's record) follows from the per-seed values (`restat`), so a
results.json can be rendered again by newer code.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from tokenflex_jax.data import tokenizer
from tokenflex_jax.evaluation import outputs
from tokenflex_jax.studies import budget_split, pooling_geometry
from tokenflex_jax.training import metrics

FIXED_PREFIX = "fixed_"
FLEX = "tokenflex"
# Order of the variants in tables (others follow alphabetically).
ORDER = ("fixed_64", "fixed_144", "fixed_256", "fixed_64_flops", "fixed_144_flops",
         "tokenflex", "ratio_111", "ratio_532", "gelu_mlp", "resize_pool", "tokenflex_nope",
         "tokenflex_span0", "tokenflex_grid")
SPREAD = "std: the sample standard deviation over seeds (ddof=1); 0.0 with one seed"
EVALUATION_SPLIT = ("no development split: the demo recipe's design choices (the projector's "
                    "position embedding, the visual tokens' rotary layout) were made on these "
                    "same evaluation questions")
DEV_TEST_SPLIT = ("a development evaluation seed (eval_seeds.development) chose the automatic "
                  "budget's thresholds and fitted its router; every reported figure is on the "
                  "test seed (eval_seeds.test)")
# "At least as accurate": the paired 95% interval's lower bound above -MARGIN points.
MARGIN = 1.0
CONFIDENCE = 0.95
# A collapsed run: within COLLAPSE_BAND of the family's chance at every count while the
# model's other seeds average at least COLLAPSE_GAP above it.
COLLAPSE_BAND = 0.02
COLLAPSE_GAP = 0.10
POINT_KEYS = ("threshold", "accuracy", "mean_visual_tokens")
# The development evaluation's folder (config.eval.tag "dev"): its questions choose the
# automatic budget's thresholds and fit its router, never the reported figures.
DEV_SUITE = "scenes_dev"
BUDGET_TOLERANCE = 0.01
BOOTSTRAP_DRAWS = 2000
ORACLE_KEYS = ("accuracy", "mean_visual_tokens")


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
  # questions.npz of the test evaluation and of the development one (None: not run)
  test_questions: str | None = None
  dev_questions: str | None = None
  dev_eval_seed: int | None = None


def _read_json(path: str) -> Any:
  with open(path, encoding="utf-8") as f:
    return json.load(f)


TOWER_RTOL = 1e-4  # another processor's float32 rounding: about 1e-7 (docs/configs.md)


def tower_losses(metrics_path: str) -> str:
  """A stage-0 run's losses as an archive keeps them (``stage0_losses.txt``): a line
  ``"train/loss": x`` per step, a step redone after a restart by its last record."""
  return "".join(f'"train/loss": {record["train/loss"]!r}\n'
                 for record in metrics.last_records(metrics_path, "train/loss").values())


def tower_difference(kept: str, now: str) -> str | None:
  """Why the stage-0 losses ``now`` are not those an archive ``kept`` (both as
  `tower_losses` writes them), or None: as many, each within `TOWER_RTOL` relative."""
  losses = lambda text: [float(x) for x in re.findall(r'"train/loss": ([^,}\s]+)', text)]
  a, b = losses(now), losses(kept)
  worst = max((abs(x - y) / max(abs(y), 1e-12) for x, y in zip(a, b)), default=0.0)
  if len(a) != len(b) or worst > TOWER_RTOL:
    return (f"{len(a)} losses against {len(b)} kept, the largest relative difference "
            f"{worst:.2g} (at most {TOWER_RTOL:g})")
  return None


def _metrics(path: str) -> tuple[float, list[float]]:
  """(training seconds, every step's train/num_tokens) of a metrics.jsonl. The seconds
  are, per visual-token count, the median step time times that count's steps: robust to
  a machine paused or shared for a while (a restart's first step, a test run beside it).
  A step redone after a restart counts once, by its last record."""
  times: dict[float, list[float]] = {}
  tokens = []
  for row in metrics.last_records(path, "train/step_time_s").values():
    times.setdefault(row["train/num_tokens"], []).append(row["train/step_time_s"])
    tokens.append(row["train/num_tokens"])
  seconds = sum(float(np.median(t)) * len(t) for t in times.values())
  return seconds, tokens


def _dev_evaluation(eval_root: str) -> tuple[str | None, int | None]:
  """(questions.npz, eval seed) of a run's development evaluation (`DEV_SUITE`), or
  (None, None)."""
  results = outputs.listed_results_file(eval_root, DEV_SUITE)
  questions = results and os.path.join(os.path.dirname(results), outputs.QUESTIONS_FILE)
  if not questions or not os.path.exists(questions):
    return None, None
  return questions, _read_json(results).get("eval_seed")


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


SPLITS = ("test", "dev")
DEV_DESIGN = ("development questions (eval_seeds.development): a report for choosing the "
              "recipe, not for claims")


def collect(workdir: str, split: str = "test") -> list[Run]:
  """Every evaluated run of a reproduction workdir, in `ORDER` then by seed: on the test
  questions (``split`` "test"; the development ones ride along) or on the development
  ones alone ("dev", for choosing the recipe)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  walls = wall_times(workdir)
  runs = []
  for name in sorted(os.listdir(workdir)):
    for seed_dir in sorted(os.listdir(os.path.join(workdir, name))
                           if os.path.isdir(os.path.join(workdir, name)) else ()):
      match = re.fullmatch(r"seed(\d+)", seed_dir)
      base = os.path.join(workdir, name, seed_dir)
      done = "eval.done" if split == "test" else "eval_dev.done"
      if not match or not os.path.exists(os.path.join(base, done)):
        continue
      eval_root = os.path.join(base, "stage2", "eval")
      results = (outputs.latest_results_file(eval_root, "scenes") if split == "test"
                 else outputs.listed_results_file(eval_root, DEV_SUITE))
      if results is None:
        continue
      seconds, tokens = 0.0, []
      for stage in ("stage1", "stage2"):
        s, t = _metrics(os.path.join(base, stage, "metrics.jsonl"))
        seconds, tokens = seconds + s, tokens + t
      wall = sum(walls.get((name, match.group(1), stage), 0.0) for stage in ("stage1", "stage2"))
      questions = os.path.join(os.path.dirname(results), outputs.QUESTIONS_FILE)
      dev = _dev_evaluation(eval_root) if split == "test" else (None, None)
      runs.append(Run(name, int(match.group(1)),
                      _read_json(os.path.join(base, "stage2", "config.json")),
                      _read_json(results), seconds, float(np.mean(tokens)), wall,
                      questions if os.path.exists(questions) else None, *dev))
  rank = {n: i for i, n in enumerate(ORDER)}
  return sorted(runs, key=lambda r: (rank.get(r.name, len(ORDER)), r.name, r.seed))


# --- Student's t distribution (no scipy in the environment). ---

def _beta_fraction(a: float, b: float, x: float) -> float:
  """The continued fraction of the incomplete beta function (modified Lentz)."""
  tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
  d = 1.0 / (d if abs(d) > tiny else tiny)
  h = d
  for m in range(1, 300):
    for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                      -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
      d = 1.0 + numerator * d
      d = 1.0 / (d if abs(d) > tiny else tiny)
      c = 1.0 + numerator / c
      c = c if abs(c) > tiny else tiny
      h *= d * c
    if abs(d * c - 1.0) < 1e-15:
      break
  return h


def betainc(a: float, b: float, x: float) -> float:
  """The regularized incomplete beta function I_x(a, b), for a, b > 0 and x in [0, 1]."""
  if x <= 0.0 or x >= 1.0:
    return 0.0 if x <= 0.0 else 1.0
  log_front = (math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
               + a * math.log(x) + b * math.log1p(-x))
  if x < (a + 1.0) / (a + b + 2.0):
    return math.exp(log_front) * _beta_fraction(a, b, x) / a
  return 1.0 - math.exp(log_front) * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
  """P(T <= t) for Student's t with ``df`` degrees of freedom."""
  if math.isinf(t):
    return 1.0 if t > 0 else 0.0
  tail = 0.5 * betainc(df / 2.0, 0.5, df / (df + t * t))  # P(T > |t|)
  return 1.0 - tail if t > 0 else tail


def t_quantile(q: float, df: float) -> float:
  """The t with t_cdf(t, df) = q, for q in (0, 1) (bisection to 1e-12)."""
  if q < 0.5:
    return -t_quantile(1.0 - q, df)
  lo, hi = 0.0, 1.0
  while t_cdf(hi, df) < q:
    lo, hi = hi, 2.0 * hi
  while hi - lo > 1e-12 * max(1.0, hi):
    mid = 0.5 * (lo + hi)
    lo, hi = (mid, hi) if t_cdf(mid, df) < q else (lo, mid)
  return 0.5 * (lo + hi)


def paired(a: Mapping[int, float], b: Mapping[int, float]) -> dict[str, Any]:
  """``a - b`` seed by seed, in points, over the seeds both have ({seed: accuracy in [0, 1]}).

  Returns {"seeds": [int], "diffs": [float], "delta": the mean difference, "sd": their
  sample SD, "ci": [low, high], the 95% Student-t interval of the mean, "p": the
  two-sided paired t-test's p-value}; sd, ci and p are None with fewer than two seeds.
  """
  seeds = sorted(set(a) & set(b))
  diffs = [100 * (a[k] - b[k]) for k in seeds]
  out = {"seeds": seeds, "diffs": diffs, "delta": float(np.mean(diffs)) if diffs else math.nan,
         "sd": None, "ci": None, "p": None}
  n = len(diffs)
  if n < 2:
    return out
  sd = float(np.std(diffs, ddof=1))
  se = sd / math.sqrt(n)
  half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * se
  if se > 1e-9:
    p = 2.0 * (1.0 - t_cdf(abs(out["delta"]) / se, n - 1))
  else:  # every seed the same difference
    p = 1.0 if abs(out["delta"]) <= 1e-9 else 0.0
  return {**out, "sd": sd, "ci": [out["delta"] - half, out["delta"] + half], "p": p}


def lower(stat: Mapping[str, Any]) -> float | None:
  """The lower bound of a `paired` interval (None with fewer than two seeds)."""
  return stat["ci"][0] if stat["ci"] else None


def _verdicts(stat: Mapping[str, Any]) -> dict[str, bool]:
  """{"holds": at least as accurate (lower bound > -MARGIN), "clearly_better": lower > 0}."""
  low = lower(stat)
  return {"holds": low is not None and low > -MARGIN,
          "clearly_better": low is not None and low > 0}


# --- The summary. ---

def mean_sd(values: Sequence[float]) -> dict[str, float]:
  """{"mean", "std": the sample SD (ddof=1), 0.0 with one value}."""
  return {"mean": float(np.mean(values)),
          "std": float(np.std(values, ddof=1)) if len(values) > 1 else 0.0}


def _mean_threshold(values: Sequence[float | None]) -> float | None:
  """None (always escalate) if any seed's is None, else the mean."""
  return None if any(v is None for v in values) else float(np.mean(values))


def _ladder_means(ladder: Mapping[str, Any]) -> dict[str, Any]:
  """``ladder`` (its counts, seed_ids and per_seed) with its mean curve and oracle:
  averaged point by point over the seeds, up to the shortest seed's curve."""
  per_seed = ladder["per_seed"]
  length = min(len(r["curve"]) for r in per_seed)
  curve = [{"threshold": _mean_threshold([r["curve"][i]["threshold"] for r in per_seed]),
            **{key: float(np.mean([r["curve"][i][key] for r in per_seed]))
               for key in ("accuracy", "mean_visual_tokens")}} for i in range(length)]
  oracle = {key: float(np.mean([r["oracle"][key] for r in per_seed])) for key in ORACLE_KEYS}
  return {"counts": list(ladder["counts"]), "seeds": len(per_seed),
          "seed_ids": list(ladder["seed_ids"]), "per_seed": per_seed, "curve": curve,
          "oracle": oracle}


def _seed_ladders(runs: Sequence[Run], key: str) -> dict[str, dict[str, Any]]:
  """{order: ladder without its means} of results[key] over the runs that have it (an
  eval with only the primary ``auto_budget``: that one, under its order)."""
  out: dict[str, dict[str, Any]] = {}
  for r in runs:
    ladders = r.eval.get(key)
    if ladders is None and key == "auto_budget_ladders" and "auto_budget" in r.eval:
      primary = r.eval["auto_budget"]
      ladders = {"-".join(map(str, primary["counts"])): primary}
    for order, result in (ladders or {}).items():
      ladder = out.setdefault(order, {"counts": list(result["counts"]), "seed_ids": [],
                                      "per_seed": []})
      ladder["seed_ids"].append(r.seed)
      ladder["per_seed"].append({
          "curve": [{k: p[k] for k in POINT_KEYS} for p in result["curve"]],
          "oracle": {k: result["oracle"][k] for k in ORACLE_KEYS}})
  return out


def _model_seeds(group: Sequence[Run], counts: Sequence[str], families: Iterable[str]
                 ) -> dict[str, Any]:
  """{"seed_ids", "per_seed"} of one variant's runs (ascending seeds)."""
  group = sorted(group, key=lambda r: r.seed)
  return {"seed_ids": [r.seed for r in group], "per_seed": {
      "accuracy": {c: [r.eval["results"][c]["average"] for r in group] for c in counts},
      "families": {c: {f: [r.eval["results"][c]["families"][f] for r in group]
                       for f in families} for c in counts}}}


def summarize(runs: Sequence[Run], command: str = "", wall_time_s: float = 0.0,
              revision: Mapping[str, Any] | None = None, split: str = "test"
              ) -> dict[str, Any]:
  """The results.json of ``runs`` (the module docstring's schema). ``revision``:
  {"report": the code's git revision now, "runs": the one the runs trained at, ...};
  ``split``: which questions ``runs`` were collected on (`collect`)."""
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
        **_model_seeds(group, counts, families),
        # Medians over seeds: a seed whose stages shared the CPU with other work does
        # not move them.
        "train": {"step_seconds": float(np.median([r.train_seconds for r in group])),
                  "wall_seconds": float(np.median([r.wall_seconds for r in group])),
                  "mean_visual_tokens": float(np.mean([r.train_visual_tokens for r in group]))},
    }
  flex = by_name.get(FLEX, [])
  primary = next((r.eval["auto_budget"]["counts"] for r in flex if "auto_budget" in r.eval), [])
  dev_seeds = {r.dev_eval_seed for r in runs if r.dev_eval_seed is not None}
  test_seeds = {r.eval.get("eval_seed") for r in runs} - {None}
  if split == "dev":  # the runs' own questions are the development ones
    dev_seeds, test_seeds = test_seeds, set()
  revision = {"report": None, "report_modified": False, "runs": None, **(revision or {})}
  summary = restat({
      "code_revision": revision["runs"],
      "eval_seeds": {"development": min(dev_seeds) if len(dev_seeds) == 1 else None,
                     "test": min(test_seeds) if len(test_seeds) == 1 else None},
      "command": command, "wall_time_s": wall_time_s, "eval_counts": [int(c) for c in counts],
      "examples_per_family": runs[0].eval["examples_per_family"],
      "families": runs[0].eval["families"], "spread": SPREAD,
      "evaluation_split": (DEV_DESIGN if split == "dev" else DEV_TEST_SPLIT if dev_seeds
                           else EVALUATION_SPLIT),
      "revision": revision,
      "models": models, "auto_budget_counts": list(primary),
      "auto_budget_ladders": _seed_ladders(flex, "auto_budget_ladders"),
      "auto_budget_router_ladders": _seed_ladders(flex, "auto_budget_router_ladders"),
      "graded_solvable": {f: {c: pooling_geometry.solvable_share(f, int(c)) for c in counts}
                          for f in pooling_geometry.GRADED_SIDES if f in families}})
  return {**summary, "bootstrap": bootstrap_table(runs, summary),
          "budget_split": budget_table(runs)}


def restat(summary: Mapping[str, Any]) -> dict[str, Any]:
  """``summary`` with every figure that follows from its per-seed values computed again
  (means, sample SDs, ladder means, the primary curve, the collapsed runs): how a
  results.json is rendered by newer code. Raises ValueError on a summary without
  per-seed values (written before they were kept)."""
  if any("per_seed" not in info for info in summary["models"].values()):
    raise ValueError("this results.json keeps no per-seed values (written before they were "
                     "kept): rebuild it from the reproduction's workdir")
  models = {}
  for name, info in summary["models"].items():
    seeds = info["per_seed"]
    models[name] = {**info, "seeds": len(info["seed_ids"]),
                    "accuracy": {c: mean_sd(v) for c, v in seeds["accuracy"].items()},
                    "families": {c: {f: mean_sd(v) for f, v in fams.items()}
                                 for c, fams in seeds["families"].items()}}
  ladders = {key: {order: _ladder_means(ladder) for order, ladder in
                   sorted(summary.get(key, {}).items(), key=lambda kv: (-kv[0].count("-"),
                                                                        kv[0]))}
             for key in ("auto_budget_ladders", "auto_budget_router_ladders")}
  primary = ladders["auto_budget_ladders"].get(
      "-".join(map(str, summary.get("auto_budget_counts", []))), {})
  out = {**summary, "models": models, **ladders, "auto_budget": primary.get("curve", []),
         "oracle": primary.get("oracle", {})}
  out["collapsed"] = collapsed_runs(out)
  collapsed = collapsed_seeds(out)
  for name, info in out["models"].items():
    info["collapsed"] = len(collapsed.get(name, ()))
  return {**out, "paired": paired_table(out)}


def seed_values(info: Mapping[str, Any], count: int | str, family: str | None = None
                ) -> dict[int, float]:
  """{seed: accuracy} of a model's summary at ``count`` (the average, or ``family``'s)."""
  values = (info["per_seed"]["accuracy"][str(count)] if family is None
            else info["per_seed"]["families"][str(count)][family])
  return dict(zip(info["seed_ids"], values))


def collapsed_runs(summary: Mapping[str, Any]) -> list[dict[str, Any]]:
  """[{"model", "seed", "family", "chance", "accuracy": that seed's mean over the counts,
  "others": the model's other seeds' mean}] for every seed within `COLLAPSE_BAND` of a
  family's chance at every evaluated count while each of the model's seeds not at chance
  averages at least `COLLAPSE_GAP` above it (at least one such seed)."""
  out = []
  for name, info in summary["models"].items():
    for family, fam in summary["families"].items():
      chance = fam["chance"]
      per_count = np.array([info["per_seed"]["families"][str(c)][family]
                            for c in summary["eval_counts"]])  # [counts, seeds]
      at_chance = np.all(np.abs(per_count - chance) <= COLLAPSE_BAND, axis=0)
      others = per_count[:, ~at_chance].mean(axis=0)
      if not at_chance.any() or not len(others) or others.min() < chance + COLLAPSE_GAP:
        continue
      for i in np.flatnonzero(at_chance):
        out.append({"model": name, "seed": info["seed_ids"][i], "family": family,
                    "chance": chance, "accuracy": float(per_count[:, i].mean()),
                    "others": float(others.mean())})
  return out


def collapsed_seeds(summary: Mapping[str, Any]) -> dict[str, set[int]]:
  """{model: its seeds collapsed on some family}."""
  out: dict[str, set[int]] = {}
  for c in summary.get("collapsed", []):
    out.setdefault(c["model"], set()).add(c["seed"])
  return out


def _without(values: Mapping[int, float], seeds: Iterable[int]) -> dict[int, float]:
  return {k: v for k, v in values.items() if k not in set(seeds)}


def compare(summary: Mapping[str, Any], name: str, other: str, count: int,
            exclude: Mapping[str, Iterable[int]] | None = None) -> dict[str, Any]:
  """`paired` ``name`` - ``other`` at ``count`` with its verdicts (`_verdicts`); the
  seeds in ``exclude`` ({model: seeds}) left out of both."""
  left = set((exclude or {}).get(name, ())) | set((exclude or {}).get(other, ()))
  stat = paired(_without(seed_values(summary["models"][name], count), left),
                _without(seed_values(summary["models"][other], count), left))
  return {**stat, **_verdicts(stat)}


def _as_share(stat: Mapping[str, Any]) -> dict[str, Any]:
  """A `paired` result in accuracy units ([0, 1]) for results.json's "paired"."""
  scale = lambda x: None if x is None else x / 100
  return {"mean": scale(stat["delta"]), "ci95": [scale(x) for x in stat["ci"]]
          if stat["ci"] else None, "sd": scale(stat["sd"]), "p": stat["p"],
          "seeds": len(stat["seeds"])}


def paired_table(summary: Mapping[str, Any]) -> dict[str, Any]:
  """{"tokenflex-OTHER": {count: {"mean", "ci95", "sd", "p", "seeds"}, "families":
  {family: {count: ...}}}}: TokenFLEX minus every other model seed by seed, the
  collapsed seeds of either left out (`collapsed_seeds`)."""
  if FLEX not in summary["models"]:
    return {}
  exclude = collapsed_seeds(summary)
  out = {}
  for other in summary["models"]:
    if other == FLEX:
      continue
    left = exclude.get(FLEX, set()) | exclude.get(other, set())
    stat = lambda c, f=None: _as_share(paired(
        _without(seed_values(summary["models"][FLEX], c, f), left),
        _without(seed_values(summary["models"][other], c, f), left)))
    counts = [str(c) for c in summary["eval_counts"]]
    out[f"{FLEX}-{other}"] = {**{c: stat(c) for c in counts}, "families": {
        f: {c: stat(c, f) for c in counts} for f in summary["families"]}}
  return out


def paired_bootstrap(a: np.ndarray, b: np.ndarray, draws: int = BOOTSTRAP_DRAWS,
                     seed: int = 0) -> list[float]:
  """The `CONFIDENCE` percentile interval of mean(a - b) with seeds and questions both
  resampled with replacement, the same draw for ``a`` and ``b`` (paired). a, b: [S, N]
  each question's credit per seed."""
  rng = np.random.default_rng(seed)
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  s, n = d.shape
  stats = [d[np.ix_(rng.integers(s, size=s), rng.integers(n, size=n))].mean()
           for _ in range(draws)]
  lo, hi = np.quantile(stats, [(1 - CONFIDENCE) / 2, (1 + CONFIDENCE) / 2])
  return [float(lo), float(hi)]


def bootstrap_table(runs: Sequence[Run], summary: Mapping[str, Any]) -> dict[str, Any]:
  """{"tokenflex-OTHER": {count: [lo, hi], "families": {family: {count: [lo, hi]}}}}:
  `paired_bootstrap` over the seeds both have (collapsed ones left out) and the test
  questions (each run's questions.npz); models without them are left out."""
  by_model: dict[str, dict[int, Run]] = {}
  for r in runs:
    if r.test_questions:
      by_model.setdefault(r.name, {})[r.seed] = r
  if FLEX not in by_model:
    return {}
  exclude = collapsed_seeds(summary)
  out = {}
  for other, other_runs in by_model.items():
    if other == FLEX:
      continue
    seeds = sorted((set(by_model[FLEX]) & set(other_runs)) - exclude.get(FLEX, set())
                   - exclude.get(other, set()))
    if not seeds:
      continue
    a = [outputs.read_questions(by_model[FLEX][k].test_questions) for k in seeds]
    b = [outputs.read_questions(other_runs[k].test_questions) for k in seeds]
    families = a[0]["families"]
    table: dict[str, Any] = {"families": {}}
    for c in summary["eval_counts"]:
      credit_a = np.stack([q["credit"][c] for q in a])
      credit_b = np.stack([q["credit"][c] for q in b])
      table[str(c)] = paired_bootstrap(credit_a, credit_b)
      for f in summary["families"]:
        mask = families == f
        table["families"].setdefault(f, {})[str(c)] = paired_bootstrap(
            credit_a[:, mask], credit_b[:, mask])
    out[f"{FLEX}-{other}"] = table
  return out


def budget_table(runs: Sequence[Run]) -> dict[str, Any]:
  """TokenFLEX's automatic budget with every rule fixed on its development evaluation and
  scored on its test one (`budget_split.rows`), per seed and as {rule: {"accuracy",
  "mean_visual_tokens", "mean_seconds": mean_sd over seeds, "vs_largest": `paired`
  accuracy minus the largest fixed count's (points)}}; {} without development runs."""
  flex = [r for r in runs if r.name == FLEX and r.dev_questions and r.test_questions]
  if not flex:
    return {}
  per_seed = {}
  for r in sorted(flex, key=lambda r: r.seed):
    dev, test = outputs.read_questions(r.dev_questions), outputs.read_questions(r.test_questions)
    # The trained counts among those evaluated, as the evaluation's own budget.
    ladder = sorted(set(int(c) for c in r.config["token_counts"]) & set(test["counts"]))
    if len(ladder) < 2:
      continue
    per_seed[r.seed] = budget_split.rows(dev, test, ladder, BUDGET_TOLERANCE,
                                         int(r.config["model"]["llm"]["vocab_size"]),
                                         tokenizer.PAD_ID)
  if not per_seed:
    return {}
  largest = f"fixed_{ladder[-1]}"
  rules = {}
  for rule in next(iter(per_seed.values())):
    values = lambda key: [rows[rule][key] for rows in per_seed.values()]
    rules[rule] = {key: mean_sd(values(key))
                   for key in ("accuracy", "mean_visual_tokens", "mean_seconds")}
    rules[rule]["vs_largest"] = paired(
        {k: rows[rule]["accuracy"] for k, rows in per_seed.items()},
        {k: rows[largest]["accuracy"] for k, rows in per_seed.items()})
  return {"tolerance": BUDGET_TOLERANCE, "seeds": sorted(per_seed), "largest": largest,
          "rules": rules, "per_seed": {str(k): v for k, v in per_seed.items()}}


def _fixed_models(summary: Mapping[str, Any], name: str):
  """(fixed model name, its summary) for every fixed model, none when ``name`` is missing."""
  if name not in summary["models"]:
    return
  for fixed, info in summary["models"].items():
    if fixed.startswith(FIXED_PREFIX):
      yield fixed, info


def own_count_deltas(summary: Mapping[str, Any], name: str = FLEX,
                     exclude: Mapping[str, Iterable[int]] | None = None
                     ) -> list[dict[str, Any]]:
  """``name`` minus each fixed model at that model's own count: [{"fixed", "count",
  **`compare`}] (points)."""
  out = []
  for fixed, info in _fixed_models(summary, name):
    c = info["train_counts"][0]
    if str(c) in summary["models"][name]["accuracy"]:
      out.append({"fixed": fixed, "count": c,
                  **compare(summary, name, fixed, c, exclude)})
  return out


def off_count_deltas(summary: Mapping[str, Any], name: str = FLEX,
                     exclude: Mapping[str, Iterable[int]] | None = None
                     ) -> list[dict[str, Any]]:
  """``name`` minus each fixed model at every count that model did not train on."""
  return [{"fixed": fixed, "count": c, **compare(summary, name, fixed, c, exclude)}
          for fixed, info in _fixed_models(summary, name)
          for c in summary["eval_counts"] if c not in info["train_counts"]]


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


def budget_reach(summary: Mapping[str, Any], ladder: Mapping[str, Any] | None = None
                 ) -> dict[str, Any] | None:
  """The cheapest point of ``ladder``'s mean curve (default: the primary ladder) that is at
  least as accurate as TokenFLEX at its largest count, seed by seed (`paired`: the
  interval's lower bound above -MARGIN), as {**point, "index", **paired}; None when no
  point is."""
  if ladder is None:
    ladder = summary["auto_budget_ladders"].get(
        "-".join(map(str, summary["auto_budget_counts"])))
  if not ladder or FLEX not in summary["models"]:
    return None
  flex = summary["models"][FLEX]
  top = seed_values(flex, max(flex["train_counts"]))
  for i in sorted(range(len(ladder["curve"])),
                  key=lambda i: ladder["curve"][i]["mean_visual_tokens"]):
    point = dict(zip(ladder["seed_ids"],
                     (r["curve"][i]["accuracy"] for r in ladder["per_seed"])))
    stat = paired(point, top)
    if _verdicts(stat)["holds"]:
      return {**ladder["curve"][i], "index": i, **stat}
  return None
