"""A packed row computes what each of its conversations computes alone: logits, losses
and gradients, for image, multi-image and text-only conversations, with every attention
implementation this CPU runs (splash through Pallas's interpreter)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tokenflex_jax.models.llm import LLMConfig
from tokenflex_jax.models.projector import ProjectorConfig
from tokenflex_jax.models.vit import ViTConfig
from tokenflex_jax.models.vlm import VLM, VLMConfig
from tokenflex_jax.training.loss import token_weights
from tokenflex_jax.training.vlm_task import vlm_loss

IMG, PAD, N = 4, 0, 16
# (tokens, answer mask, images): one image, two images (one in a later turn; its text
# spells the pad id, which a tokenizer may emit for a special token written in a text),
# text only, and one image again.
CONVERSATIONS = [
    ([2, 5, IMG, 7, 8, 6, 10, 11, 3], [0, 0, 0, 0, 0, 0, 1, 1, 1], 1),
    ([2, IMG, 5, 6, 12, 3, 7, IMG, 9, PAD, 6, 13, 14, 15, 3],
     [0, 0, 0, 0, 1, 1, 0, 0, 0, 0, 0, 1, 1, 1, 1], 2),
    ([2, 5, 7, 9, 6, 14, 3], [0, 0, 0, 0, 0, 1, 1], 0),
    ([2, 8, 9, IMG, 6, 15, 16, 17, 18, 3], [0, 0, 0, 0, 0, 1, 1, 1, 1, 1], 1),
]
# Two packed rows of T = 128 text slots (S = 173 merged: two causal blocks) and K = 3 image slots: row 0 holds conversations
# 0, 1, 2 (three images), row 1 conversation 3 (two unused image slots).
ROWS, T, K = [[0, 1, 2], [3]], 128, 3


def model(attention: str, span: int = 0, layout: str = "raster") -> VLM:
  llm = LLMConfig(vocab_size=32, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8,
                  mlp_dim=64)
  vit = ViTConfig(image_size=16, patch_size=2, width=16, depth=1, mlp_dim=32, num_heads=2)
  return VLM(VLMConfig(vit, ProjectorConfig(), llm, image_token_id=IMG, pad_token_id=PAD,
                       visual_position_span=span, visual_position_layout=layout,
                       attention=attention))


def conversation_images():
  keys = jax.random.split(jax.random.key(7), len(CONVERSATIONS))
  return [jax.random.uniform(key, (max(n, 1), 16, 16, 3), minval=-1, maxval=1)[:n]
          for key, (_, _, n) in zip(keys, CONVERSATIONS)]


def packed_batch() -> dict:
  """The conversations in `ROWS`: image [2, K, 16, 16, 3], tokens / loss_mask / segments
  [2, T]."""
  images = conversation_images()
  batch = {"image": np.zeros((len(ROWS), K, 16, 16, 3), np.float32),
           "tokens": np.full((len(ROWS), T), PAD, np.int32),
           "loss_mask": np.zeros((len(ROWS), T), np.float32),
           "segments": np.zeros((len(ROWS), T), np.int32)}
  for r, members in enumerate(ROWS):
    at = slot = 0
    for segment, c in enumerate(members, start=1):
      tokens, mask, n = CONVERSATIONS[c]
      batch["tokens"][r, at:at + len(tokens)] = tokens
      batch["loss_mask"][r, at:at + len(tokens)] = mask
      batch["segments"][r, at:at + len(tokens)] = segment
      batch["image"][r, slot:slot + n] = images[c]
      at, slot = at + len(tokens), slot + n
  return {k: jnp.asarray(v) for k, v in batch.items()}


def alone_batch(c: int, length: int = 24) -> dict:
  """Conversation ``c`` alone in an unpacked row of ``length`` text slots and as many
  image slots as it has images (a text-only one: one unused slot)."""
  tokens, mask, n = CONVERSATIONS[c]
  pad = length - len(tokens)
  image = conversation_images()[c] if n else jnp.zeros((1, 16, 16, 3))
  return {"image": image[None], "tokens": jnp.asarray([tokens + [PAD] * pad], jnp.int32),
          "loss_mask": jnp.asarray([mask + [0] * pad], jnp.float32)}


def where_in_rows(c: int) -> tuple[int, int]:
  row = next(r for r, members in enumerate(ROWS) if c in members)
  start = sum(len(CONVERSATIONS[m][0]) for m in ROWS[row][:ROWS[row].index(c)])
  return row, start


ATTENTION = ["reference", "blocked", "xla", "splash"]


def logits(m: VLM, params, batch: dict) -> jax.Array:
  apply = jax.jit(lambda p, b: m.apply({"params": p}, b["image"], b["tokens"], N,
                                       segments=b.get("segments")))
  return apply(params, batch)


@pytest.fixture(scope="module")
def params():
  batch = packed_batch()
  init = jax.jit(lambda b: model("reference").init(jax.random.key(0), b["image"], b["tokens"],
                                                   N, segments=b["segments"])["params"])
  return init(batch)


@pytest.mark.parametrize("attention,span,layout", [(a, 0, "raster") for a in ATTENTION] +
                         [("reference", 64, "raster"), ("blocked", 64, "grid")])
def test_packed_logits_equal_each_conversation_alone(params, attention, span, layout):
  m = model(attention, span, layout)
  batch = packed_batch()
  packed = logits(m, params, batch)
  assert packed.shape == (len(ROWS), T, 32)
  for c, (tokens, _, _) in enumerate(CONVERSATIONS):
    alone = alone_batch(c)
    want = logits(m, params, alone)[0]
    row, start = where_in_rows(c)
    got = packed[row, start:start + len(tokens)]
    # Every prediction but the first token's and the placeholders' and pads' (meaningless
    # alone too).
    keep = [t for t in range(1, len(tokens)) if tokens[t] not in (IMG, PAD)]
    np.testing.assert_allclose(np.asarray(got)[keep], np.asarray(want)[keep], atol=1e-5,
                               err_msg=f"conversation {c} ({attention})")


@pytest.mark.parametrize("attention,weighting", [(a, "sqrt") for a in ATTENTION] +
                         [("reference", "token_mean")])
def test_packed_loss_and_gradients_equal_the_conversations_alone(params, attention, weighting):
  """The loss over the packed rows is the loss over the conversations one per row (each
  conversation weighted by its own answer tokens under "sqrt"), gradients too."""
  loss_fn = jax.jit(jax.value_and_grad(vlm_loss(model(attention), weighting), has_aux=True),
                    static_argnums=2)
  packed = packed_batch()
  # One conversation per row: K = 2 slots (the most any has), 24 text slots.
  alone = [alone_batch(c) for c in range(len(CONVERSATIONS))]
  unpacked = {"tokens": jnp.concatenate([a["tokens"] for a in alone]),
              "loss_mask": jnp.concatenate([a["loss_mask"] for a in alone]),
              "image": jnp.stack([jnp.zeros((2, 16, 16, 3)).at[:a["image"].shape[1]].set(
                  a["image"][0]) for a in alone])}
  (loss_p, aux_p), grad_p = loss_fn(params, packed, N)
  (loss_u, aux_u), grad_u = loss_fn(params, unpacked, N)
  np.testing.assert_allclose(loss_p, loss_u, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(aux_p["loss_weight"], aux_u["loss_weight"], rtol=1e-6)
  np.testing.assert_allclose(aux_p["answer_tokens"], aux_u["answer_tokens"])
  flat_u = dict(jax.tree_util.tree_leaves_with_path(grad_u))
  for path, g in jax.tree_util.tree_leaves_with_path(grad_p):
    np.testing.assert_allclose(g, flat_u[path], atol=1e-5, rtol=1e-5,
                               err_msg=jax.tree_util.keystr(path))


def test_sqrt_weights_are_per_conversation():
  batch = packed_batch()
  weights = np.asarray(token_weights(batch["loss_mask"], "sqrt", batch["segments"]))
  for c, (tokens, mask, _) in enumerate(CONVERSATIONS):
    row, start = where_in_rows(c)
    np.testing.assert_allclose(weights[row, start:start + len(tokens)],
                               np.asarray(mask) / np.sqrt(sum(mask)), rtol=1e-6)
  # Without segments a row is one sample: row 0's three conversations share one count.
  together = np.asarray(token_weights(batch["loss_mask"], "sqrt"))[0]
  np.testing.assert_allclose(together[together > 0], 1 / np.sqrt(3 + 6 + 2), rtol=1e-6)


def test_useful_positions_of_a_packed_row(params):
  batch = packed_batch()
  _, aux = jax.jit(vlm_loss(model("reference"), "sqrt"), static_argnums=2)(params, batch, N)
  text = sum(len([x for x in t if x != PAD]) - n for t, _, n in CONVERSATIONS)
  images = sum(n for _, _, n in CONVERSATIONS)
  assert float(aux["useful_positions"]) == text + images * N


def test_patches_stand_in_for_the_images(params):
  """The ViT's patches, [B, K, L, C] for K slots or [B, L, C] for one, give the logits the
  images give (evaluation runs the ViT once for every count)."""
  m = model("reference")
  batch = packed_batch()
  hidden = jax.jit(lambda p, b, patches: m.apply(
      {"params": p}, None if patches is not None else b["image"], b["tokens"], N, patches,
      b["segments"], method=VLM.text_hidden))
  patches = m.apply({"params": params}, batch["image"], method=VLM.patches)
  assert patches.shape[:2] == (len(ROWS), K)
  np.testing.assert_allclose(hidden(params, batch, patches), hidden(params, batch, None),
                             atol=1e-5)
  one = alone_batch(0)
  single = {"image": one["image"][:, 0], "tokens": one["tokens"],
            "segments": (one["tokens"] != PAD).astype(jnp.int32)}
  patches = m.apply({"params": params}, single["image"], method=VLM.patches)
  assert patches.ndim == 3
  np.testing.assert_allclose(hidden(params, single, patches), hidden(params, single, None),
                             atol=1e-5)
