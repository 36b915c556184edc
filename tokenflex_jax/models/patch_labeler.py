"""ViT + per-patch classification heads: the demo's dense vision pre-training model.

Real TokenFLEX runs start from a pretrained SigLIP tower. The demo has none, so it
pre-trains its ViT on the scene generator's per-patch labels (colour and object type
under each patch), which teaches it local structure in minutes. Its "vit" subtree has
exactly the VLM's ViT layout, so the VLM trainer can load it (config.init.vision_checkpoint).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from tokenflex_jax.models import layers
from tokenflex_jax.models.vit import ViT, ViTConfig

# PatchLabeler's top-level parameter modules: one config.lr_multipliers entry each.
MODULES = ("vit", "color_head", "object_head")


class PatchLabeler(nn.Module):
  """Images [B, H, W, 3] -> (colour logits [B, L, num_colors], object logits [B, L, num_objects])."""
  vit_config: ViTConfig
  num_colors: int
  num_objects: int
  # The ViT's performance flags (see `ViT`); the parameters are the same whatever they say.
  remat_policy: str = "none"
  scan_layers: bool = True
  attention: str = "auto"

  @nn.compact
  def __call__(self, images: jax.Array) -> tuple[jax.Array, jax.Array]:
    features = ViT(self.vit_config, remat_policy=self.remat_policy,
                   scan_layers=self.scan_layers, attention=self.attention, name="vit")(images)
    color = layers.dense(self.num_colors, ("embed", "classes"), use_bias=True,
                         name="color_head")(features)
    obj = layers.dense(self.num_objects, ("embed", "classes"), use_bias=True,
                       name="object_head")(features)
    return color.astype(jnp.float32), obj.astype(jnp.float32)


def patch_label_loss(color_logits: jax.Array, object_logits: jax.Array, patch_color: jax.Array,
                     patch_object: jax.Array, object_weight: float
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Cross-entropy on both heads; patches with an object count ``object_weight`` times.

  Args:
    color_logits, object_logits: [B, L, K] logits.
    patch_color, patch_object: [B, g, g] int labels, L = g * g (0 object = background).
  """
  b = patch_color.shape[0]
  color, obj = patch_color.reshape(b, -1), patch_object.reshape(b, -1)
  w = jnp.where(obj > 0, object_weight, 1.0)
  ce = (optax.softmax_cross_entropy_with_integer_labels(color_logits, color)
        + optax.softmax_cross_entropy_with_integer_labels(object_logits, obj))
  loss = jnp.sum(ce * w) / jnp.sum(w)
  has_obj = (obj > 0).astype(jnp.float32)
  obj_correct = (jnp.argmax(object_logits, -1) == obj).astype(jnp.float32)
  return loss, {
      "loss_weight": jnp.sum(w),  # the normaliser, for gradient accumulation
      "color_accuracy": jnp.mean(jnp.argmax(color_logits, -1) == color),
      "object_recall": jnp.sum(obj_correct * has_obj) / jnp.maximum(jnp.sum(has_obj), 1.0),
      "patches": jnp.asarray(color.size, jnp.float32), "object_patches": jnp.sum(has_obj)}
