r"""Stage 0 of the demo: dense pre-training of the ViT on per-patch scene labels.

  python -m tokenflex_jax.pretrain_vision --config=configs/demo.py:stage=0 --workdir=/tmp/s0

The demo's stand-in for starting from a pretrained SigLIP. The VLM trainer takes the
resulting ViT with ``--config.init.vision_checkpoint=/tmp/s0``. What differs from VLM
training: the model (`PatchLabeler`: the ViT and two per-patch heads), its loss, its
batch (images and per-patch labels) and one bucket, the whole patch grid.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tokenflex_jax import model_config, sharding
from tokenflex_jax.app import cli, config_checks, config_schema, run_tokenizer
from tokenflex_jax.app import workdir as workdir_lib
from tokenflex_jax.data import pipeline, scenes
from tokenflex_jax.models import flops
from tokenflex_jax.models.patch_labeler import patch_label_loss, PatchLabeler
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training import steps, trainer
from tokenflex_jax.training.buckets import Buckets


def pretrain(config: config_schema.ConfigDict | RunSpec, workdir: str) -> steps.TrainState:
  config = config_schema.to_spec(config)
  config_checks.check(config, config_checks.PRETRAIN_VISION)  # Before the workdir, data, compiles.
  workdir_lib.prepare(workdir, config)
  mesh, rules = sharding.mesh_from_config(config)
  run_tokenizer.prepare(config, workdir)  # Later stages inherit it from this workdir.
  vit = model_config.vit_config(config)
  model = PatchLabeler(vit, num_colors=len(scenes.COLORS), num_objects=scenes.NUM_OBJECT_TYPES,
                       **model_config.layer_flags(config))
  local, size, g = config.batch_size // jax.process_count(), config.data.image_size, vit.grid_side
  abstract_batch, _ = pipeline.abstract_batch({
      "image": np.zeros((local, size, size, 3), np.float32),
      "patch_color": np.zeros((local, g, g), np.int32),
      "patch_object": np.zeros((local, g, g), np.int32)}, mesh, rules)

  def loss_fn(params, batch, _):
    color, obj = model.apply({"params": params}, batch["image"])
    return patch_label_loss(color, obj, batch["patch_color"], batch["patch_object"],
                            config.vision_pretrain.object_weight)

  image = abstract_batch["image"]
  source = pipeline.make_source(config.data)
  task = trainer.Task(
      init_params=lambda rng: model.init(rng, jnp.zeros(image.shape, image.dtype))["params"],
      loss_fn=loss_fn, abstract_batch=abstract_batch,
      data_from=lambda start: pipeline.make_iterator(
          source, pipeline.PatchLabelPreprocess(vit.patch_size), config.batch_size,
          config.data.seed, config.data.num_workers, start_batch=start,
          on_bad_record=config.data.on_bad_record),
      buckets=Buckets.single(g * g), tokens_per_example=lambda n: n,
      microbatches=config.microbatches,
      name="patch-labelling step",
      flops_per_step=lambda n: flops.patch_labeler_train_flops(
          vit, len(scenes.COLORS) + scenes.NUM_OBJECT_TYPES, config.batch_size))
  return trainer.train(config, workdir, task, mesh, rules)


def main() -> None:
  cli.run(pretrain, compilation_cache=True)


if __name__ == "__main__":
  main()
