"""The automatic budget chosen on a development evaluation, reported on a test one.

Every rule is fixed on the development seed's questions and applied unchanged to the
test seed's (both `outputs.read_questions` records of one model: prompts, families, and
per count each answer's confidence, credit and the sweep's seconds a question):

- router: `auto_budget.fit_router` on the development questions (its threshold the
  cheapest within ``tolerance`` of the best), escalating along ``ladder``;
- log-probability: the answer's mean token log-probability, its threshold the cheapest
  within ``tolerance`` on the development curve;
- family rule: a question whose family gained more than ``tolerance`` from the smallest
  to the largest count on the development questions is asked at the largest count
  directly (its question names its family), every other at the smallest;
- oracle: the smallest count whose answer scores best, on the test questions themselves
  (the bound, not a rule);
- fixed_<c>: every question at count c.

Each row: accuracy (the mean over families of the family's mean credit), mean visual
tokens and mean seconds a question, every attempt counted (an escalation pays for each
count it tried).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from tokenflex_jax.evaluation import auto_budget

Record = Mapping[str, Any]


def _score(families: np.ndarray):
  names = sorted(set(families.tolist()))

  def score(credits: Sequence[float]) -> dict[str, float]:
    credits = np.asarray(credits, np.float64)
    return {f: float(credits[families == f].mean()) for f in names}
  return score


def _row(record: Record, chosen: np.ndarray, attempts: Sequence[Sequence[int]],
         **extra: Any) -> dict[str, Any]:
  """The row of questions answered at ``chosen`` [N] after trying ``attempts[i]``."""
  credit = np.array([record["credit"][int(c)][i] for i, c in enumerate(chosen)])
  families = _score(record["families"])(credit)
  return {"accuracy": float(np.mean(list(families.values()))),
          "mean_visual_tokens": float(np.mean([sum(a) for a in attempts])),
          "mean_seconds": float(np.mean([sum(record["seconds"][c] for c in a)
                                         for a in attempts])),
          "families": families, **extra}


def _escalated(record: Record, signal: Mapping[int, np.ndarray], ladder: Sequence[int],
               threshold: float | None, **extra: Any) -> dict[str, Any]:
  chosen, _ = auto_budget.escalate(signal, ladder, np.inf if threshold is None else threshold)
  attempts = [[c for c in ladder if c <= k] for k in chosen]
  return _row(record, chosen, attempts, threshold=threshold, **extra)


def rows(dev: Record, test: Record, ladder: Sequence[int], tolerance: float, vocab_size: int,
         pad_id: int) -> dict[str, dict[str, Any]]:
  """{rule: row} on the test questions, every rule fixed on ``dev`` (module docstring)."""
  ladder = sorted(ladder)
  texts = lambda record: {c: list(record["credit"][c]) for c in ladder}
  dev_score = _score(dev["families"])
  out: dict[str, dict[str, Any]] = {}
  n = len(test["prompts"])
  for c in test["counts"]:
    out[f"fixed_{c}"] = _row(test, np.full(n, c), [[c]] * n)
  router = auto_budget.fit_router(dev["prompts"], vocab_size, pad_id, dev["confidence"],
                                  dev["credit"], texts(dev), dev_score, ladder, tolerance,
                                  {"split": "development"})
  signal = {c: router.signal(c, test["prompts"], test["confidence"][c]) for c in ladder}
  out["router"] = _escalated(test, signal, ladder, router.threshold)
  curve = auto_budget.sweep(texts(dev), dev["confidence"], ladder, dev_score,
                            auto_budget.default_thresholds({c: dev["confidence"][c]
                                                            for c in ladder}))
  threshold = auto_budget.cheapest_within(curve, tolerance)["threshold"]
  out["log-probability"] = _escalated(test, test["confidence"], ladder, threshold)
  small, large = ladder[0], ladder[-1]
  gains = {f: dev_score(dev["credit"][large])[f] - dev_score(dev["credit"][small])[f]
           for f in dev_score(dev["credit"][small])}
  escalated = sorted(f for f, g in gains.items() if g > tolerance)
  asked_large = np.isin(test["families"], escalated)
  chosen = np.where(asked_large, large, small)
  out["family rule"] = _row(test, chosen, [[int(c)] for c in chosen],
                            families_asked_at_largest=escalated)
  best = np.stack([test["credit"][c] for c in ladder])              # [C, N]
  first_best = np.argmax(best >= best.max(axis=0, keepdims=True), axis=0)
  chosen = np.array(ladder)[first_best]
  out["oracle"] = _row(test, chosen, [[int(c)] for c in chosen])
  return out
