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

A second signal, the router, is learned: logistic regressions from what the question
asks (its prompt tokens) and the answer's confidence to whether the answer is right at
this count and at the next, cross-fitted on the evaluation set; it escalates when the
next count is expected to do better (`router_confidence`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from tokenflex_jax import errors

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
    raise errors.ConfigError(f"config.eval.auto_counts={tuple(configured)} must be two or "
                             f"more of the trained (and evaluated) counts {tuple(available)}")
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


# --- A learned signal: the router. ---

def router_features(prompts: np.ndarray, vocab_size: int, confidence: np.ndarray) -> np.ndarray:
  """[N, vocab_size + 2] features of each question at one count: which prompt tokens it
  has (0/1 per vocabulary id: what is asked), the answer's confidence, and a bias.

  prompts: int [N, P]; confidence: [N]."""
  n = len(prompts)
  bag = np.zeros((n, vocab_size), np.float64)
  np.put_along_axis(bag, np.clip(prompts, 0, vocab_size - 1), 1.0, axis=1)
  return np.concatenate([bag, confidence[:, None].astype(np.float64), np.ones((n, 1))], axis=1)


def fit_logistic(x: np.ndarray, y: np.ndarray, l2: float = 1e-2, steps: int = 25) -> np.ndarray:
  """Weights [F] of an L2-regularised logistic regression (Newton's method) of targets
  y in [0, 1] (soft credit allowed) on features x [N, F]."""
  w = np.zeros(x.shape[1])
  reg = l2 * max(len(x), 1) * np.eye(x.shape[1])  # an empty fold: the prior alone
  for _ in range(steps):
    p = 1.0 / (1.0 + np.exp(-(x @ w)))
    grad = x.T @ (p - y) + reg @ w
    hess = (x * (p * (1 - p))[:, None]).T @ x + reg
    w -= np.linalg.solve(hess, grad)
  return w


def cross_fitted(x: np.ndarray, y: np.ndarray, folds: int = 2, seed: int = 0) -> np.ndarray:
  """Out-of-fold predicted P(correct) [N]: each fold scored by a model fitted on the
  others, so no question grades itself."""
  fold = np.random.default_rng(seed).permutation(len(x)) % folds
  out = np.zeros(len(x))
  for k in range(folds):
    w = fit_logistic(x[fold != k], y[fold != k])
    out[fold == k] = 1.0 / (1.0 + np.exp(-(x[fold == k] @ w)))
  return out


def router_confidence(prompts: np.ndarray, vocab_size: int,
                      confidence: Mapping[int, np.ndarray], credit: Mapping[int, np.ndarray],
                      ladder: Sequence[int]) -> dict[int, np.ndarray]:
  """{count: the router's signal [N]} for escalating along ``ladder``: at each count, the
  predicted chance that the answer there is right minus the predicted chance that the
  answer at the next count is (both cross-fitted from the features at this count), so
  that a question escalates when more tokens are expected to help, not merely when it is
  hard (a question no count answers should not escalate). The largest count's signal is 0.

  ``credit[c]``: [N] each question's credit at count ``c`` (``prompt_scores``). A
  deployment would fit the router once on held-out questions; here it is cross-fitted on
  the evaluation set itself, which needs no extra data for any suite.
  """
  ladder = sorted(ladder)
  out = {ladder[-1]: np.zeros(len(prompts))}
  for c, nxt in zip(ladder, ladder[1:]):
    x = router_features(prompts, vocab_size, confidence[c])
    out[c] = cross_fitted(x, credit[c]) - cross_fitted(x, credit[nxt])
  return out
