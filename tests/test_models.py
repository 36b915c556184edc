"""The ViT, the decoder (cache vs. no cache) and the VLM's placement of visual tokens."""

import dataclasses
import functools
import re
from unittest import mock

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflex_jax.models import layers
from tokenflex_jax.models.llm import LLM, LLMConfig, init_cache
from tokenflex_jax.models.projector import ProjectorConfig
from tokenflex_jax.models.vit import PatchEmbed, ViT, ViTConfig, interpolate_posemb
from tokenflex_jax.models.vlm import VLM, VLMConfig, merge, merge_index, merged_positions

IMAGE_ID, PAD = 4, 0


def small_vlm(visual_position_span: int = 0, **llm_overrides) -> VLM:
  llm = dataclasses.replace(LLMConfig(vocab_size=32, width=32, depth=2, num_heads=4,
                                      num_kv_heads=2, head_dim=8, mlp_dim=64), **llm_overrides)
  vit = ViTConfig(image_size=16, patch_size=2, width=16, depth=1, mlp_dim=32, num_heads=2)
  return VLM(VLMConfig(vit, ProjectorConfig(), llm, image_token_id=IMAGE_ID, pad_token_id=PAD,
                       visual_position_span=visual_position_span))


# The models are run jitted: one program each, rather than op by op (the suite's time).
def init(model, *args, seed=0):
  """``model.init`` jitted; a VLM's visual-token count (its 4th argument) is static."""
  static = (3,) if isinstance(model, VLM) else ()
  return jax.jit(model.init, static_argnums=static)(jax.random.key(seed), *args)


def apply(model, params, *args, method=None):
  """``model.apply`` jitted; a VLM's call, `VLM.prefill` and `VLM.text_hidden` take the
  count as their 3rd argument (static)."""
  fn = functools.partial(model.apply, method=method) if method else model.apply
  static = (3,) if isinstance(model, VLM) and method is not VLM.decode_step else ()
  return jax.jit(fn, static_argnums=static)(params, *args)


def test_vit_shapes_and_posemb_interpolation():
  vit = ViT(ViTConfig(image_size=16, patch_size=2, width=16, depth=1, mlp_dim=32, num_heads=2))
  params = init(vit, jnp.zeros((1, 16, 16, 3)))
  assert apply(vit, params, jnp.zeros((2, 16, 16, 3))).shape == (2, 64, 16)
  # Another resolution works through an interpolated position embedding.
  assert apply(vit, params, jnp.zeros((2, 24, 24, 3))).shape == (2, 144, 16)
  posemb = jnp.arange(16.0).reshape(1, 16, 1)
  np.testing.assert_allclose(interpolate_posemb(posemb, 4), posemb)
  assert interpolate_posemb(posemb, 8).shape == (1, 64, 1)


def test_the_patch_embedding_is_the_valid_strided_convolution():
  # 23 px / 5 -> a 4 x 4 grid, the 3 px remainder dropped as a VALID convolution drops it;
  # the same parameters (names, shapes, initial values), outputs and gradients.
  conv = nn.Conv(8, (5, 5), strides=(5, 5), padding="VALID",
                 kernel_init=layers.default_kernel_init)
  embed = PatchEmbed(8, 5, jnp.float32)
  images = jax.random.uniform(jax.random.key(1), (2, 23, 23, 3), minval=-1, maxval=1)
  params = nn.meta.unbox(embed.init(jax.random.key(0), images))
  jax.tree.map(np.testing.assert_array_equal, params, conv.init(jax.random.key(0), images))
  params = jax.tree.map(lambda x: x + jax.random.normal(jax.random.key(2), x.shape), params)
  weights = jax.random.normal(jax.random.key(3), (2, 4, 4, 8))
  loss = lambda model: lambda p, x: jnp.sum(model.apply(p, x) * weights)
  (value, grads), (value_c, grads_c) = (
      jax.value_and_grad(loss(m), argnums=(0, 1))(params, images) for m in (embed, conv))
  np.testing.assert_allclose(value, value_c, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads, grads_c)


def test_merge_places_visual_tokens_at_the_placeholder():
  text = jnp.arange(2 * 5).reshape(2, 5, 1).astype(jnp.float32) + 100
  visual = -jnp.arange(2 * 3).reshape(2, 3, 1).astype(jnp.float32) - 1
  is_image = jnp.arange(5)[None, :] == jnp.array([[1], [3]])
  index = merge_index(is_image, num_tokens=3)
  out = np.asarray(merge(visual, text, index))[..., 0]
  np.testing.assert_array_equal(out[0], [100, -1, -2, -3, 102, 103, 104])
  np.testing.assert_array_equal(out[1], [105, 106, 107, -4, -5, -6, 109])


@pytest.mark.parametrize("overrides,image_first", [
    ({}, True), ({}, False), ({"qkv_bias": True, "tie_embeddings": False}, True),
    ({"num_kv_heads": 4}, True), ({"num_kv_heads": 1}, False),
    ({"visual_position_span": 64}, False), ({"visual_position_span": 10}, True)])
def test_cached_generation_matches_teacher_forcing(overrides, image_first):
  model = small_vlm(**overrides)
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  # Right-padded training rows; row 1 has a shorter prompt.
  tokens = jnp.array([[2, 5, IMAGE_ID, 7, 8, 9, 6, 10, 11, 3, 0, 0],
                      [2, 5, IMAGE_ID, 7, 8, 6, 12, 13, 3, 0, 0, 0]])
  prompts = jnp.array([[2, 5, IMAGE_ID, 7, 8, 9, 6], [0, 2, 5, IMAGE_ID, 7, 8, 6]])
  if not image_first:  # The placeholder after the question, as configs/demo.py has it.
    tokens = jnp.array([[2, 5, 7, 8, 9, IMAGE_ID, 6, 10, 11, 3, 0, 0],
                        [2, 5, 7, 8, IMAGE_ID, 6, 12, 13, 3, 0, 0, 0]])
    prompts = jnp.array([[2, 5, 7, 8, 9, IMAGE_ID, 6], [0, 2, 5, 7, 8, IMAGE_ID, 6]])
  params = init(model, images, tokens, 16)
  n = 16
  teacher = apply(model, params, images, tokens, n)
  assert teacher.shape == (2, 12, 32)
  length = prompts.shape[1] - 1 + n
  cache = init_cache(model.config.llm, 2, length + 3)
  logits, cache, key_valid, pos = apply(model, params, images, prompts, n, cache,
                                        method=VLM.prefill)
  np.testing.assert_allclose(logits[0], teacher[0, 7], atol=2e-5)
  np.testing.assert_allclose(logits[1], teacher[1, 6], atol=2e-5)
  step_tokens = [jnp.array([10, 12]), jnp.array([11, 13])]
  for i, tok in enumerate(step_tokens):
    logits, cache = apply(model, params, tok, pos + i, cache, key_valid,
                          jnp.array(length + i), method=VLM.decode_step)
    np.testing.assert_allclose(logits[0], teacher[0, 8 + i], atol=2e-5)
    np.testing.assert_allclose(logits[1], teacher[1, 7 + i], atol=2e-5)


def test_visual_position_span_makes_text_positions_count_independent():
  tokens = jnp.array([[2, 5, 7, IMAGE_ID, 6, 10, 3, 0]])
  text_positions = {}
  for n in (4, 16, 36, 64):
    index = merge_index(tokens == IMAGE_ID, n)
    text_valid = tokens != PAD
    valid = index.is_visual | jnp.take_along_axis(text_valid, index.text_index, axis=1)
    positions, end = merged_positions(valid, index.is_visual, n, span=64)
    positions = np.asarray(positions[0])
    visual = positions[3:3 + n]
    np.testing.assert_allclose(visual, 3 + np.arange(n) * 64 / n)  # spread over [3, 67)
    text_positions[n] = positions[3 + n:3 + n + 3].tolist()  # <assistant>, 10, <eos>
    assert float(end[0]) == 3 + 64 + 3
    plain, plain_end = merged_positions(valid, index.is_visual, n, span=0)
    np.testing.assert_array_equal(np.asarray(plain[0])[:3 + n + 3], np.arange(3 + n + 3))
    assert float(plain_end[0]) == 3 + n + 3
  assert all(p == [67, 68, 69] for p in text_positions.values()), text_positions


def test_grid_layout_puts_each_place_of_the_image_at_one_position_at_every_count():
  tokens = jnp.array([[2, 5, 7, IMAGE_ID, 6, 10, 3, 0]])
  for n in (4, 16, 64, 256):
    index = merge_index(tokens == IMAGE_ID, n)
    valid = index.is_visual | jnp.take_along_axis(tokens != PAD, index.text_index, axis=1)
    positions, end = merged_positions(valid, index.is_visual, n, span=256, layout="grid")
    positions = np.asarray(positions[0])
    side = int(np.sqrt(n))
    visual = positions[3:3 + n].reshape(side, side)
    assert np.all(np.diff(visual.reshape(-1)) > 0)  # still row-major with span >= n
    # The image place (y, x) in [0, 1)^2 at 3 + 256 y + 16 x, whatever the count.
    centres = (np.arange(side) + 0.5) / side
    np.testing.assert_allclose(visual, 3 + 256 * centres[:, None] + 16 * centres[None, :],
                               rtol=1e-6)
    assert positions[3 + n:3 + n + 3].tolist() == [259, 260, 261] and float(end[0]) == 262
  with pytest.raises(ValueError, match="visual_position_layout"):
    merged_positions(valid, index.is_visual, 256, span=256, layout="spiral")


def test_visual_tokens_change_the_answer_logits_and_count_matters():
  model = small_vlm()
  tokens = jnp.array([[2, IMAGE_ID, 7, 6, 10, 3]])
  a = jax.random.uniform(jax.random.key(1), (1, 16, 16, 3))
  params = init(model, a, tokens, 16)
  b = -a
  la = apply(model, params, a, tokens, 16)[0, 4]
  lb = apply(model, params, b, tokens, 16)[0, 4]
  l4 = apply(model, params, a, tokens, 4)[0, 4]
  assert float(jnp.abs(la - lb).max()) > 1e-4
  assert float(jnp.abs(la - l4).max()) > 1e-4


def test_llm_plain_call_is_causal():
  llm = LLM(LLMConfig(vocab_size=32, width=32, depth=1, num_heads=2, num_kv_heads=1,
                      head_dim=16, mlp_dim=64))
  tokens = jnp.array([[1, 2, 3, 4, 5]])
  params = init(llm, tokens)
  out = apply(llm, params, tokens)
  changed = apply(llm, params, tokens.at[0, 4].set(9))
  np.testing.assert_allclose(out[0, :4], changed[0, :4], atol=1e-6)
  assert float(jnp.abs(out[0, 4] - changed[0, 4]).max()) > 1e-4


def _images_tokens():
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  tokens = jnp.array([[2, 5, IMAGE_ID, 7, 8, 6, 10, 3], [2, IMAGE_ID, 7, 6, 12, 13, 3, 0]])
  return images, tokens


def test_layers_are_stacked_with_a_layers_axis():
  model = small_vlm()
  images, tokens = _images_tokens()
  boxed = init(model, images, tokens, 16)["params"]
  q = boxed["llm"]["layers"]["attn"]["q"]["kernel"]
  assert q.value.shape == (2, 32, 4, 8) and q.names == ("layers", "embed", "heads", "head_dim")
  fc1 = boxed["vit"]["blocks"]["fc1"]["kernel"]
  assert fc1.value.shape == (1, 16, 32) and fc1.names == ("layers", "embed", "mlp")
  # Each layer is initialised on its own: the two layers' weights differ.
  assert float(jnp.abs(q.value[0] - q.value[1]).max()) > 1e-3


def test_a_stack_runs_its_layers_in_order_on_their_own_slices():
  from tokenflex_jax.models.llm import DecoderLayer
  model = small_vlm()
  cfg = model.config.llm
  llm = LLM(cfg)
  tokens = jnp.array([[3, 5, 7, 9, 11, 2]])
  params = init(llm, tokens)["params"]
  x = apply(llm, {"params": params}, tokens, method=LLM.embed)
  positions = jnp.arange(6)[None]
  valid = jnp.ones((1, 6), bool)
  layer_apply = jax.jit(lambda p, x: DecoderLayer(cfg).apply(p, x, positions, valid, None, 0))
  for i in range(cfg.depth):  # a Python loop over slices of the stacked tree
    layer = jax.tree.map(lambda a, i=i: a[i], params["layers"])
    x, _ = layer_apply({"params": layer}, x)
  final = apply(llm, {"params": params}, x, method=lambda m, h: m.final_norm(h))
  expected = apply(llm, {"params": params}, final, method=LLM.logits)
  np.testing.assert_allclose(apply(llm, {"params": params}, tokens), expected, atol=1e-5)


@pytest.mark.parametrize("depth,scan_layers", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("with_cache", [False, True])
def test_states_at_output_slots_equal_the_whole_stack_at_those_slots(depth, scan_layers,
                                                                     with_cache):
  """`LLM.decode` with ``output_slots`` (the last layer's queries and MLP at those slots
  only) gives the states and the cache the whole stack gives, left padding included."""
  cfg = dataclasses.replace(small_vlm().config.llm, depth=depth)
  llm = LLM(cfg, scan_layers=scan_layers)
  tokens = jnp.array([[0, 0, 3, 5, 7, 9, 11, 2], [3, 5, 7, 9, 11, 2, 4, 6]])
  params = init(llm, tokens)
  x = apply(llm, params, tokens, method=LLM.embed)
  valid = tokens != 0
  positions = jnp.maximum(jnp.cumsum(valid, axis=1) - 1, 0)
  slots = jnp.array([[7, 4], [7, 0]])
  cache = init_cache(cfg, 2, 11) if with_cache else None
  key_valid = jnp.pad(valid, ((0, 0), (0, 3)), constant_values=True) if with_cache else valid

  def decode(m, output_slots):
    return m.decode(x, positions, key_valid, cache, 0, output_slots=output_slots)
  whole, whole_cache = apply(llm, params, None, method=decode)
  part, part_cache = apply(llm, params, slots, method=decode)
  assert part.shape == (2, 2, cfg.width)
  np.testing.assert_allclose(part, jnp.take_along_axis(whole, slots[..., None], axis=1),
                             atol=1e-5)
  if with_cache:
    for name in ("k", "v"):
      np.testing.assert_array_equal(part_cache[name], whole_cache[name])
  # The attention at the slots is causal: a later token does not change slot 4's state.
  changed = x.at[0, 6].add(1.0)
  part2, _ = apply(llm, params, slots, method=lambda m, s: m.decode(
      changed, positions, key_valid, cache, 0, output_slots=s))
  np.testing.assert_allclose(part2[0, 1], part[0, 1], atol=1e-6)
  assert float(jnp.abs(part2[0, 0] - part[0, 0]).max()) > 1e-4


@pytest.mark.parametrize("remat_policy,scan_layers",
                         [("dots", True), ("dots_except_mlp", True), ("full", False)])
def test_performance_flags_keep_the_parameters_and_the_gradients(remat_policy, scan_layers):
  plain = small_vlm()
  flagged = VLM(dataclasses.replace(plain.config, remat_policy=remat_policy,
                                    scan_layers=scan_layers))
  images, tokens = _images_tokens()
  params = init(plain, images, tokens, 16)
  other = init(flagged, images, tokens, 16)
  assert jax.tree.structure(other) == jax.tree.structure(params)
  assert jax.tree.map(jnp.shape, other) == jax.tree.map(jnp.shape, params)
  loss = lambda model: lambda p: jnp.mean(model.apply(p, images, tokens, 16) ** 2)
  value, grads = jax.jit(jax.value_and_grad(loss(plain)))(params)
  value_f, grads_f = jax.jit(jax.value_and_grad(loss(flagged)))(params)
  np.testing.assert_allclose(value_f, value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               grads_f, grads)
  flagged_jaxpr, plain_jaxpr = (str(jax.make_jaxpr(jax.grad(loss(model)))(params))
                                for model in (flagged, plain))
  # A remat policy puts the layers' backward pass in remat regions; unrolling is the
  # scan's unroll (one copy per layer), rolled is one.
  assert ("remat" in flagged_jaxpr) == (remat_policy != "none")
  assert "remat" not in plain_jaxpr
  assert ("unroll=2" if not scan_layers else "unroll=1") in flagged_jaxpr

def test_dots_except_mlp_keeps_the_attention_projections_not_the_mlp_hidden_layer(capsys):
  """What each remat policy keeps for the backward pass of an LLM: the saved residuals
  (stacked over the layers by the scan) and the compiler's temporaries. "dots_except_mlp"
  keeps q, k, v and the attention output, not the SwiGLU's two [B, S, mlp_dim] matmul
  outputs per layer that "dots" keeps; "full" keeps neither."""
  config = LLMConfig(vocab_size=32, width=32, depth=4, num_heads=4, num_kv_heads=2,
                     head_dim=8, mlp_dim=512)
  tokens = jnp.ones((2, 256), jnp.int32)
  temps, saved = {}, {}
  for policy in layers.REMAT_POLICIES:
    llm = LLM(config, remat_policy=policy, attention="reference")
    params = init(llm, tokens)
    loss = lambda p, llm=llm: jnp.mean(llm.apply(p, tokens) ** 2)
    compiled = jax.jit(jax.value_and_grad(loss)).lower(params).compile()
    temps[policy] = compiled.memory_analysis().temp_size_in_bytes
    capsys.readouterr()
    jax.ad_checkpoint.print_saved_residuals(loss, params)
    saved[policy] = capsys.readouterr().out
  # Stacked over the layers, [depth, B, S, ...] or [depth, B * S, ...].
  keeps = lambda policy, last: re.search(rf"f32\[{config.depth},(2,256|512),{last}\]",
                                         saved[policy]) is not None
  queries, hidden = "4,8", "512"
  assert keeps("dots_except_mlp", queries) and not keeps("dots_except_mlp", hidden)
  assert keeps("dots", queries) and keeps("dots", hidden)
  assert not keeps("full", queries) and not keeps("full", hidden)
  hidden_bytes = 2 * tokens.size * config.mlp_dim * 4 * config.depth  # gate and up
  assert temps["none"] > temps["dots"] > temps["dots_except_mlp"], temps
  assert temps["dots"] - temps["dots_except_mlp"] > hidden_bytes / 2, temps


@pytest.mark.parametrize("attention", ["reference", "splash"])
def test_a_padded_patch_sequence_keeps_the_parameters_values_and_gradients(attention):
  # 18 px / 2 -> 81 patches, padded to 96 slots, or to splash's 128 (splash runs
  # interpreted on this CPU).
  config = ViTConfig(image_size=18, patch_size=2, width=16, depth=2, mlp_dim=32, num_heads=2)
  plain, padded = (ViT(config, attention=attention, pad_length=pad) for pad in (False, True))
  images = jax.random.uniform(jax.random.key(1), (2, 18, 18, 3), minval=-1, maxval=1)
  params = init(plain, images)
  assert jax.tree.map(jnp.shape, init(padded, images)) == jax.tree.map(jnp.shape, params)
  slots = 128 if attention == "splash" else 96
  padded_jaxpr = str(jax.make_jaxpr(padded.apply)(params, images))
  assert f"f32[2,{slots},16]" in padded_jaxpr  # The blocks run on the padded slots.
  assert f"f32[2,{slots},16]" not in str(jax.make_jaxpr(plain.apply)(params, images))
  weights = jax.random.normal(jax.random.key(2), (2, 81, 16))
  loss = lambda model: lambda p: jnp.sum(model.apply(p, images) * weights)
  value, grads = jax.jit(jax.value_and_grad(loss(plain)))(params)
  value_p, grads_p = jax.jit(jax.value_and_grad(loss(padded)))(params)
  np.testing.assert_allclose(value_p, value, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               grads_p, grads)


def test_the_patch_sequence_is_padded_by_default_for_a_tpu_target_only():
  config = ViTConfig(image_size=18, patch_size=2, width=16, depth=1, mlp_dim=32, num_heads=2)
  vit = ViT(config, attention="reference")
  images = jnp.zeros((2, 18, 18, 3))
  params = init(vit, images)
  assert "96" not in str(jax.make_jaxpr(vit.apply)(params, images))  # this CPU
  with mock.patch.object(layers, "target_platform", lambda: "tpu"):
    assert "f32[2,96,16]" in str(jax.make_jaxpr(vit.apply)(params, images))


def test_merging_by_matmul_gives_the_gathers_values_and_gradients():
  """One-hot matmuls in place of the gathers that merge the embeddings and pick the text's
  hidden states: the same loss and gradients (to float32 rounding: the gradients' sums
  run in another order), for rows with two image slots (one row using both, one using
  one)."""
  gathers = small_vlm()
  images = jax.random.uniform(jax.random.key(1), (2, 2, 16, 16, 3), minval=-1, maxval=1)
  tokens = jnp.array([[2, IMAGE_ID, 5, IMAGE_ID, 7, 8, 3, 0],
                      [2, 9, IMAGE_ID, 7, 6, 3, 0, 0]])
  params = init(gathers, images, tokens, 4)
  out = {}
  for by_matmul in (False, True):
    model = VLM(gathers.config, merge_by_matmul=by_matmul)
    loss = lambda p, model=model: jnp.sum(model.apply(p, images, tokens, 4) ** 2)
    out[by_matmul] = jax.jit(jax.value_and_grad(loss))(params)
  np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               out[True][1], out[False][1])
  assert float(out[False][0]) > 0


def test_the_merge_is_by_matmul_by_default_for_a_tpu_target_only():
  model = small_vlm()
  images, tokens = _images_tokens()
  params = init(model, images, tokens, 16)
  gathers = lambda: str(jax.make_jaxpr(lambda p: model.apply(p, images, tokens, 16))(
      params)).count(" gather[")
  on_cpu = gathers()
  with mock.patch.object(layers, "target_platform", lambda: "tpu"):
    # The visual and text embeddings' gathers and the text's hidden states' one.
    assert gathers() == on_cpu - 3


@pytest.mark.parametrize("tie_embeddings", [True, False])
def test_vocabulary_chunked_vlm_loss_equals_the_whole_logits_loss(tie_embeddings):
  from tokenflex_jax.training.vlm_task import vlm_loss
  model = small_vlm(tie_embeddings=tie_embeddings)
  images, tokens = _images_tokens()
  params = init(model, images, tokens, 16)["params"]
  batch = {"image": images, "tokens": tokens,
           "loss_mask": (jnp.arange(tokens.shape[1]) >= 4).astype(jnp.float32)[None] *
                        (tokens != PAD)}
  loss = lambda chunk: jax.jit(jax.value_and_grad(
      lambda p: vlm_loss(model, "sqrt", chunk)(p, batch, 16)[0]))(params)
  whole, chunked = loss(0), loss(10)
  np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               chunked[1], whole[1])


REAL_DOT_PRODUCT_ATTENTION = jax.nn.dot_product_attention


def _attention_inputs(dtype=jnp.float32):
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), dtype)
  k = jnp.asarray(rng.normal(size=(2, 7, 2, 8)), dtype)
  v = jnp.asarray(rng.normal(size=(2, 7, 2, 8)), dtype)
  key_valid = jnp.array([[True] * 7, [False, False] + [True] * 5])  # left padding
  mask = layers.causal_mask(key_valid, jnp.arange(5) + 2)
  return q, k, v, mask


@pytest.mark.parametrize("masked", [True, False])
def test_xla_attention_equals_the_reference(masked):
  """jax.nn.dot_product_attention's XLA path: the reference's values and gradients,
  with grouped KV heads, a causal + padding mask or none."""
  q, k, v, mask = _attention_inputs()
  mask = mask if masked else None
  for impl in ("xla", "auto"):
    f = lambda *a, impl=impl: layers.grouped_attention(*a, mask, implementation=impl)
    ref = lambda *a: layers.reference_attention(*a, mask)
    np.testing.assert_allclose(f(q, k, v), ref(q, k, v), rtol=1e-5, atol=1e-6)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a) ** 2)
    for g, r in zip(jax.grad(loss(f), argnums=(0, 1, 2))(q, k, v),
                    jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)
  with pytest.raises(ValueError, match="attention must be one of"):
    layers.grouped_attention(q, k, v, mask, implementation="flash")


def test_causal_blocks_cover_the_sequence():
  assert layers.causal_blocks(100) == [(0, 100)]  # short: one block, the reference
  assert layers.causal_blocks(279) == [(0, 70), (70, 140), (140, 209), (209, 279)]
  assert layers.causal_blocks(5000)[-1] == (3750, 5000)  # at most 4 blocks


@pytest.mark.parametrize("length", [300, 100])
def test_causal_block_attention_equals_the_reference(length):
  """Causal query blocks (4 at 300 slots, 1 at 100): the masked reference's values and
  gradients, with grouped KV heads, right and left padding. Queries without any valid key
  (the left padding's) are left out: their output is arbitrary in both (a uniform average
  over what each could see), and nothing reads it."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(2, length, 4, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, length, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, length, 2, 8)), jnp.float32)
  slots = np.arange(length)
  key_valid = jnp.asarray(np.stack([slots < length - 37, slots >= 11]))
  # Jitted: one program each (op by op, every block's slices would compile on their own).
  blocked = jax.jit(lambda *a: layers.causal_block_attention(*a, key_valid))
  ref = jax.jit(lambda *a: layers.reference_attention(*a, layers.causal_mask(
      key_valid, jnp.arange(length))))
  seen = np.asarray(jnp.cumsum(key_valid, axis=1) > 0)  # [B, S]: has a valid key
  np.testing.assert_allclose(np.asarray(blocked(q, k, v))[seen], np.asarray(ref(q, k, v))[seen],
                             rtol=1e-5, atol=1e-6)
  weights = jnp.asarray(rng.normal(size=q.shape), jnp.float32) * seen[:, :, None, None]
  loss = lambda fn: lambda *a: jnp.sum(fn(*a) * weights)
  for g, r in zip(jax.jit(jax.grad(loss(blocked), argnums=(0, 1, 2)))(q, k, v),
                  jax.jit(jax.grad(loss(ref), argnums=(0, 1, 2)))(q, k, v)):
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_decoder_logits_with_causal_blocks_equal_the_reference():
  """The decoder on 200 tokens (3 query blocks) with "blocked" attention equals the
  reference decoder; on a CPU "auto" is "blocked"."""
  cfg = LLMConfig(vocab_size=32, width=32, depth=2, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64)
  tokens = jax.random.randint(jax.random.key(1), (2, 200), 0, 32)
  ref = LLM(cfg, attention="reference")
  params = init(ref, tokens)
  np.testing.assert_allclose(apply(LLM(cfg, attention="blocked"), params, tokens),
                             apply(ref, params, tokens), rtol=1e-4, atol=1e-5)
  if jax.default_backend() == "cpu":
    assert layers.resolve_attention("auto", jnp.float32) == "blocked"


def test_vlm_logits_do_not_depend_on_the_attention_implementation():
  images, tokens = _images_tokens()
  ref = VLM(dataclasses.replace(small_vlm().config, attention="reference"))
  xla = VLM(dataclasses.replace(small_vlm().config, attention="xla"))
  params = init(ref, images, tokens, 16)
  np.testing.assert_allclose(apply(xla, params, images, tokens, 16),
                             apply(ref, params, images, tokens, 16), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_causal_self_attention_gives_the_mask_as_structure_where_it_is_one(dtype):
  """`causal_self_attention` ("xla" here; "cudnn" on a GPU): right padding (every row's
  valid keys a prefix) runs ``is_causal`` + per-row key counts, left padding the dense
  mask; both equal the reference (values and gradients, grouped KV heads; queries with no
  valid key left out, as in the causal-block test)."""
  rng = np.random.default_rng(2)
  length = 24
  q, k, v = (jnp.asarray(rng.normal(size=(2, length, h, 8)), dtype) for h in (4, 2, 2))
  slots = np.arange(length)
  tol = dict(rtol=1e-5, atol=1e-6) if dtype == jnp.float32 else dict(rtol=2e-2, atol=2e-2)
  for padding, key_valid in (("right", np.stack([slots < 17, slots < 24])),
                             ("left", np.stack([slots >= 5, slots < 24]))):
    key_valid = jnp.asarray(key_valid)
    ran = []

    def recording(*args, **kwargs):
      kind = "structure" if kwargs.get("is_causal") else "dense mask"
      jax.debug.callback(lambda kind=kind: ran.append(kind))
      return REAL_DOT_PRODUCT_ATTENTION(*args, **kwargs)

    flex = lambda *a: layers.causal_self_attention(*a, key_valid, "xla")
    ref = lambda *a: layers.reference_attention(*a, layers.causal_mask(key_valid, slots))
    seen = np.asarray(jnp.cumsum(key_valid, axis=1) > 0)
    with mock.patch.object(jax.nn, "dot_product_attention", recording):
      got = jax.jit(flex)(q, k, v)
      weights = jnp.asarray(rng.normal(size=q.shape), dtype) * seen[:, :, None, None]
      loss = lambda fn: lambda *a: jnp.sum((fn(*a) * weights).astype(jnp.float32))
      grads = jax.jit(jax.grad(loss(flex), argnums=(0, 1, 2)))(q, k, v)
    assert set(ran) == {"structure" if padding == "right" else "dense mask"}, (padding, ran)
    as32 = lambda x: np.asarray(x, np.float32)
    np.testing.assert_allclose(as32(got)[seen], as32(ref(q, k, v))[seen], **tol)
    for g, r in zip(grads, jax.grad(loss(ref), argnums=(0, 1, 2))(q, k, v)):
      np.testing.assert_allclose(as32(g), as32(r), **tol)


def test_auto_attention_for_a_gpu_target_in_16_bit_is_cudnn_with_the_structure():
  """The target platform chooses: "auto" is cuDNN for a GPU in 16-bit (xla-like in 32),
  splash for a TPU; the decoder then hands cuDNN is_causal and the key counts, no dense
  mask, where every key is valid (its arguments recorded; run here by the XLA path)."""
  assert layers.resolve_attention("auto", jnp.bfloat16, "gpu") == "cudnn"
  assert layers.resolve_attention("auto", jnp.float32, "gpu") == "blocked"
  assert layers.resolve_attention("auto", jnp.bfloat16, "tpu") == "splash"
  calls = []

  def recording(*args, **kwargs):
    calls.append(kwargs)
    return REAL_DOT_PRODUCT_ATTENTION(*args, **{**kwargs, "implementation": "xla"})

  cfg = LLMConfig(vocab_size=32, width=32, depth=1, num_heads=4, num_kv_heads=2,
                  head_dim=8, mlp_dim=64, dtype="bfloat16")
  tokens = jax.random.randint(jax.random.key(1), (2, 16), 0, 32)  # every key valid
  params = LLM(cfg, attention="reference").init(jax.random.key(0), tokens)
  with mock.patch.object(jax.nn, "dot_product_attention", recording):
    got = LLM(cfg, attention="cudnn").apply(params, tokens)
  structured = [c for c in calls if c.get("is_causal")]
  assert structured and all(c["implementation"] == "cudnn" and c.get("mask") is None and
                            c["key_value_seq_lengths"] is not None for c in structured)
  want = LLM(cfg, attention="reference").apply(params, tokens)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             rtol=5e-2, atol=5e-2)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN attention needs a GPU")
def test_cudnn_attention_equals_the_reference_on_a_gpu():
  q, k, v, mask = _attention_inputs(jnp.bfloat16)
  got = layers.grouped_attention(q, k, v, mask, implementation="cudnn")
  want = layers.reference_attention(q, k, v, mask)
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32),
                             atol=2e-2)


def test_bfloat16_compute_keeps_float32_parameters():
  """dtype="bfloat16": the parameters stay float32 (the master copy), the matmuls run in
  bfloat16, the logits come back float32, close to the float32 model's."""
  images, tokens = _images_tokens()
  f32 = small_vlm()
  cfg = f32.config
  bf16 = VLM(dataclasses.replace(cfg, vit=dataclasses.replace(cfg.vit, dtype="bfloat16"),
                                 llm=dataclasses.replace(cfg.llm, dtype="bfloat16"),
                                 projector=dataclasses.replace(cfg.projector,
                                                               dtype="bfloat16")))
  params = init(bf16, images, tokens, 16)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  logits = apply(bf16, params, images, tokens, 16)
  assert logits.dtype == jnp.float32
  jaxpr = str(jax.make_jaxpr(lambda p: bf16.apply(p, images, tokens, 16))(params))
  assert "preferred_element_type=bfloat16" in jaxpr or "bf16[" in jaxpr
  np.testing.assert_allclose(logits, apply(f32, params, images, tokens, 16), atol=0.1)
