"""Weighted mixtures of sources: the draw follows the weights, is a pure function of the
position (so a resumed run sees the same batches), counts its examples per source, and
a run trains on one with the counts in its metrics."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tests.tiny import TINY_FLAGS, tiny_config, tiny_spec
from tests.xla_env import REPO, binary_env
from tokenflex_jax import errors
from tokenflex_jax.app import config_checks
from tokenflex_jax.data import pipeline
from tokenflex_jax.train import train


class Plus(pipeline.grain.transforms.Map):
  def __init__(self, offset):
    self.offset = offset

  def map(self, element):
    return {"x": np.int32(element["v"] + self.offset)}


def _mixed(seed=0):
  return pipeline.MixedSource([("small", [{"v": i} for i in range(10)], Plus(0), 3.0),
                               ("large", [{"v": i} for i in range(50)], Plus(1000), 1.0)],
                              seed)


def test_the_draw_follows_the_weights_and_the_position_alone():
  mixed = _mixed()
  # One epoch: the positions that draw each source at least its size (the large one's 50
  # at a weight of 1/4), so every example of each is in it.
  assert len(mixed) == 200 and mixed.names == ("small", "large")
  epoch = [mixed[k] for k in range(len(mixed))]
  assert {int(d["x"]) for d in epoch} == set(range(10)) | set(range(1000, 1050))
  drawn = [mixed[k] for k in range(400)]
  from_small = np.array([d["_source"] == 0 for d in drawn])
  assert from_small.mean() == pytest.approx(0.75, abs=0.05)
  assert all((d["x"] < 1000) == (d["_source"] == 0) for d in drawn)
  small = [int(d["x"]) for d in drawn if d["_source"] == 0]
  assert sorted(small[:10]) == list(range(10))  # each source's epoch: a permutation of it
  assert small[:10] != list(range(10))          # shuffled
  assert [_mixed()[k] for k in (399, 3, 57)] == [drawn[399], drawn[3], drawn[57]]
  assert [_mixed(seed=1)[k]["x"] for k in range(20)] != [d["x"] for d in drawn[:20]]


def test_a_source_without_examples_is_one_line_naming_it():
  with pytest.raises(errors.InputError, match=r"^config\.data\.mixture: source empty has no "
                                              r"examples"):
    pipeline.MixedSource([("full", [{"v": 1}], Plus(0), 1.0), ("empty", [], Plus(0), 1.0)], 0)


def test_batches_resume_and_are_counted_per_source():
  counts = pipeline.SourceCounts(("small", "large"))
  it = pipeline.make_iterator(_mixed(), pipeline.IDENTITY, 8, seed=0, sources=counts)
  batches = [next(it) for _ in range(6)]
  assert all(set(b) == {"x"} for b in batches)  # the tags are counted, not fed
  assert sum(counts.counts().values()) == 48 and counts.counts()["small"] > 24
  resumed = pipeline.make_iterator(_mixed(), pipeline.IDENTITY, 8, seed=0, start_batch=4)
  for want in batches[4:]:
    np.testing.assert_array_equal(next(resumed)["x"], want["x"])


@pytest.mark.parametrize("mixture,pattern", [
    ((("procedural", "", 1.0), ("coco", "/d", 1.0)),
     r"^config\.data\.mixture\[1\]: the source must be one of"),
    ((("llava", "", 1.0),), r"^config\.data\.mixture\[0\]: source 'llava' needs its tfds_dir"),
    ((("procedural", "", -1.0),), r"^config\.data\.mixture\[0\]: the weight must be a finite "
                                  r"number > 0"),
    ((("procedural", "", float("nan")),), r"^config\.data\.mixture\[0\]: the weight must be a "
                                          r"finite number > 0, got nan"),
    ((("procedural", "", 1.0), ("procedural", "", 0.0)),
     r"^config\.data\.mixture\[1\]: the weight must be a finite number > 0, got 0\.0"),
    ((("procedural", 1.0),), r"^config\.data\.mixture\[0\]=\('procedural', 1\.0\) must be "
                             r"\(source, tfds_dir, weight\)"),
])
def test_a_bad_mixture_is_one_line_naming_its_entry(mixture, pattern):
  with pytest.raises(errors.ConfigError, match=pattern):
    config_checks.check(tiny_spec(data__mixture=mixture), config_checks.TRAIN)


def test_stage_0_refuses_a_mixture():
  with pytest.raises(errors.ConfigError, match=r"^config\.data\.mixture: stage 0 trains on"):
    config_checks.check(tiny_spec(stage=0, data__mixture=(("procedural", "", 1.0),)),
                        config_checks.PRETRAIN_VISION)


def test_a_run_trains_on_a_mixture_and_logs_its_sources(tmp_path):
  config = tiny_config(total_steps=3, checkpoint_every=3, token_counts=(64,),
                       token_probs=(1.0,),
                       data__mixture=(("procedural", "", 3.0), ("procedural", "", 1.0)))
  train(config, str(tmp_path))
  with open(os.path.join(tmp_path, "metrics.jsonl"), encoding="utf-8") as f:
    last = [json.loads(line) for line in f][-1]
  fed = last["train/examples_from/0_procedural"] + last["train/examples_from/1_procedural"]
  assert last["step"] == 3 and fed == 3 * config.batch_size
  assert last["train/examples_from/0_procedural"] > last["train/examples_from/1_procedural"]


@pytest.mark.slow
def test_a_mixture_survives_three_kills_bit_identically(tmp_path):
  """The crash harness on a weighted mixture: 3 SIGKILLs (some inside a save), restarts,
  and the same parameters, optimizer state and losses as an uninterrupted run (2 min)."""
  tiny = [f for f in TINY_FLAGS if "token_counts" not in f and "token_probs" not in f]
  command = [sys.executable, "-m", "tokenflex_jax.crash_test", f"--workdir={tmp_path}",
             "--kills=3", "--total_steps=12", "--checkpoint_every=2", "--seed=5", "--",
             *tiny, "--config.token_counts=(64,)", "--config.token_probs=(1.0,)",
             "--config.eval.token_counts=(64,)",
             "--config.data.mixture=(('procedural','',3.0),('procedural','',1.0))"]
  result = subprocess.run(command, cwd=REPO, env=binary_env(8), capture_output=True, text=True,
                          timeout=900)
  assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
  last = result.stdout.strip().splitlines()[-1]
  assert last.startswith("3 kills (") and last.endswith("bit-identical=true"), last
