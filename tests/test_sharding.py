"""Logical axis names -> shardings on a (data=2, fsdp=2, tensor=2) mesh of 8 host devices."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import demo
from tokenflex_jax import sharding
from tokenflex_jax.models.llm import LLMConfig
from tokenflex_jax.models.projector import ProjectorConfig
from tokenflex_jax.models.vit import ViTConfig
from tokenflex_jax.models.vlm import VLM, VLMConfig


def demo_model() -> VLM:
  c = demo.get_config()
  return VLM(VLMConfig(ViTConfig(**c.model.vit.to_dict()),
                       ProjectorConfig(**c.model.projector.to_dict()),
                       LLMConfig(**c.model.llm.to_dict()), image_token_id=4))


@pytest.fixture(scope="module")
def mesh():
  assert jax.device_count() == 8
  return sharding.make_mesh((2, 2, 2))


def test_make_mesh_validates_shape():
  assert dict(sharding.make_mesh((-1, 2, 1)).shape) == {"data": 4, "fsdp": 2, "tensor": 1}
  with pytest.raises(ValueError, match="needs 6 devices"):
    sharding.make_mesh((3, 2, 1))
  with pytest.raises(ValueError, match="at most one -1"):
    sharding.make_mesh((-1, -1, 2))
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    sharding.rules_from_config((("embed", "model"),))


def test_every_parameter_has_logical_names_and_expected_sharding(mesh):
  model = demo_model()
  rules = sharding.rules_from_config(sharding.FSDP_TP_RULES)
  images = jax.ShapeDtypeStruct((8, 32, 32, 3), jnp.float32)
  tokens = jax.ShapeDtypeStruct((8, 24), jnp.int32)
  with sharding.mesh_rules(mesh, rules):
    boxed = jax.eval_shape(lambda r: model.init(r, jnp.zeros(images.shape),
                                                jnp.zeros(tokens.shape, jnp.int32), 64)["params"],
                           jax.random.key(0))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  spec = lambda *path: _get(shardings, path).spec
  assert spec("llm", "embedding") == P("tensor", "fsdp")
  assert spec("llm", "layer_0", "mlp", "gate", "kernel") == P("fsdp", "tensor")
  assert spec("llm", "layer_0", "mlp", "down", "kernel") == P("tensor", "fsdp")
  assert spec("llm", "layer_0", "attn", "q", "kernel") == P("fsdp", "tensor", None)
  # One KV head cannot be split over tensor=2: that dim stays replicated.
  assert spec("llm", "layer_0", "attn", "k", "kernel") == P("fsdp", None, None)
  assert spec("projector", "mlp", "up", "kernel") == P("fsdp", "tensor")
  assert spec("vit", "block_0", "fc1", "kernel") == P("fsdp", "tensor")
  assert spec("vit", "pos_embedding") == P(None, None, "fsdp")
  assert spec("llm", "layer_0", "attn_norm", "scale") == P(None)

  # Real arrays land with those shardings, and each device holds only its shard.
  with sharding.mesh_rules(mesh, rules):
    params = jax.jit(lambda r: nn.unbox(model.init(r, jnp.zeros(images.shape),
                                                   jnp.zeros(tokens.shape, jnp.int32),
                                                   64)["params"]),
                     out_shardings=shardings)(jax.random.key(0))
  emb = params["llm"]["embedding"]
  assert emb.sharding.spec == P("tensor", "fsdp")
  assert emb.addressable_shards[0].data.shape == (emb.shape[0] // 2, emb.shape[1] // 2)


def test_sharded_forward_matches_single_device(mesh):
  model = demo_model()
  rules = sharding.rules_from_config(sharding.FSDP_TP_RULES)
  rng = np.random.default_rng(0)
  images = jnp.asarray(rng.uniform(-1, 1, (8, 32, 32, 3)), jnp.float32)
  tokens = np.zeros((8, 24), np.int32)
  tokens[:, :6] = [2, 5, 4, 7, 8, 6]
  tokens = jnp.asarray(tokens)
  params = nn.unbox(model.init(jax.random.key(0), images, tokens, 144)["params"])
  expected = model.apply({"params": params}, images, tokens, 144)
  with sharding.mesh_rules(mesh, rules):
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), images, tokens, 144)["params"])
    psh = sharding.logical_shardings(boxed, mesh, rules)
    bsh = sharding.batch_sharding(mesh, rules, 4)
    assert bsh.spec == P(("data", "fsdp"), None, None, None)
    out = jax.jit(lambda p, i, t: model.apply({"params": p}, i, t, 144))(
        jax.device_put(params, psh), jax.device_put(images, bsh),
        jax.device_put(tokens, sharding.batch_sharding(mesh, rules, 2)))
  np.testing.assert_allclose(np.asarray(out), np.asarray(expected), atol=2e-4, rtol=2e-4)


def test_describe_lists_every_parameter(mesh):
  model = demo_model()
  rules = sharding.rules_from_config(sharding.FSDP_TP_RULES)
  with sharding.mesh_rules(mesh, rules):
    boxed = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((8, 32, 32, 3)),
                                              jnp.zeros((8, 24), jnp.int32), 64)["params"])
  text = sharding.describe(sharding.logical_shardings(boxed, mesh, rules))
  assert len(text.splitlines()) == len(jax.tree.leaves(nn.unbox(boxed)))
  assert "['llm']['embedding']: P('tensor', 'fsdp')" in text


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree
