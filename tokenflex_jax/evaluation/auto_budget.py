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
next count is expected to do better (`router_confidence`). `fit_router` fits it once on
a development evaluation (every question, its threshold chosen there by a rule fixed in
advance) as a `Router` that `predict --num_tokens=auto` applies to new questions.
"""

from __future__ import annotations

import dataclasses
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

def router_features(prompts: np.ndarray, vocab_size: int, confidence: np.ndarray,
                    pad_id: int = 0) -> np.ndarray:
  """[N, vocab_size + 2] features of each question at one count: which prompt tokens it
  has (0/1 per vocabulary id: what is asked; the padding left out, so a prompt reads the
  same padded or not), the answer's confidence, and a bias.

  prompts: int [N, P]; confidence: [N]."""
  n = len(prompts)
  bag = np.zeros((n, vocab_size), np.float64)
  np.put_along_axis(bag, np.clip(prompts, 0, vocab_size - 1), 1.0, axis=1)
  bag[:, pad_id] = 0.0
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
                      ladder: Sequence[int], pad_id: int = 0) -> dict[int, np.ndarray]:
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
    x = router_features(prompts, vocab_size, confidence[c], pad_id)
    out[c] = cross_fitted(x, credit[c]) - cross_fitted(x, credit[nxt])
  return out


def _sigmoid(z: np.ndarray) -> np.ndarray:
  return 1.0 / (1.0 + np.exp(-z))


@dataclasses.dataclass(frozen=True)
class Router:
  """A router fitted once (`fit_router`), for new questions.

  ``weights[c]``: the logistic weights [F] of "the answer at count c is right" and of
  "the answer at the next count is right", from the features at c (`router_features`);
  a question escalates from c while ``signal`` is under ``threshold`` (None: always, to
  the largest count). ``fitted_on``: where it was fitted (suite, eval seed, step,
  questions), as the evaluation recorded it.
  """
  counts: tuple[int, ...]
  vocab_size: int
  pad_id: int
  weights: dict[int, tuple[np.ndarray, np.ndarray]]
  threshold: float | None
  fitted_on: dict[str, Any]

  def signal(self, count: int, prompts: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """[N]: P(right at ``count``) - P(right at the next count); 0 at the largest."""
    if count == self.counts[-1]:
      return np.zeros(len(prompts))
    here, nxt = self.weights[count]
    x = router_features(prompts, self.vocab_size, confidence, self.pad_id)
    return _sigmoid(x @ here) - _sigmoid(x @ nxt)

  def stops(self, count: int, prompts: np.ndarray, confidence: np.ndarray) -> np.ndarray:
    """[N] bool: whether the answer at ``count`` is kept."""
    if count == self.counts[-1]:
      return np.ones(len(prompts), bool)
    if self.threshold is None:
      return np.zeros(len(prompts), bool)
    return self.signal(count, prompts, confidence) >= self.threshold

  def to_json(self) -> dict[str, Any]:
    return {"counts": list(self.counts), "vocab_size": self.vocab_size, "pad_id": self.pad_id,
            "weights": {str(c): [w.tolist() for w in ws] for c, ws in self.weights.items()},
            "threshold": self.threshold, "fitted_on": self.fitted_on}

  @classmethod
  def from_json(cls, value: Mapping[str, Any]) -> Router:
    return cls(tuple(value["counts"]), int(value["vocab_size"]), int(value["pad_id"]),
               {int(c): tuple(np.asarray(w, np.float64) for w in ws)
                for c, ws in value["weights"].items()},
               value["threshold"], dict(value["fitted_on"]))


ROUTER_THRESHOLDS = tuple(np.round(np.linspace(-1.0, 1.0, 81), 3)) + (float("inf"),)


def cheapest_within(curve: Sequence[Mapping[str, Any]], tolerance: float) -> Mapping[str, Any]:
  """The point of ``curve`` (ordered by threshold) with the fewest mean visual tokens
  whose accuracy is within ``tolerance`` of the curve's best, the middle one of a tie
  (the widest margin): the rule, fixed in advance, that picks a threshold."""
  scored = [p for p in curve if np.isfinite(p["accuracy"])]
  if not scored:  # nothing scored (e.g. no question of a family): escalate all the way
    return curve[-1]
  best = max(p["accuracy"] for p in scored)
  ok = [p for p in scored if p["accuracy"] >= best - tolerance]
  fewest = min(p["mean_visual_tokens"] for p in ok)
  tied = [p for p in ok if p["mean_visual_tokens"] == fewest]
  return tied[len(tied) // 2]


def fit_router(prompts: np.ndarray, vocab_size: int, pad_id: int,
               confidence: Mapping[int, np.ndarray], credit: Mapping[int, np.ndarray],
               texts: Mapping[int, Sequence[str]], score: Score, ladder: Sequence[int],
               tolerance: float, fitted_on: Mapping[str, Any]) -> Router:
  """The router of a development evaluation: its threshold is `cheapest_within` the
  ``tolerance`` on the cross-fitted signal's curve over `ROUTER_THRESHOLDS` (the signal
  is a difference of probabilities, in [-1, 1]; no question grades itself), its weights
  are then fitted on every question."""
  ladder = sorted(ladder)
  signals = router_confidence(prompts, vocab_size, confidence, credit, ladder, pad_id)
  curve = sweep(texts, signals, ladder, score, ROUTER_THRESHOLDS)
  chosen = cheapest_within(curve, tolerance)
  weights = {}
  for c, nxt in zip(ladder, ladder[1:]):
    x = router_features(prompts, vocab_size, confidence[c], pad_id)
    weights[c] = (fit_logistic(x, credit[c]), fit_logistic(x, credit[nxt]))
  return Router(tuple(ladder), vocab_size, pad_id, weights, chosen["threshold"],
                {**fitted_on, "questions": int(len(prompts)), "tolerance": tolerance,
                 "dev_accuracy": chosen["accuracy"],
                 "dev_mean_visual_tokens": chosen["mean_visual_tokens"]})
