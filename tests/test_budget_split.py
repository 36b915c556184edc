"""The automatic budget's rules fixed on development questions, reported on test ones
(`studies/budget_split.py`), on records whose right answers are known by construction."""

import numpy as np
import pytest

from tokenflex_jax.evaluation import outputs
from tokenflex_jax.studies import budget_split

SECONDS = {64: 0.01, 144: 0.02, 256: 0.04}


def _record(seed: int, n: int = 900) -> dict:
  """Three families of questions: "easy" right at every count, "fine" right only at 256,
  "hopeless" never; each family's prompt has its own token; confidence says nothing."""
  rng = np.random.default_rng(seed)
  kind = np.arange(n) % 3
  families = np.array(["easy", "fine", "hopeless"])[kind]
  prompts = np.stack([np.zeros(n, int), np.ones(n, int), np.array([6, 5, 7])[kind],
                      np.full(n, 2)], 1)  # left-padded with 0
  credit = {64: (kind == 0) * 1.0, 144: (kind == 0) * 1.0, 256: (kind != 2) * 1.0}
  confidence = {c: rng.normal(size=n) for c in credit}
  record = outputs.per_question(prompts, families, confidence, credit, SECONDS)
  return record


def _read(tmp_path, name, record):
  path = tmp_path / name
  np.savez_compressed(path, **record)
  return outputs.read_questions(str(path))


def test_each_rule_is_fixed_on_development_questions_and_scored_on_test_ones(tmp_path):
  dev, test = _read(tmp_path, "dev.npz", _record(0)), _read(tmp_path, "test.npz", _record(1))
  assert dev["counts"] == [64, 144, 256] and dev["seconds"] == SECONDS
  rows = budget_split.rows(dev, test, (64, 256), 0.01, vocab_size=8, pad_id=0)
  assert rows["fixed_64"]["accuracy"] == pytest.approx(1 / 3)
  assert rows["fixed_256"]["accuracy"] == pytest.approx(2 / 3)
  assert rows["fixed_256"]["mean_seconds"] == pytest.approx(0.04)
  # The router escalates exactly the "fine" questions: the accuracy of 256, tokens of
  # one attempt at 64 for two thirds and two attempts (64 + 256) for the rest.
  router = rows["router"]
  assert router["accuracy"] == pytest.approx(2 / 3)
  assert router["mean_visual_tokens"] == pytest.approx(64 + 256 / 3)
  assert router["mean_seconds"] == pytest.approx(0.01 + 0.04 / 3)
  # The family rule asks "fine" at 256 directly: one attempt each.
  family = rows["family rule"]
  assert family["families_asked_at_largest"] == ["fine"]
  assert family["accuracy"] == pytest.approx(2 / 3)
  assert family["mean_visual_tokens"] == pytest.approx((2 * 64 + 256) / 3)
  # An uninformative log-probability comes near 2/3 only by escalating (nearly)
  # everything: its cheapest threshold within 1 point is the largest development value.
  logprob = rows["log-probability"]
  assert logprob["accuracy"] == pytest.approx(2 / 3, abs=0.01)
  assert logprob["mean_visual_tokens"] == pytest.approx(64 + 256, abs=2)
  oracle = rows["oracle"]
  assert oracle["accuracy"] == pytest.approx(2 / 3)
  assert oracle["mean_visual_tokens"] == pytest.approx((2 * 64 + 256) / 3)
