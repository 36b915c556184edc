r"""Stage 0 of the demo: dense pre-training of the ViT on per-patch scene labels.

  python -m tokenflex_jax.pretrain_vision --config=configs/demo.py:stage=0 --workdir=/tmp/s0

The demo's stand-in for starting from a pretrained SigLIP. The VLM trainer takes the
resulting ViT with ``--config.init.vision_checkpoint=/tmp/s0``.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from tokenflex_jax import cli, setup
from tokenflex_jax.data import pipeline, scenes
from tokenflex_jax.models.patch_labeler import PatchLabeler, patch_label_loss
from tokenflex_jax.training import checkpointing, steps
from tokenflex_jax.training.loop import train_loop
from tokenflex_jax.training.metrics import MetricWriter
from tokenflex_jax.training.optimizer import make_optimizer

def make_step(model: PatchLabeler, tx: optax.GradientTransformation, schedule: optax.Schedule,
              object_weight: float):
  """(state, batch, _) -> (state, metrics); batch has image, patch_color, patch_object."""
  def loss_fn(params, batch):
    color, obj = model.apply({"params": params}, batch["image"])
    return patch_label_loss(color, obj, batch["patch_color"], batch["patch_object"],
                            object_weight)

  def step(state: steps.TrainState, batch, _):
    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    metrics = {"loss": loss, "grad_norm": optax.global_norm(grads),
               "learning_rate": schedule(state.step), **aux}
    return steps.TrainState(state.step + 1, optax.apply_updates(state.params, updates),
                            opt_state), metrics

  return step


def pretrain(config: ml_collections.ConfigDict, workdir: str) -> steps.TrainState:
  setup.prepare_workdir(workdir, config)
  mesh, rules = setup.mesh_and_rules(config)
  setup.prepare_tokenizer(config, workdir)  # Later stages inherit it from this workdir.
  vit_cfg = setup.vit_config(config)
  model = PatchLabeler(vit_cfg, num_colors=len(scenes.COLORS),
                       num_objects=scenes.NUM_OBJECT_TYPES)

  source = pipeline.make_source(config.data)
  data_iterator_from = lambda start: pipeline.make_iterator(
      source, pipeline.PatchLabelPreprocess(vit_cfg.patch_size), config.batch_size,
      config.data.seed, config.data.num_workers, start_batch=start)
  local, size, g = (config.batch_size // jax.process_count(), config.data.image_size,
                    vit_cfg.grid_side)
  example = {"image": np.zeros((local, size, size, 3), np.float32),
             "patch_color": np.zeros((local, g, g), np.int32),
             "patch_object": np.zeros((local, g, g), np.int32)}
  abstract_batch, batch_sh = pipeline.abstract_batch(example, mesh, rules)

  image = abstract_batch["image"]
  init_params = lambda rng: model.init(rng, jnp.zeros(image.shape, image.dtype))["params"]
  abstract_params = jax.eval_shape(lambda r: nn.unbox(init_params(r)), jax.random.key(0))
  mults = {name: 1.0 for name in abstract_params}
  mults.update(setup.multipliers(config))
  tx, schedule = make_optimizer(config.optimizer, mults, config.total_steps, abstract_params)
  manager = checkpointing.make_manager(workdir, keep=config.keep_checkpoints)
  state, state_sh, start, data_iterator = steps.initialize_state(
      init_params=init_params, tx=tx, rng=jax.random.key(config.seed), mesh=mesh, rules=rules,
      manager=manager, data_iterator_from=data_iterator_from)

  step_fn = make_step(model, tx, schedule, config.vision_pretrain.object_weight)
  abstract_state = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), state)
  full_grid = g * g
  compiled = steps.compile_per_bucket(step_fn, abstract_state, state_sh, abstract_batch,
                                      batch_sh, (full_grid,), mesh, rules,
                                      what="patch-labelling step, {n} patches")
  writer = MetricWriter(workdir)
  state, _ = train_loop(
      state=state, start_step=start, total_steps=config.total_steps, compiled=compiled,
      count_for_step=lambda step: full_grid, data_iterator=data_iterator,
      to_global=lambda b: pipeline.to_global_batch(b, batch_sh),
      tokens_per_example=lambda n: n,
      flops_per_step={n: steps.compiled_flops(c) for n, c in compiled.items()},
      manager=manager, writer=writer,
      meta=lambda step: {"step": step, "stage": 0, "config": config.to_dict()},
      log_every=config.log_every, checkpoint_every=config.checkpoint_every,
      global_batch=config.batch_size)
  writer.close()
  manager.close()
  logging.info("vision pre-training done: %s", workdir)
  return state


def main() -> None:
  cli.run(pretrain)


if __name__ == "__main__":
  main()
