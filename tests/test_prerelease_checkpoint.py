"""A checkpoint in the pre-release per-layer layout (before the layers were stacked) is
refused in one line (a `UserError`: the binaries print it and exit 2)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflex_jax import errors
from tokenflex_jax.models.llm import LLMConfig
from tokenflex_jax.models.projector import ProjectorConfig
from tokenflex_jax.models.vit import ViTConfig
from tokenflex_jax.models.vlm import VLM, VLMConfig
from tokenflex_jax.training import checkpointing

def _params():
  vit = ViTConfig(image_size=8, patch_size=2, width=8, depth=3, mlp_dim=16, num_heads=2)
  llm = LLMConfig(vocab_size=16, width=8, depth=2, num_heads=2, num_kv_heads=1, head_dim=4,
                  mlp_dim=16)
  model = VLM(VLMConfig(vit, ProjectorConfig(), llm, image_token_id=4))
  tokens = jnp.array([[2, 4, 5, 6]])
  return nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), tokens, 4)["params"])


def _per_layer(params):
  """The pre-release layout: vit/block_<i>, llm/layer_<i> instead of vit/blocks, llm/layers."""
  old = dict(params)
  for module, prefix, key in (("vit", "block_", "blocks"), ("llm", "layer_", "layers")):
    sub = dict(params[module])
    stack = sub.pop(key)
    depth = jax.tree.leaves(stack)[0].shape[0]
    sub.update({f"{prefix}{i}": jax.tree.map(lambda a, i=i: np.asarray(a[i]), stack)
                for i in range(depth)})
    old[module] = sub
  return old


def test_a_prerelease_checkpoint_is_refused_in_one_line(tmp_path):
  params = _params()
  old_dir, new_dir = tmp_path / "old", tmp_path / "new"
  for workdir, tree in ((old_dir, _per_layer(params)), (new_dir, params)):
    with checkpointing.make_manager(str(workdir), asynchronous=False) as manager:
      checkpointing.save_params(manager, 7, tree, {"step": 7})
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), params)
  with pytest.raises(errors.CheckpointMismatchError,
                     match=r"^checkpoint .*/old/checkpoints/7 stores one subtree per layer "
                     r"\(llm/layer_0, \.\.\.\), the pre-release layout .* commit 3ac68c4 or "
                     r"earlier$"):
    checkpointing.load_params(str(old_dir), abstract)
  loaded, step = checkpointing.load_params(str(new_dir), abstract)  # the stacked layout
  assert step == 7
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  assert issubclass(errors.CheckpointMismatchError, errors.UserError)  # binaries: one line
