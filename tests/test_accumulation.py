"""Gradient accumulation: k microbatches make the step of the whole batch (loss,
gradients and the update, the per-sample sqrt weighting included), on the suite's mesh;
also with each microbatch at its own visual-token count (config.count_per_microbatch)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.tiny import tiny_config, tiny_spec
from tokenflex_jax import errors, model_config, sharding, specs
from tokenflex_jax.app import config_checks, config_schema
from tokenflex_jax.data import pipeline
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.train import train
from tokenflex_jax.training import compiled, steps, trainer
from tokenflex_jax.training.buckets import Buckets
from tokenflex_jax.training import vlm_task as vlm_task_lib
from tokenflex_jax.training.vlm_task import vlm_task

BATCH = 16


def _batch(config: specs.RunSpec, seed: int = 0) -> dict:
  """A global batch whose rows answer 1 to 12 tokens (so the sqrt weighting differs per
  row), the image placeholder at position 0."""
  rng = np.random.default_rng(seed)
  size, length = config.data.image_size, config.data.max_text_length
  tokens = rng.integers(5, config.model.llm.vocab_size, (BATCH, length)).astype(np.int32)
  tokens[:, 0] = model_config.FixedTokenIds(config.model.llm.vocab_size).image_id
  answers = rng.permutation(np.arange(1, BATCH + 1) % 12 + 1)
  mask = (np.arange(length)[None] >= length - answers[:, None]).astype(np.float32)
  return {"image": rng.uniform(-1, 1, (BATCH, size, size, 3)).astype(np.float32),
          "tokens": tokens, "loss_mask": mask}


def _step(config: specs.RunSpec, num_tokens: int = 64):
  """(metrics, params after one step) from the same random state and batch."""
  mesh, rules = sharding.mesh_from_config(config)
  model = VLM(model_config.vlm_config(config, model_config.FixedTokenIds(
      config.model.llm.vocab_size)))
  task = vlm_task(config, model, mesh, rules)
  job = trainer.compile_task(config, task, mesh, rules)
  state = steps.random_state(task.init_params, job.optimizer.tx, jax.random.key(0),
                             job.state_shardings, mesh, rules)
  batch = pipeline.to_global_batch(_batch(config),
                                   compiled.shardings_of(dict(task.abstract_batch)))
  state, metrics = job.steps[num_tokens](state, batch)
  return jax.device_get(metrics), jax.device_get(state.params)


@pytest.fixture(scope="module")
def whole_batch():
  return _step(tiny_spec(batch_size=BATCH, token_counts=(64,), token_probs=(1.0,)))


@pytest.mark.parametrize("microbatches", [2, 4])
def test_microbatches_make_the_whole_batchs_step(whole_batch, microbatches):
  config = tiny_spec(batch_size=BATCH, microbatches=microbatches, token_counts=(64,),
                     token_probs=(1.0,))
  config_checks.check(config, config_checks.AOT)
  metrics, params = _step(config)
  want_metrics, want_params = whole_batch
  assert metrics["useful_positions"] == want_metrics["useful_positions"]  # a count: summed
  assert metrics["answer_tokens"] == want_metrics["answer_tokens"]
  assert metrics["token_accuracy"] == pytest.approx(want_metrics["token_accuracy"], abs=1e-6)
  assert metrics["loss"] == pytest.approx(want_metrics["loss"], rel=1e-5)
  assert metrics["grad_norm"] == pytest.approx(want_metrics["grad_norm"], rel=1e-5)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_useful_positions_count_text_and_visual_tokens_not_padding(whole_batch):
  config = tiny_spec(batch_size=BATCH)
  tokens = _batch(config)["tokens"]
  tokens[:, 1:4] = 0  # three padding tokens per row (pad id 0)
  n, t = 64, tokens.shape[1]
  got = vlm_task_lib.useful_positions(jnp.asarray(tokens), n, image_id=1, pad_id=0)
  assert float(got) == BATCH * (t - 3 - 1 + n)
  tokens[::2, 0] = 7  # half the rows text-only: their visual slots are padding too
  got = vlm_task_lib.useful_positions(jnp.asarray(tokens), n, image_id=1, pad_id=0)
  assert float(got) == BATCH * (t - 3) - BATCH // 2 + BATCH // 2 * n
  assert whole_batch[0]["useful_positions"] == BATCH * (t - 1 + n)  # the step's own count


def test_normalising_each_microbatch_alone_would_differ():
  """The trap the loss weight avoids: the mean of per-microbatch sqrt-weighted means is
  not the batch's (so the test above can fail)."""
  config = tiny_spec(batch_size=BATCH)
  mask = _batch(config)["loss_mask"]
  per_row = mask.sum(1)
  w = mask / np.sqrt(per_row)[:, None]
  ce = np.random.default_rng(1).uniform(0, 5, mask.shape) * mask
  whole = (ce * w).sum() / w.sum()
  halves = np.mean([(ce[j::2] * w[j::2]).sum() / w[j::2].sum() for j in range(2)])
  assert abs(halves - whole) > 1e-3 * whole


def test_a_share_of_a_count_averages_over_that_count_not_the_loss_weight():
  """token_accuracy of microbatches answering 3 of 12 and 9 of 11 tokens is the batch's
  12 of 23, though their loss weights (2 and 5) differ; likewise the ViT's shares of
  patches; a metric that is no share averages weighted like the loss."""
  micro = [({"token_accuracy": 3 / 12, "answer_tokens": 12.0, "color_accuracy": 0.5,
             "patches": 8.0, "object_recall": 1.0, "object_patches": 1.0, "other": 1.0}, 2.0),
           ({"token_accuracy": 9 / 11, "answer_tokens": 11.0, "color_accuracy": 1.0,
             "patches": 8.0, "object_recall": 0.0, "object_patches": 3.0, "other": 4.0}, 5.0)]
  acc = steps.Accumulator(jnp.zeros(()), {k: jnp.zeros(()) for k in micro[0][0]}, {},
                          jnp.zeros(()))
  for aux, weight in micro:
    acc = steps._accumulate(acc, jnp.ones(()), {k: jnp.asarray(v) for k, v in aux.items()},
                            {}, jnp.asarray(weight))
  _, aux, _ = steps._averaged(acc, {})
  assert float(aux["token_accuracy"]) == pytest.approx(12 / 23)
  assert float(aux["answer_tokens"]) == 23.0
  assert float(aux["color_accuracy"]) == pytest.approx(0.75)
  assert float(aux["object_recall"]) == pytest.approx(0.25)
  assert float(aux["other"]) == pytest.approx((2 * 1 + 5 * 4) / 7)


def test_a_batch_the_microbatches_do_not_divide_is_refused():
  with pytest.raises(errors.ConfigError, match=r"^config\.batch_size=16 is not divisible by "
                     r"config\.microbatches=3"):
    config_checks.check(tiny_spec(batch_size=BATCH, microbatches=3), config_checks.AOT)
  with pytest.raises(errors.ConfigError, match=r"^config\.batch_size / config\.microbatches=2 "
                     r"must be a positive multiple of the data-parallel size 4"):
    config_checks.check(tiny_spec(batch_size=BATCH, microbatches=8), config_checks.AOT)


# --- Each microbatch at its own count (config.count_per_microbatch) ------------------

def _job(config: specs.RunSpec):
  """(task, compiled job, a random state maker, the global batch) for ``config``."""
  mesh, rules = sharding.mesh_from_config(config)
  model = VLM(model_config.vlm_config(config, model_config.FixedTokenIds(
      config.model.llm.vocab_size)))
  task = vlm_task(config, model, mesh, rules)
  job = trainer.compile_task(config, task, mesh, rules)
  fresh = lambda: steps.random_state(task.init_params, job.optimizer.tx, jax.random.key(0),
                                     job.state_shardings, mesh, rules)
  batch = pipeline.to_global_batch(_batch(config),
                                   compiled.shardings_of(dict(task.abstract_batch)))
  return task, job, fresh, batch


def test_every_microbatch_at_one_count_is_the_whole_batchs_step(whole_batch):
  config = tiny_spec(batch_size=BATCH, microbatches=2, count_per_microbatch=True,
                     token_counts=(64,), token_probs=(1.0,))
  config_checks.check(config, config_checks.AOT)
  _, job, fresh, batch = _job(config)
  assert job.draws.count_for_step(5) == (64, 64)
  # As one compiled step (aot and the bench read it): its programs' FLOPs, and at least
  # the parameters, optimizer state and gradients in memory at once.
  step = job.steps[64]
  state_bytes = sharding.bytes_per_device(job.abstract_state)
  assert step.flops > 0 and step.compile_seconds > 0
  assert compiled.total_bytes(step.memory) > (
      state_bytes + sharding.bytes_per_device(job.abstract_state.params))
  state, metrics = job.draws.step_for((64, 64))(fresh(), batch)
  metrics, params = jax.device_get(metrics), jax.device_get(state.params)
  want_metrics, want_params = whole_batch
  assert metrics["useful_positions"] == want_metrics["useful_positions"]
  assert metrics["loss"] == pytest.approx(want_metrics["loss"], rel=1e-5)
  assert metrics["grad_norm"] == pytest.approx(want_metrics["grad_norm"], rel=1e-5)
  for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_microbatches_at_their_own_counts_weigh_as_one_batch():
  """(64, 144): microbatch 0 (rows 0, 2, ...) at 64 tokens, microbatch 1 (rows 1, 3, ...)
  at 144. The loss, gradients and update are the loss-weight-weighted mean of the two,
  computed here from the loss function alone; and the counts matter (both at 64 differs)."""
  config = tiny_spec(batch_size=BATCH, microbatches=2, count_per_microbatch=True,
                     token_counts=(64, 144), token_probs=(0.5, 0.5))
  task, job, fresh, batch = _job(config)
  with pytest.raises(KeyError, match="a draw of 2 of the counts"):
    job.draws.step_for((64, 256))
  start = jax.device_get(fresh())
  host, mesh_rules = _batch(config), sharding.mesh_from_config(config)
  parts = []
  with sharding.mesh_rules(*mesh_rules):
    for j, n in enumerate((64, 144)):
      rows = {k: v[j::2] for k, v in host.items()}
      (loss, aux), grads = jax.jit(jax.value_and_grad(
          lambda p, b, n=n: task.loss_fn(p, b, n), has_aux=True))(start.params, rows)
      parts.append((float(aux[steps.LOSS_WEIGHT]), float(loss), jax.device_get(grads)))
  total = sum(w for w, _, _ in parts)
  want_loss = sum(w * loss for w, loss, _ in parts) / total
  want_grads = jax.tree.map(lambda *g: sum(w * x for (w, _, _), x in zip(parts, g)) / total,
                            *[g for _, _, g in parts])
  updates, _ = jax.jit(job.optimizer.tx.update)(want_grads, start.opt_state, start.params)
  want_params = jax.tree.map(np.add, start.params, jax.device_get(updates))

  both_64 = jax.device_get(job.draws.step_for((64, 64))(fresh(), batch)[1])
  state, metrics = job.draws.step_for((64, 144))(fresh(), batch)
  metrics = jax.device_get(metrics)
  assert metrics["loss"] == pytest.approx(want_loss, rel=1e-5)
  assert metrics["grad_norm"] == pytest.approx(
      float(np.sqrt(sum(np.sum(g ** 2) for g in jax.tree.leaves(want_grads)))), rel=1e-5)
  assert abs(metrics["loss"] - both_64["loss"]) > 1e-4 * abs(both_64["loss"])
  for got, want in zip(jax.tree.leaves(jax.device_get(state.params)),
                       jax.tree.leaves(want_params)):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_a_count_per_microbatch_needs_microbatches():
  with pytest.raises(errors.ConfigError, match=r"^config\.count_per_microbatch=True needs "
                     r"config\.microbatches >= 2, got 1"):
    config_checks.check(tiny_spec(batch_size=BATCH, count_per_microbatch=True),
                        config_checks.AOT)


def test_a_run_with_a_count_per_microbatch_logs_its_draws_and_resumes_identically(tmp_path):
  two = dict(microbatches=2, count_per_microbatch=True, token_counts=(64, 144),
             token_probs=(0.5, 0.5), checkpoint_every=2)
  config = tiny_config(total_steps=4, **two)
  straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
  train(config, straight)
  train(tiny_config(total_steps=2, **two), resumed)
  train(config, resumed)  # from step 2
  records = {}
  for workdir in (straight, resumed):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
      records[workdir] = {r["step"]: (r["train/loss"], r["train/num_tokens"])
                          for r in map(json.loads, f) if "train/loss" in r}
  assert records[straight] == records[resumed]  # bit-identical losses
  draws = Buckets.of(config_schema.to_spec(config))
  assert [records[straight][s][1] for s in range(1, 5)] == [
      float(np.mean(draws.for_microbatches(s, 2))) for s in range(4)]
