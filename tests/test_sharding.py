"""Logical axis names -> shardings on meshes of the 8 host devices (mostly (2, 2, 2)); the
optimizer state's shardings; the reports of dropped axes and unsharded large parameters."""

import logging

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from configs import demo, paper
from tests.tiny import tiny_spec
from tokenflex_jax import model_config, sharding, specs
from tokenflex_jax.app import config_schema
from tokenflex_jax.models.vlm import VLM, VLMConfig
from tokenflex_jax.training.optimizer import make_optimizer


def demo_model() -> VLM:
  c = config_schema.to_spec(demo.get_config())
  return VLM(VLMConfig(c.model.vit, c.model.projector, c.model.llm, image_token_id=4))


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
  assert spec("llm", "layers", "mlp", "gate", "kernel") == P(None, "fsdp", "tensor")
  assert spec("llm", "layers", "mlp", "down", "kernel") == P(None, "tensor", "fsdp")
  assert spec("llm", "layers", "attn", "q", "kernel") == P(None, "fsdp", "tensor", None)
  # One KV head cannot be split over tensor=2: that dim stays replicated.
  assert spec("llm", "layers", "attn", "k", "kernel") == P(None, "fsdp", None, None)
  assert spec("projector", "mlp", "up", "kernel") == P("fsdp", "tensor")
  assert spec("vit", "blocks", "fc1", "kernel") == P(None, "fsdp", "tensor")
  assert spec("vit", "pos_embedding") == P(None, None, "fsdp")
  assert spec("llm", "layers", "attn_norm", "scale") == P(None, None)

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
  # Jitted: one program each rather than op by op (the suite's time).
  params = nn.unbox(jax.jit(model.init, static_argnums=3)(jax.random.key(0), images, tokens,
                                                          144)["params"])
  expected = jax.jit(lambda p: model.apply({"params": p}, images, tokens, 144))(params)
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


def boxed_param(shape: tuple[int, ...], names: tuple[str, ...]) -> nn.LogicallyPartitioned:
  """An abstract float32 parameter of ``shape`` with logical axis ``names``."""
  return nn.LogicallyPartitioned(jax.ShapeDtypeStruct(shape, jnp.float32), names)


# A parameter the FSDP rules split along "embed": 12 rows, which 8 does not divide.
BIG = (12, 2**17)       # 1.5 * 2**20 elements: above MIN_SHARDED_SIZE
SMALL = (12, 16)


def test_dropped_mesh_axis_is_logged_with_the_parameter(caplog):
  mesh = sharding.make_mesh((1, 8, 1))
  rules = sharding.rules_from_config(sharding.FSDP_RULES)
  tree = {"dec": {"w_odd": boxed_param(SMALL, ("embed", "mlp")),
                  "w_even": boxed_param((16, 12), ("embed", "mlp")),
                  "w_big": boxed_param(BIG, ("embed", "vocab"))}}
  caplog.set_level(logging.INFO, logger="absl")
  shardings = sharding.logical_shardings(tree, mesh, rules)
  assert shardings["dec"]["w_odd"].spec == P(None, None)       # fsdp=8 dropped from dim 0
  assert shardings["dec"]["w_even"].spec == P("fsdp", None)
  records = {r.getMessage(): r.levelno for r in caplog.records if "sharding:" in r.getMessage()}
  assert len(records) == 2, records                            # once each, not for w_even
  odd = next(m for m in records if "['dec']['w_odd'] (12, 16)" in m)
  assert "'fsdp' (size 8)" in odd and "dim 0 (size 12)" in odd
  assert records[odd] == logging.INFO                          # small: replicas cost little
  big = next(m for m in records if "['dec']['w_big'] (12, 131072)" in m)
  assert records[big] == logging.WARNING

  spec, dropped = sharding.fit_spec(P(("data", "fsdp"), "fsdp"), (4, 24),
                                    sharding.make_mesh((2, 4, 1)))
  assert spec == P("data", "fsdp")
  assert dropped == (sharding.DroppedAxis(0, 4, "fsdp", 4, ("data",)),)


def test_large_parameter_left_replicated_raises_naming_it():
  mesh = sharding.make_mesh((1, 8, 1))
  rules = sharding.rules_from_config(sharding.FSDP_RULES)
  tree = {"llm": {"big": boxed_param(BIG, ("embed", "vocab")),
                  "small": boxed_param(SMALL, ("embed", "mlp")),
                  "fine": boxed_param((16, 2**17), ("embed", "vocab"))}}
  shardings = sharding.logical_shardings(tree, mesh, rules)
  with pytest.raises(ValueError) as err:
    sharding.assert_params_sufficiently_sharded(tree, shardings, mesh, rules)
  msg = str(err.value)
  assert "\n" not in msg
  assert "1 parameter(s)" in msg and "['llm']['big'] (12, 131072)" in msg
  assert "'embed'" in msg and "'fsdp' (size 8)" in msg and "config.mesh.shape" in msg
  assert "small" not in msg and "fine" not in msg
  # With a smaller bound the small parameter is large enough to count.
  with pytest.raises(ValueError, match=r"2 parameter\(s\).*\['llm'\]\['small'\]"):
    sharding.assert_params_sufficiently_sharded(tree, shardings, mesh, rules, min_size=100)


def test_large_parameter_passes_where_it_is_sharded_or_need_not_be():
  tree = {"llm": {"big": boxed_param(BIG, ("embed", "vocab"))}}
  for mesh_shape, rules in [((2, 2, 2), sharding.FSDP_RULES),          # fsdp=2 divides 12
                            ((1, 4, 2), sharding.FSDP_TP_RULES),       # fsdp=4 divides 12
                            ((1, 8, 1), sharding.DATA_PARALLEL_RULES),  # rules ask for none
                            ((8, 1, 1), sharding.FSDP_RULES)]:         # fsdp axis of size 1
    mesh = sharding.make_mesh(mesh_shape)
    rules = sharding.rules_from_config(rules)
    shardings = sharding.logical_shardings(tree, mesh, rules)
    sharding.assert_params_sufficiently_sharded(tree, shardings, mesh, rules)
  assert shardings["llm"]["big"].is_fully_replicated


@pytest.mark.parametrize("preset", sorted(demo.RULES))
def test_demo_and_paper_configs_are_sufficiently_sharded(preset):
  rules = sharding.rules_from_config(demo.RULES[preset])
  demo_spec = config_schema.to_spec(demo.get_config())
  meshes = [((-1, 1, 1), demo_spec), ((2, 2, 2), demo_spec), ((1, 8, 1), demo_spec)]
  if preset == "fsdp":
    meshes.append(((1, 8, 1), config_schema.to_spec(paper.get_config())))
  for mesh_shape, config in meshes:
    mesh = sharding.make_mesh(mesh_shape)
    boxed = _abstract_params(config, mesh, rules)
    sharding.assert_params_sufficiently_sharded(
        boxed, sharding.logical_shardings(boxed, mesh, rules), mesh, rules)
  if preset == "fsdp":  # The paper's own mesh (1, -1, 1) on 64 devices, abstractly.
    mesh = jax.sharding.AbstractMesh((1, 64, 1), sharding.MESH_AXES)
    shardings = sharding.logical_shardings(boxed, mesh, rules)
    sharding.assert_params_sufficiently_sharded(boxed, shardings, mesh, rules)
    assert shardings["llm"]["embedding"].spec == P(None, "fsdp")


def _abstract_params(config: specs.RunSpec, mesh: jax.sharding.Mesh,
                     rules: sharding.Rules) -> dict:
  """The config's boxed abstract parameters (shapes only), built under ``mesh``."""
  model = model_config.vlm_config(config, model_config.FixedTokenIds(256, image_id=4))
  size, text = config.data.image_size, config.data.max_text_length
  with sharding.mesh_rules(mesh, rules):
    return jax.eval_shape(lambda: VLM(model).init(
        jax.random.key(0), jnp.zeros((8, size, size, 3)), jnp.zeros((8, text), jnp.int32),
        64)["params"])


def test_opt_state_shardings_follow_the_parameters_with_a_frozen_group():
  config = tiny_spec()
  mesh = sharding.make_mesh((2, 2, 2))
  rules = sharding.rules_from_config(sharding.FSDP_TP_RULES)
  boxed = _abstract_params(config, mesh, rules)
  params = sharding.strip_boxes(boxed)
  param_sh = sharding.logical_shardings(boxed, mesh, rules)
  mults = {"vit": 0.0, "projector": 1.0, "llm": 0.5}
  tx, _ = make_optimizer(config.optimizer, mults, 10, params)
  opt_sh = sharding.opt_state_shardings(tx, boxed, param_sh, mesh)

  flat_params = dict(jax.tree_util.tree_flatten_with_path(param_sh)[0])
  moments = {"mu": set(), "nu": set()}
  counts = 0
  for path, sh in jax.tree_util.tree_flatten_with_path(opt_sh)[0]:
    names = [getattr(k, "name", None) for k in path]
    moment = next((m for m in moments if m in names), None)
    if moment is not None:
      param_path = path[names.index(moment) + 1:]
      assert sh == flat_params[param_path], (jax.tree_util.keystr(path), sh)
      moments[moment].add(param_path)
    else:
      assert names[-1] == "count" and sh.spec == P(), jax.tree_util.keystr(path)
      counts += 1
  trainable = {p for p in flat_params if p[0].key != "vit"}
  assert moments["mu"] == moments["nu"] == trainable     # no moments for the frozen ViT
  assert counts == 4                                     # adam + schedule, per trained group
  assert any(not flat_params[p].is_fully_replicated for p in trainable)

  # Real states land with these shardings.
  zeros = jax.jit(lambda: jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), params),
                  out_shardings=param_sh)()
  state = jax.jit(tx.init, out_shardings=opt_sh)(zeros)
  assert jax.tree.all(jax.tree.map(lambda x, sh: x.sharding.is_equivalent_to(sh, x.ndim),
                                   state, opt_sh))
  mu = state[1].inner_states["llm"].inner_state[0].mu
  assert mu["llm"]["embedding"].sharding.spec == param_sh["llm"]["embedding"].spec
  assert isinstance(mu["vit"]["patch_embed"]["kernel"], optax.MaskedNode)


def test_opt_state_shardings_refuse_a_state_of_other_shapes():
  mesh = sharding.make_mesh((1, 8, 1))
  rules = sharding.rules_from_config(sharding.FSDP_RULES)
  tree = {"w": boxed_param((256, 512), ("embed", "mlp"))}
  with pytest.raises(ValueError, match=r"\['w'\] has shape"):
    sharding.opt_state_shardings(optax.adafactor(1e-3), tree,
                                 sharding.logical_shardings(tree, mesh, rules), mesh)


def test_mesh_from_config():
  config = tiny_spec(mesh__shape=(1, -1, 2), sharding__rules=(("embed", ("fsdp",)),))
  mesh, rules = sharding.mesh_from_config(config)
  assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
  assert rules == (("embed", ("fsdp",)),)


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree
