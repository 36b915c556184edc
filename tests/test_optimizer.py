"""The optimizer: module groups and their labels, the weight-decay mask, and AdamW
updates per group (frozen, scaled by the multiplier) against a NumPy reference."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.tiny import tiny_spec
from tokenflex_jax import model_config, specs
from tokenflex_jax.models.patch_labeler import PatchLabeler
from tokenflex_jax.training import optimizer as optimizer_lib

OPT = dict(learning_rate=0.1, warmup_steps=2, end_lr_fraction=0.1, b1=0.9, b2=0.98,
           weight_decay=0.05, clip_norm=1.0, mu_dtype="float32")


def _opt_config(**overrides):
  return specs.OptimizerSpec(**{**OPT, **overrides})


def _tree():
  """A parameter tree with the kinds of leaves the models have."""
  rng = np.random.default_rng(0)
  leaf = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
  return {
      "vit": {"patch_embed": {"kernel": leaf(2, 2, 3, 4), "bias": leaf(4)},
              "pos_embedding": leaf(1, 9, 4), "ln": {"scale": leaf(4), "bias": leaf(4)}},
      "projector": {"fc": {"kernel": leaf(4, 6), "bias": leaf(6)}},
      # Stacked per-layer weights [depth, ...]: a norm scale is 2-D, a q bias 3-D.
      "llm": {"embedding": leaf(10, 6),
              "layers": {"q": {"kernel": leaf(2, 6, 2, 3), "bias": leaf(2, 2, 3)},
                         "norm": {"scale": leaf(2, 6)}}},
  }


def _paths(tree):
  return {jax.tree_util.keystr(p): v for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_group_labels_name_each_leafs_top_level_module():
  """Every leaf is labelled with its top-level module, or "frozen" at multiplier 0."""
  params = _tree()
  labels = optimizer_lib.group_labels(params, {"vit": 0.0, "projector": 1.0, "llm": 0.5})
  assert jax.tree.structure(labels) == jax.tree.structure(params)
  got = _paths(labels)
  assert len(got) == len(jax.tree.leaves(params))
  for path, label in got.items():
    module = path.split("'")[1]
    assert label == ("frozen" if module == "vit" else module), path


def test_group_labels_reject_unknown_and_missing_modules():
  """A multiplier for a module the model lacks, or a module without one, is an error
  naming it."""
  with pytest.raises(ValueError, match=r"lr_multipliers names \['vision'\]"):
    optimizer_lib.group_labels(_tree(), {"vision": 1.0, "vit": 1.0, "projector": 1.0,
                                         "llm": 1.0})
  with pytest.raises(ValueError, match=r"no entry for modules \['llm', 'projector'\]"):
    optimizer_lib.group_labels(_tree(), {"vit": 1.0})


def test_decay_mask_on_kernels_only():
  """Decay on >=2-D kernels; not on biases, norm scales, `embedding`, `pos_embedding`."""
  mask = _paths(optimizer_lib.decay_mask(_tree()))
  decayed = {p for p, m in mask.items() if m}
  assert decayed == {"['vit']['patch_embed']['kernel']", "['projector']['fc']['kernel']",
                     "['llm']['layers']['q']['kernel']"}


def _patch_labeler_params():
  config = tiny_spec(stage=0)
  model = PatchLabeler(model_config.vit_config(config), num_colors=5, num_objects=4)
  size = config.data.image_size
  return jax.eval_shape(lambda r: nn.unbox(model.init(r, jnp.zeros((1, size, size, 3)))["params"]),
                        jax.random.key(0))


def test_decay_mask_on_the_vit():
  """On the real ViT: every kernel decays; norm scales, pos_embedding and the 1-D
  biases do not."""
  mask = _paths(optimizer_lib.decay_mask(_patch_labeler_params()))
  kernels = [p for p in mask if p.endswith("['kernel']")]
  assert kernels and all(mask[p] for p in kernels)
  assert not mask["['vit']['pos_embedding']"]
  params = _paths(_patch_labeler_params())
  for p in mask:
    if p.endswith("['scale']") or (p.endswith("['bias']") and params[p].ndim == 1):
      assert not mask[p], p


def test_decay_mask_excludes_multi_head_biases():
  """No bias is decayed, whatever its rank (the q/k/v biases are [heads, head_dim])."""
  mask = _paths(optimizer_lib.decay_mask(_patch_labeler_params()))
  decayed_biases = [p for p, m in mask.items() if m and p.endswith("['bias']")]
  assert decayed_biases == []


def _flat(tree):
  return {p: np.asarray(v, np.float64) for p, v in _paths(tree).items()}


def _numpy_adamw(params, grads_per_step, multipliers, cfg, total_steps):
  """AdamW by its definition: global-norm clipping, bias-corrected moments, decoupled
  decay on >= 2-D leaves that are not biases, scales or embeddings, lr(t) * multiplier; frozen groups untouched."""
  schedule = optimizer_lib.learning_rate_schedule(cfg.learning_rate, cfg.warmup_steps,
                                                  total_steps, cfg.end_lr_fraction)
  p = _flat(params)
  m = {k: np.zeros_like(v) for k, v in p.items()}
  v2 = {k: np.zeros_like(v) for k, v in p.items()}
  for t, grads in enumerate(grads_per_step):
    g = _flat(grads)
    norm = np.sqrt(sum(np.sum(x * x) for x in g.values()))
    g = {k: x * min(1.0, cfg.clip_norm / norm) for k, x in g.items()}
    lr = float(schedule(t))
    for k in p:
      mult = multipliers[k.split("'")[1]]
      if mult == 0:
        continue
      m[k] = cfg.b1 * m[k] + (1 - cfg.b1) * g[k]
      v2[k] = cfg.b2 * v2[k] + (1 - cfg.b2) * g[k] ** 2
      mhat, vhat = m[k] / (1 - cfg.b1 ** (t + 1)), v2[k] / (1 - cfg.b2 ** (t + 1))
      u = mhat / (np.sqrt(vhat) + 1e-8)
      if p[k].ndim >= 2 and "embedding" not in k and not k.endswith(("['bias']", "['scale']")):
        u = u + cfg.weight_decay * p[k]
      p[k] = p[k] - lr * mult * u
  return p


def _apply(tx, params, grads, n):
  """``n`` updates with ``grads`` (one tree, or a list of one per step)."""
  grads = grads if isinstance(grads, list) else [grads] * n
  state = tx.init(params)
  for g in grads[:n]:
    updates, state = tx.update(g, state, params)
    params = optax.apply_updates(params, updates)
  return params, state


def test_adamw_per_group_matches_numpy():
  """Four steps of the built optimizer equal AdamW computed by hand, per group (vit
  frozen, projector at 1.0, llm at 0.5), with gradients of changing scale so that the
  global-norm clipping (clip_norm 1) matters."""
  params = _tree()
  base = jax.tree.map(lambda x: 0.3 * jnp.sin(3 * x) + 0.1, params)
  grads = [jax.tree.map(lambda x, s=s: s * x, base) for s in (20.0, 0.05, 3.0, 0.2)]
  mults = {"vit": 0.0, "projector": 1.0, "llm": 0.5}
  cfg = _opt_config()
  tx, _ = optimizer_lib.make_optimizer(cfg, mults, 10, params)
  got, _ = _apply(tx, params, grads, 4)
  want = _numpy_adamw(params, grads, mults, cfg, 10)
  for path, value in _flat(got).items():
    np.testing.assert_allclose(value, want[path], rtol=2e-5, atol=1e-6, err_msg=path)


def test_bfloat16_first_moment_halves_it_and_keeps_the_update_close():
  """mu_dtype=bfloat16: Adam's first moments are bfloat16, the second moments and the
  parameters float32, and four steps land within bfloat16 rounding of float32's."""
  params = _tree()
  grads = [jax.tree.map(lambda x, s=s: s * jnp.cos(x), params) for s in (1.0, 0.5, 2.0, 1.0)]
  mults = {"vit": 1.0, "projector": 1.0, "llm": 1.0}
  full, _ = _apply(optimizer_lib.make_optimizer(_opt_config(), mults, 10, params)[0],
                   params, grads, 4)
  tx, _ = optimizer_lib.make_optimizer(_opt_config(mu_dtype="bfloat16"), mults, 10, params)
  half, state = _apply(tx, params, grads, 4)
  adam = [s for s in jax.tree.leaves(state, is_leaf=lambda x: hasattr(x, "mu"))
          if hasattr(s, "mu")]
  assert adam and all(x.dtype == jnp.bfloat16 for s in adam for x in jax.tree.leaves(s.mu))
  assert all(x.dtype == jnp.float32 for s in adam for x in jax.tree.leaves(s.nu))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(half))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-3), half, full)
  with pytest.raises(ValueError, match="config.optimizer.mu_dtype must be one of"):
    optimizer_lib.make_optimizer(_opt_config(mu_dtype="float16"), mults, 10, params)


def test_frozen_group_stays_put_and_keeps_no_moments():
  """With nonzero gradients everywhere, a frozen group's params do not change and the
  optimizer state holds moments only for the trained groups."""
  params = _tree()
  grads = jax.tree.map(jnp.ones_like, params)
  mults = {"vit": 0.0, "projector": 1.0, "llm": 1.0}
  tx, _ = optimizer_lib.make_optimizer(_opt_config(), mults, 10, params)
  new, state = _apply(tx, params, grads, 4)
  for a, b in zip(jax.tree.leaves(params["vit"]), jax.tree.leaves(new["vit"])):
    np.testing.assert_array_equal(a, b)
  for name in ("projector", "llm"):
    assert any(not np.allclose(a, b) for a, b in
               zip(jax.tree.leaves(params[name]), jax.tree.leaves(new[name]))), name
  size = lambda tree: sum(x.size for x in jax.tree.leaves(tree) if np.ndim(x) > 0)
  assert size(state) == 2 * (size(params["projector"]) + size(params["llm"]))


def test_half_multiplier_moves_half_as_far():
  """Identical params and grads in two groups: the group at 0.5 moves exactly half as
  far as the one at 1.0 on the first step with a nonzero learning rate (the warmup
  starts at 0, so the very first update is zero)."""
  rng = np.random.default_rng(1)
  w, g = rng.normal(size=(4, 5)).astype(np.float32), rng.normal(size=(4, 5)).astype(np.float32)
  params = {"a": {"kernel": jnp.asarray(w)}, "b": {"kernel": jnp.asarray(w)}}
  grads = {"a": {"kernel": jnp.asarray(g)}, "b": {"kernel": jnp.asarray(g)}}
  tx, schedule = optimizer_lib.make_optimizer(_opt_config(), {"a": 1.0, "b": 0.5}, 10, params)
  after_one, _ = _apply(tx, params, grads, 1)
  np.testing.assert_array_equal(after_one["a"]["kernel"], w)  # lr(0) = 0
  after_two, _ = _apply(tx, params, grads, 2)
  da = np.asarray(after_two["a"]["kernel"]) - w
  db = np.asarray(after_two["b"]["kernel"]) - w
  assert np.all(np.abs(da) > 0)
  np.testing.assert_allclose(db, 0.5 * da, rtol=1e-5, atol=1e-7)
  # Adam's step with identical moments: about lr * sign(g), plus the decoupled decay.
  np.testing.assert_allclose(da, -float(schedule(1)) * (np.sign(g) + OPT["weight_decay"] * w),
                             rtol=1e-3, atol=1e-6)


def test_weight_decay_only_where_the_mask_says():
  """With zero gradients only weight decay moves params: kernels shrink by
  (1 - lr * multiplier * weight_decay), biases, scales and embeddings stay."""
  params = _tree()
  grads = jax.tree.map(jnp.zeros_like, params)
  mults = {"vit": 1.0, "projector": 0.5, "llm": 1.0}
  tx, schedule = optimizer_lib.make_optimizer(_opt_config(), mults, 10, params)
  new, _ = _apply(tx, params, grads, 2)
  mask = _paths(optimizer_lib.decay_mask(params))
  before, after = _flat(params), _flat(new)
  lr = float(schedule(1))
  for path, decays in mask.items():
    mult = mults[path.split("'")[1]]
    factor = 1 - lr * mult * OPT["weight_decay"] if decays else 1.0
    np.testing.assert_allclose(after[path], before[path] * factor, rtol=1e-6, err_msg=path)
  assert sum(mask.values()) == 3


def _abstract(*modules):
  return {m: {"w": jax.ShapeDtypeStruct((3, 4), jnp.float32),
              "b": jax.ShapeDtypeStruct((4,), jnp.float32)} for m in modules}


@pytest.mark.parametrize("stage,modules,frozen", [
    (0, ("vit", "color_head", "object_head"), ()),
    (1, ("vit", "projector", "llm"), ("vit",)),
    (2, ("vit", "projector", "llm"), ()),
])
def test_from_config_reports_the_frozen_groups(stage, modules, frozen):
  """`from_config` on each demo stage: stage 1 freezes the ViT; the schedule peaks at
  the configured rate after the warmup and ends at end_lr_fraction of it."""
  config = tiny_spec(stage=stage)
  opt = optimizer_lib.from_config(config, _abstract(*modules))
  assert opt.frozen == frozen
  o = config.optimizer
  assert float(opt.schedule(0)) == 0.0
  assert float(opt.schedule(o.warmup_steps)) == pytest.approx(o.learning_rate)
  assert float(opt.schedule(config.total_steps)) == pytest.approx(
      o.learning_rate * o.end_lr_fraction)


def test_from_config_rejects_multipliers_of_another_model():
  """Stage 0's multipliers (vit, color_head, object_head) on the VLM's modules fail
  with the config field named."""
  with pytest.raises(ValueError, match="config.lr_multipliers"):
    optimizer_lib.from_config(tiny_spec(stage=0), _abstract("vit", "projector", "llm"))


def test_a_run_shorter_than_its_warmup_is_warned_with_the_rate_it_ends_at():
  """Stage 1 of the paper config (lr 1e-3, warmup 200) for 6 steps ends at 2.5e-5."""
  from configs import paper  # pylint: disable=import-outside-toplevel
  from tokenflex_jax.training.optimizer import warmup_warning  # pylint: disable=import-outside-toplevel
  opt = paper.get_config("stage=1").optimizer
  assert warmup_warning(opt, 200) is None and warmup_warning(opt, 2000) is None
  assert warmup_warning(opt, 6) == (
      "config.total_steps=6 ends inside the warmup (config.optimizer.warmup_steps=200): the "
      "learning rate peaks at 2.5e-05, not 0.001; lower the warmup to train at the peak")
