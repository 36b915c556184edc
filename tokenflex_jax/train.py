r"""Trains a TokenFLEX VLM: one visual-token budget per step, drawn from a static set.

  python -m tokenflex_jax.train --config=configs/demo.py --workdir=/tmp/run \
      [--config.total_steps=100 ...]

A restarted run resumes from the latest checkpoint in its workdir. Each token count
has its own train step, compiled ahead of time at start-up; the loop never compiles.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging

from tokenflex_jax import cli, setup
from tokenflex_jax.data import pipeline
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.training import buckets, checkpointing, steps
from tokenflex_jax.training.loop import train_loop
from tokenflex_jax.training.metrics import MetricWriter


def train(config: ml_collections.ConfigDict, workdir: str) -> steps.TrainState:
  """Trains until ``config.total_steps``, resuming from ``workdir`` if it has checkpoints."""
  counts, probs = tuple(config.token_counts), tuple(config.token_probs)
  buckets.validate_buckets(counts, probs)
  setup.prepare_workdir(workdir, config)
  mesh, rules = setup.mesh_and_rules(config)
  tokenizer = setup.prepare_tokenizer(config, workdir)
  model = VLM(setup.model_config(config, tokenizer))

  # Data.
  source = pipeline.make_source(config.data)
  transform = pipeline.make_transform(config.data, setup.tokenizer_loader(config, workdir))
  data_iterator_from = lambda start: pipeline.make_iterator(
      source, transform, config.batch_size, config.data.seed, config.data.num_workers,
      start_batch=start)
  abstract_batch, batch_sh = pipeline.abstract_vqa_batch(config, mesh, rules)

  # Model, optimizer, state.
  zeros = lambda a: jnp.zeros(a.shape, a.dtype)
  init_params = lambda rng: model.init(rng, zeros(abstract_batch["image"]),
                                       zeros(abstract_batch["tokens"]), counts[0])["params"]
  tx, step_fn, _ = setup.optimizer_and_step(config, model, init_params)

  def initial_params(abstract):
    if config.init.checkpoint:
      # Whatever modules it has: all of them from an earlier stage; the ViT and the LLM
      # (and no projector) from `python -m tokenflex_jax.convert`.
      saved = set(checkpointing.saved_modules(config.init.checkpoint)) & set(abstract)
      if not saved:
        raise ValueError(f"config.init.checkpoint={config.init.checkpoint!r} holds none of "
                         f"the modules {sorted(abstract)}")
      params, step = checkpointing.load_params(config.init.checkpoint,
                                               {k: abstract[k] for k in sorted(saved)})
      logging.info("initialised %s from %s (step %d)%s", ", ".join(sorted(saved)),
                   config.init.checkpoint, step,
                   "" if saved == set(abstract) else
                   f"; {', '.join(sorted(set(abstract) - saved))} freshly initialised")
      return params
    if config.init.vision_checkpoint:
      params, step = checkpointing.load_params(config.init.vision_checkpoint,
                                               {"vit": abstract["vit"]})
      logging.info("initialised the ViT from %s (step %d)", config.init.vision_checkpoint, step)
      return params
    return None

  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  state, state_sh, start, data_iterator = steps.initialize_state(
      init_params=init_params, tx=tx, rng=jax.random.key(config.seed), mesh=mesh, rules=rules,
      manager=manager, data_iterator_from=data_iterator_from, initial_params=initial_params)

  # One compiled step per visual-token bucket.
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  compiled = steps.compile_per_bucket(step_fn, abstract_state, state_sh, abstract_batch,
                                      batch_sh, counts, mesh, rules)

  writer = MetricWriter(workdir)
  logging.info("training steps %d -> %d, buckets %s with probabilities %s", start,
               config.total_steps, counts, probs)
  state, _ = train_loop(
      state=state, start_step=start, total_steps=config.total_steps, compiled=compiled,
      count_for_step=functools.partial(buckets.token_count_for_step, config.seed,
                                       counts=counts, probs=probs),
      data_iterator=data_iterator,
      to_global=lambda b: pipeline.to_global_batch(b, batch_sh),
      tokens_per_example=lambda n: config.data.max_text_length - 1 + n,
      flops_per_step={n: steps.compiled_flops(c) for n, c in compiled.items()},
      manager=manager, writer=writer,
      meta=lambda step: {"step": step, "stage": config.stage, "config": config.to_dict()},
      log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      global_batch=config.batch_size)
  writer.close()
  manager.close()
  return state


def main() -> None:
  cli.run(train)


if __name__ == "__main__":
  main()
