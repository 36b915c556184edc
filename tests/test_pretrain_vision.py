"""Stage 0 (`pretrain_vision.pretrain`) on a tiny ViT: its checkpoints and metrics, a
resume that has nothing left to do, and a stage-1 VLM run starting from its ViT."""

import json
import math
import os

import jax
import numpy as np
import pytest

from tests.tiny import tiny_config
from tokenflex_jax import pretrain_vision
from tokenflex_jax.train import train
from tokenflex_jax.training import checkpointing

TOTAL, EVERY = 6, 3


@pytest.fixture(scope="module")
def stage0(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("stage0"))
  config = tiny_config(stage=0, total_steps=TOTAL, checkpoint_every=EVERY)
  state = pretrain_vision.pretrain(config, workdir)
  return workdir, config, state


def _records(workdir):
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def test_checkpoints_hold_the_patch_labeler(stage0):
  """Checkpoints at 3 and 6; the params are the ViT and the two heads, the ViT moved
  between them, and the returned state is the one saved last."""
  workdir, _, state = stage0
  assert checkpointing.latest_step(workdir) == TOTAL
  with checkpointing.make_manager(workdir, read_only=True, asynchronous=False) as manager:
    assert sorted(manager.all_steps()) == [EVERY, TOTAL]
  assert checkpointing.saved_modules(workdir) == ("color_head", "object_head", "vit")
  assert sorted(state.params) == ["color_head", "object_head", "vit"]
  assert int(state.step) == TOTAL
  abstract = {"vit": _abstract(state.params["vit"])}
  at_end, _ = checkpointing.load_params(workdir, abstract, TOTAL)
  at_mid, _ = checkpointing.load_params(workdir, abstract, EVERY)
  for saved, final in zip(jax.tree.leaves(at_end), jax.tree.leaves(state.params["vit"])):
    np.testing.assert_array_equal(np.asarray(saved), np.asarray(final))
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(at_end), jax.tree.leaves(at_mid)))
  assert os.path.exists(os.path.join(workdir, "tokenizer.model"))
  assert checkpointing.load_meta(workdir, TOTAL)["stage"] == 0


def test_metrics_of_every_step(stage0):
  """metrics.jsonl: steps 1..6 once each, finite loss, the patch-labelling metrics in
  [0, 1], the single bucket (the whole 16 x 16 patch grid)."""
  workdir, _, _ = stage0
  records = _records(workdir)
  assert [r["step"] for r in records] == list(range(1, TOTAL + 1))
  for r in records:
    assert math.isfinite(r["train/loss"]) and r["train/loss"] > 0
    assert 0.0 <= r["train/color_accuracy"] <= 1.0
    assert 0.0 <= r["train/object_recall"] <= 1.0
    assert r["train/num_tokens"] == 256
    assert math.isfinite(r["train/grad_norm"])


def test_a_second_call_resumes_with_nothing_to_do(stage0):
  """Calling pretrain again on the finished workdir resumes at step 6: no new steps,
  metrics or checkpoints, and the same params."""
  workdir, config, state = stage0
  before = _records(workdir)
  again = pretrain_vision.pretrain(config, workdir)
  assert checkpointing.latest_step(workdir) == TOTAL
  assert _records(workdir) == before
  assert int(again.step) == TOTAL
  for a, b in zip(jax.tree.leaves(again.params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_the_vlm_starts_from_the_pretrained_vit(stage0, tmp_path):
  """Stage 1 with init.vision_checkpoint: its ViT (frozen in stage 1) is stage 0's,
  bit for bit, the tokenizer is inherited, and the run trains."""
  s0, _, s0_state = stage0
  workdir = str(tmp_path / "stage1")
  config = tiny_config(stage=1, total_steps=2, checkpoint_every=2, token_counts=(64,),
                       token_probs=(1.0,), init__vision_checkpoint=s0)
  state = train(config, workdir)
  assert checkpointing.latest_step(workdir) == 2
  assert sorted(state.params) == ["llm", "projector", "vit"]
  for a, b in zip(jax.tree.leaves(state.params["vit"]), jax.tree.leaves(s0_state.params["vit"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  saved, _ = checkpointing.load_params(workdir, {"vit": _abstract(state.params["vit"])}, 2)
  for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(s0_state.params["vit"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  with open(os.path.join(s0, "tokenizer.model"), "rb") as f0, \
      open(os.path.join(workdir, "tokenizer.model"), "rb") as f1:
    assert f0.read() == f1.read()
  assert [r["step"] for r in _records(workdir)] == [1, 2]
