"""Checkpoints from before the layers were stacked: refused with the command that
converts them, and converted exactly."""

import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflex_jax.convert import legacy_layers, stack_layers
from tokenflex_jax.models.llm import LLMConfig
from tokenflex_jax.models.projector import ProjectorConfig
from tokenflex_jax.models.vit import ViTConfig
from tokenflex_jax.models.vlm import VLM, VLMConfig
from tokenflex_jax.training import checkpointing

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _params():
  vit = ViTConfig(image_size=8, patch_size=2, width=8, depth=3, mlp_dim=16, num_heads=2)
  llm = LLMConfig(vocab_size=16, width=8, depth=2, num_heads=2, num_kv_heads=1, head_dim=4,
                  mlp_dim=16)
  model = VLM(VLMConfig(vit, ProjectorConfig(), llm, image_token_id=4))
  tokens = jnp.array([[2, 4, 5, 6]])
  return nn.unbox(model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)), tokens, 4)["params"])


def _per_layer(params):
  """The layout before stacking: vit/block_<i>, llm/layer_<i>."""
  old = dict(params)
  for module, (prefix, key) in legacy_layers.PER_LAYER_KEYS.items():
    sub = dict(params[module])
    stack = sub.pop(key)
    depth = jax.tree.leaves(stack)[0].shape[0]
    sub.update({f"{prefix}{i}": jax.tree.map(lambda a, i=i: np.asarray(a[i]), stack)
                for i in range(depth)})
    old[module] = sub
  return old


def _save(workdir, params, step=7):
  with checkpointing.make_manager(str(workdir), asynchronous=False) as manager:
    checkpointing.save_params(manager, step, params, {"step": step})
  (workdir / "config.json").write_text("{}")


def test_stack_is_the_exact_inverse_of_the_old_layout():
  params = _params()
  old = _per_layer(params)
  assert legacy_layers.per_layer_subtrees(old)[:2] == ["llm/layer_0", "llm/layer_1"]
  assert legacy_layers.per_layer_subtrees(params) == []
  back = legacy_layers.stack(old)
  assert jax.tree.structure(back) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, back, params)
  broken = _per_layer(params)
  del broken["llm"]["layer_0"]
  with pytest.raises(ValueError, match=r"llm: per-layer subtrees \[1\] are not 0..0"):
    legacy_layers.stack(broken)


def test_an_old_checkpoint_is_refused_with_the_command_then_converted(tmp_path):
  params = _params()
  old_dir, new_dir = tmp_path / "old", tmp_path / "new"
  _save(old_dir, _per_layer(params))
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0])), params)
  with pytest.raises(ValueError, match=r"one subtree per layer \(llm/layer_0, \.\.\.\).*"
                     r"tokenflex_jax\.convert\.stack_layers --from="):
    checkpointing.load_params(str(old_dir), abstract)
  # The binary converts it: the new workdir loads the very same numbers.
  subprocess.run([sys.executable, "-m", "tokenflex_jax.convert.stack_layers",
                  f"--from={old_dir}", f"--to={new_dir}"], check=True, cwd=REPO,
                 capture_output=True)
  loaded, step = checkpointing.load_params(str(new_dir), abstract)
  assert step == 7 and (new_dir / "config.json").exists()
  jax.tree.map(np.testing.assert_array_equal, loaded, params)
  with pytest.raises(ValueError, match="already holds checkpoints"):
    stack_layers.convert(str(old_dir), str(new_dir))
  with pytest.raises(ValueError, match="already stores stacked layers"):
    stack_layers.convert(str(new_dir), str(tmp_path / "again"))
