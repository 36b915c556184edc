"""The automatic visual-token budget: escalation, its sweep and the oracle."""

import dataclasses
import json

import numpy as np
import pytest

from tokenflex_jax.evaluation import auto_budget

COUNTS = (64, 144, 256)
# Three questions; confidence at each count.
CONF = {64: np.array([-0.01, -2.0, -3.0]), 144: np.array([-0.5, -0.05, -2.5]),
        256: np.array([-0.2, -0.3, -1.0])}
TEXTS = {64: ["a", "x", "x"], 144: ["a", "b", "x"], 256: ["a", "b", "c"]}
TRUTH = ["a", "b", "c"]


def _scores(texts):
  return np.array([t == a for t, a in zip(texts, TRUTH)], np.float64)


def _score(texts):
  return {"all": float(_scores(texts).mean())}


def test_escalate_stops_at_the_first_confident_count_and_counts_every_attempt():
  chosen, spent = auto_budget.escalate(CONF, COUNTS, threshold=-0.1)
  assert chosen.tolist() == [64, 144, 256]
  assert spent.tolist() == [64, 64 + 144, 64 + 144 + 256]
  # The largest count answers when nothing is confident enough.
  chosen, spent = auto_budget.escalate(CONF, COUNTS, threshold=float("inf"))
  assert chosen.tolist() == [256] * 3 and spent.tolist() == [464] * 3
  chosen, spent = auto_budget.escalate(CONF, COUNTS, threshold=-10.0)
  assert chosen.tolist() == [64] * 3 and spent.tolist() == [64] * 3


def test_sweep_replays_each_threshold():
  curve = auto_budget.sweep(TEXTS, CONF, COUNTS, _score, [-10.0, -0.1, float("inf")])
  assert [p["accuracy"] for p in curve] == pytest.approx([1 / 3, 1.0, 1.0])
  assert [p["mean_visual_tokens"] for p in curve] == pytest.approx(
      [64, (64 + 208 + 464) / 3, 464])
  assert curve[-1]["threshold"] is None  # +inf: always escalate, stored as JSON null


def test_oracle_takes_the_smallest_count_that_answers():
  best = auto_budget.oracle(TEXTS, _scores, COUNTS, _score)
  assert best["accuracy"] == pytest.approx(1.0)
  assert best["mean_visual_tokens"] == pytest.approx((64 + 144 + 256) / 3)
  # A question no count answers is charged the smallest count.
  wrong = {c: ["z", "z", "z"] for c in COUNTS}
  assert auto_budget.oracle(wrong, _scores, COUNTS, _score)["mean_visual_tokens"] == 64


def test_default_thresholds_span_the_smallest_counts_confidence():
  thresholds = auto_budget.default_thresholds(CONF)
  assert thresholds[0] == pytest.approx(CONF[64].min())
  assert thresholds[-2] == pytest.approx(CONF[64].max()) and thresholds[-1] == float("inf")
  assert thresholds == sorted(thresholds)


def test_ladders_run_from_the_smallest_to_the_largest_count():
  assert auto_budget.ladders([256, 64, 144]) == [(64, 144, 256), (64, 256)]
  assert auto_budget.ladders([64, 100, 144, 256])[0] == (64, 100, 144, 256)
  assert len(auto_budget.ladders([64, 100, 144, 256])) == 4
  assert auto_budget.ladders([64]) == [(64,)]


def test_ladder_counts_default_and_validation():
  assert auto_budget.ladder_counts((), (256, 64, 144)) == (64, 144, 256)
  assert auto_budget.ladder_counts((), (64, 144, 256), (64, 256)) == (64, 256)
  assert auto_budget.ladder_counts((256, 64), (64, 144, 256)) == (64, 256)
  with pytest.raises(ValueError, match="config.eval.auto_counts"):
    auto_budget.ladder_counts((64, 100), (64, 144, 256))
  with pytest.raises(ValueError, match="config.eval.auto_counts"):
    auto_budget.ladder_counts((64,), (64, 144, 256))


def test_router_escalates_where_more_tokens_help():
  """Questions with token 5 are right only at the larger count, those with token 7 at
  neither; the router, cross-fitted, escalates exactly the first kind: the raw
  confidence cannot tell them apart, and hard-but-hopeless questions stay small."""
  rng = np.random.default_rng(0)
  n = 600
  kind = rng.integers(3, size=n)  # 0: easy, 1: needs 256, 2: hopeless
  prompts = np.stack([np.ones(n, int), np.array([6, 5, 7])[kind], np.full(n, 2)], 1)
  confidence = {64: rng.normal(size=n), 256: rng.normal(size=n)}  # uninformative
  credit = {64: (kind == 0).astype(float), 256: (kind != 2).astype(float)}
  routed = auto_budget.router_confidence(prompts, 8, confidence, credit, (64, 256))
  assert routed[64][kind == 1].max() < -0.5 < routed[64][kind != 1].min()
  np.testing.assert_array_equal(routed[256], 0.0)
  chosen, spent = auto_budget.escalate(routed, [64, 256], -0.5)
  np.testing.assert_array_equal(chosen, np.where(kind == 1, 256, 64))
  assert spent.mean() == pytest.approx(64 + 256 * (kind == 1).mean())
  x = auto_budget.router_features(prompts, 8, confidence[64])
  assert x.shape == (n, 10) and set(np.unique(x[:, :8])) == {0.0, 1.0}


def test_a_fitted_router_keeps_its_decisions_through_json_and_ignores_padding():
  """Fitted once on development questions (`fit_router`), the router escalates the
  questions that need the larger count; its threshold is the cheapest within the
  tolerance of the best accuracy; written to JSON and read back it decides the same,
  padded prompts or not."""
  rng = np.random.default_rng(1)
  n = 600
  kind = rng.integers(3, size=n)  # 0: easy, 1: needs 256, 2: hopeless
  prompts = np.stack([np.ones(n, int), np.array([6, 5, 7])[kind], np.full(n, 2)], 1)
  confidence = {64: rng.normal(size=n), 256: rng.normal(size=n)}
  credit = {64: (kind == 0).astype(float), 256: (kind != 2).astype(float)}
  texts = {c: ["right" if x else "wrong" for x in credit[c]] for c in credit}
  score = lambda answers: {"all": float(np.mean([a == "right" for a in answers]))}
  router = auto_budget.fit_router(prompts, 8, 0, confidence, credit, texts, score,
                                  (64, 256), 0.01, {"step": 3, "eval_seed": 7})
  assert router.counts == (64, 256) and router.threshold is not None
  assert router.fitted_on["step"] == 3 and router.fitted_on["questions"] == n
  assert router.fitted_on["dev_accuracy"] == pytest.approx(2 / 3, abs=0.05)
  stops = router.stops(64, prompts, confidence[64])
  np.testing.assert_array_equal(stops, kind != 1)
  assert router.stops(256, prompts, confidence[256]).all()
  again = auto_budget.Router.from_json(json.loads(json.dumps(router.to_json())))
  np.testing.assert_allclose(again.signal(64, prompts, confidence[64]),
                             router.signal(64, prompts, confidence[64]))
  padded = np.concatenate([np.zeros((n, 4), int), prompts], axis=1)  # pad id 0 in front
  np.testing.assert_allclose(again.signal(64, padded, confidence[64]),
                             router.signal(64, prompts, confidence[64]))
  never = dataclasses.replace(router, threshold=None)
  assert not never.stops(64, prompts, confidence[64]).any()


def test_cheapest_within_picks_the_fewest_tokens_near_the_best():
  curve = [{"accuracy": 0.70, "mean_visual_tokens": 64}, {"accuracy": 0.795,
           "mean_visual_tokens": 120}, {"accuracy": 0.80, "mean_visual_tokens": 200}]
  assert auto_budget.cheapest_within(curve, 0.01)["mean_visual_tokens"] == 120
  assert auto_budget.cheapest_within(curve, 0.0)["mean_visual_tokens"] == 200
  assert auto_budget.cheapest_within(curve, 0.2)["mean_visual_tokens"] == 64
