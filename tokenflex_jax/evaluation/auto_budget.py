"""A visual-token budget chosen per question: answer small, escalate while unsure.

The model answers at the smallest count; while the answer's confidence (its mean token
log-probability, from `generate.make_generate`) is under a threshold it answers again at
the next count, up to the largest. Every attempt counts towards the question's visual
tokens. Since the ViT's patch grid does not depend on the count, it runs once per image
(`VLM.patches`); each attempt is a projector pooling plus an LLM pass.

Given the answers and confidences of every count (the fixed-budget sweep of the eval
binary), the escalation of any threshold follows without running the model again:
`escalate` replays it exactly. The oracle answers at the smallest count that scores
best on the question: the bound no confidence signal can beat.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

Score = Callable[[Sequence[str]], dict[str, float]]


def escalate(confidence: Mapping[int, np.ndarray], counts: Sequence[int], threshold: float
             ) -> tuple[np.ndarray, np.ndarray]:
  """(count answered at [N] int, visual tokens spent [N] int) for ``threshold``.

  ``confidence[n]``: [N] the confidence of each question's answer at count ``n``;
  ``counts``: the escalation order, ascending.
  """
  counts = sorted(counts)
  n = len(confidence[counts[0]])
  chosen = np.full(n, counts[-1])
  spent = np.zeros(n, np.int64)
  open_ = np.ones(n, bool)
  for c in counts:
    spent += np.where(open_, c, 0)
    stop = open_ & ((confidence[c] >= threshold) | (c == counts[-1]))
    chosen = np.where(stop, c, chosen)
    open_ &= ~stop
  return chosen, spent


def ladders(counts: Sequence[int]) -> list[tuple[int, ...]]:
  """Every escalation order over ``counts`` from the smallest to the largest: the full one
  first, then those that skip some of the counts between, e.g. (64, 144, 256), (64, 256)."""
  counts = sorted(counts)
  if len(counts) < 2:
    return [tuple(counts)]
  inner = counts[1:-1]
  out = []
  for keep in range(len(inner), -1, -1):
    for subset in itertools.combinations(inner, keep):
      out.append((counts[0], *subset, counts[-1]))
  return out


def ladder_counts(configured: Sequence[int], trained: Sequence[int],
                  evaluated: Sequence[int] | None = None) -> tuple[int, ...]:
  """The escalation order: ``config.eval.auto_counts`` (``configured``) or, when empty,
  the ``trained`` counts (those among ``evaluated``, if given). Raises ValueError naming
  config.eval.auto_counts unless it is at least two of the trained counts."""
  available = sorted(set(trained) & set(evaluated)) if evaluated is not None else sorted(trained)
  counts = tuple(sorted(configured)) if configured else tuple(available)
  if configured and (len(counts) < 2 or not set(counts) <= set(available)):
    raise ValueError(f"config.eval.auto_counts={tuple(configured)} must be two or more of the "
                     f"trained (and evaluated) counts {tuple(available)}")
  return counts


def pick(texts: Mapping[int, Sequence[str]], chosen: np.ndarray) -> list[str]:
  """The answer of each question at its chosen count."""
  return [texts[int(c)][i] for i, c in enumerate(chosen)]


def _point(score: Score, answers: Sequence[str], spent: np.ndarray) -> dict[str, Any]:
  families = score(answers)
  return {"accuracy": float(np.mean(list(families.values()))),
          "mean_visual_tokens": float(np.mean(spent)), "families": families}


def default_thresholds(confidence: Mapping[int, np.ndarray], steps: int = 10) -> list[float]:
  """Thresholds spanning the smallest count's confidences: its deciles, and +inf
  (always escalate to the largest count)."""
  smallest = confidence[min(confidence)]
  qs = np.quantile(smallest, np.linspace(0.0, 1.0, steps + 1))
  return sorted({float(q) for q in qs}) + [float("inf")]


def sweep(texts: Mapping[int, Sequence[str]], confidence: Mapping[int, np.ndarray],
          counts: Sequence[int], score: Score, thresholds: Sequence[float]
          ) -> list[dict[str, Any]]:
  """[{"threshold", "accuracy", "mean_visual_tokens", "families"}] per threshold; the
  accuracy is the mean over families, as the fixed budgets' "average"."""
  out = []
  for t in thresholds:
    chosen, spent = escalate(confidence, counts, t)
    out.append({"threshold": t if np.isfinite(t) else None,  # None: always escalate
                **_point(score, pick(texts, chosen), spent)})
  return out


def oracle(texts: Mapping[int, Sequence[str]], prompt_scores: Callable[[Sequence[str]], np.ndarray],
           counts: Sequence[int], score: Score) -> dict[str, Any]:
  """Each question at the smallest count whose answer scores best on it (one attempt);
  a question no count answers is charged the smallest count."""
  counts = sorted(counts)
  per_count = np.stack([prompt_scores(texts[c]) for c in counts])  # [C, N]
  best = np.argmax(per_count >= per_count.max(axis=0, keepdims=True), axis=0)
  chosen = np.array(counts)[best]
  return _point(score, pick(texts, chosen), chosen)
