"""Text-only rows: no visual tokens (masked out of attention and the loss), the LLM alone
on their text; LLaVA rows without an image read, built and preprocessed."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.test_models import IMAGE_ID, PAD, small_vlm
from tests.test_real_formats import _png, make_hf_tokenizer
from tokenflex_jax.data import chat, llava, llava_tfds, pack, pipeline
from tokenflex_jax.data.rows import MalformedRowError
from tokenflex_jax.models.llm import LLM
from tokenflex_jax.training.loss import answer_loss
from tokenflex_jax.training.vlm_task import vlm_loss

TEXT = [2, 5, 7, 8, 9, 6, 10, 11, 3]  # a text-only row: no IMAGE_ID
T = 12
IMAGE_TOKEN = "<|image_pad|>"


def _rows():
  text_row = TEXT + [PAD] * (T - len(TEXT))
  image_row = [2, 5, IMAGE_ID, 7, 8, 6, 12, 13, 3, PAD, PAD, PAD]
  mask = [0.0] * 6 + [1.0] * 3 + [0.0] * 3
  return jnp.array([image_row, text_row]), jnp.array([mask, mask])


def test_a_text_only_row_is_the_llm_alone():
  model, n = small_vlm(), 16
  tokens, loss_mask = _rows()
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3), minval=-1, maxval=1)
  params = jax.jit(model.init, static_argnums=3)(jax.random.key(0), images, tokens, n)
  forward = jax.jit(lambda images, tokens: model.apply(params, images, tokens, n))
  vlm_logits = forward(images, tokens)

  # The decoder alone on the same text, with its own parameters.
  llm = LLM(model.config.llm, scan_layers=model.config.scan_layers)
  alone = jax.jit(llm.apply)({"params": params["params"]["llm"]}, jnp.array([TEXT]))[0]
  # logits[:, t] predict tokens[:, t] from what comes before: alone[t - 1].
  np.testing.assert_allclose(vlm_logits[1, 1:len(TEXT)], alone[:len(TEXT) - 1], atol=2e-5)

  # The loss: the VLM's on the text-only row equals the LLM's on its text.
  batch = {"image": images[1:], "tokens": tokens[1:], "loss_mask": loss_mask[1:]}
  loss, _ = jax.jit(vlm_loss(model, "token_mean", vocab_chunk=0), static_argnums=2)(
      params["params"], batch, n)
  shifted = jnp.concatenate([jnp.zeros((1, 32)), alone[:T - 1]])[None]  # [1, T, V]
  padded = jnp.pad(shifted, ((0, 0), (0, T - shifted.shape[1]), (0, 0)))
  expected, _ = answer_loss(padded, tokens[1:], loss_mask[1:], "token_mean")
  assert float(loss) == pytest.approx(float(expected), rel=1e-5)

  # Its (zero or any) image is never read; the image row beside it is unaffected by it.
  other = images.at[1].set(0.0)
  # (logits[:, T - 1], the prediction of the padding slot the visual slots took, is
  # meaningless, as the docstring of VLM.__call__ says.)
  np.testing.assert_array_equal(forward(other, tokens)[1, :T - 1],
                                vlm_logits[1, :T - 1])
  with_image = forward(images[:1], tokens[:1])[0]
  np.testing.assert_allclose(vlm_logits[0], with_image, atol=2e-5)
  assert not np.allclose(vlm_logits[0], forward(images[::-1], tokens)[0],
                         atol=1e-3)  # ...and it does read its own image.


def test_a_text_only_conversation_fits_one_slot_less_than_the_row(tmp_path):
  """A row of T slots with one image slot holds C = T - 1 text tokens (`row_shape`)."""
  tok = chat.load_tokenizer(kind="hf", path=make_hf_tokenizer(str(tmp_path)), template="chatml",
                            image_token=IMAGE_TOKEN)
  turns = [("user", "Hello there"), ("assistant", "Hi")]
  ids, mask = tok.conversation_ids(turns)
  assert tok.image_id not in ids
  fits = pack.RowShape(len(ids), 1)
  assert pipeline.fit_ids(ids, mask, tok.image_id, fits, False, "row 3") == (ids, mask)
  # One text slot short: refused, or truncated to C ids.
  short = pack.RowShape(len(ids) - 1, 1)
  with pytest.raises(ValueError, match=r"row 3: needs \d+ text tokens and 0 image"):
    pipeline.fit_ids(ids, mask, tok.image_id, short, False, "row 3")
  assert pipeline.fit_ids(ids, mask, tok.image_id, short, True, "") == (ids[:-1], mask[:-1])
  # Truncation that would keep no answer token refuses the conversation ("too long", which
  # "skip" counts) rather than training on a row with nothing to learn.
  no_answer = pack.RowShape(mask.index(True), 1)
  with pytest.raises(ValueError, match="row 3: truncated to the row's .* no answer token"):
    pipeline.fit_ids(ids, mask, tok.image_id, no_answer, True, "row 3")


def test_llava_rows_with_and_without_an_image_build_and_preprocess(tmp_path):
  (tmp_path / "a.png").write_bytes(_png("red"))
  rows = [{"id": "img", "image": "a.png", "conversations": [
              {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]},
          {"id": "text", "conversations": [
              {"from": "human", "value": "Say hi"}, {"from": "gpt", "value": "hi"}]},
          {"id": "null", "image": None, "conversations": [
              {"from": "human", "value": "Say bye"}, {"from": "gpt", "value": "bye"}]}]
  path = tmp_path / "rows.json"
  path.write_text(json.dumps(rows))
  read, skipped = llava.read_llava(str(path), str(tmp_path))
  assert [len(r.image_paths) for r in read] == [1, 0, 0] and not skipped

  # A marker without an image, and an image without a marker, stay malformed.
  bad = [rows[0], {"id": "x", "conversations": [{"from": "human", "value": "<image> Q"},
                                                 {"from": "gpt", "value": "A"}]}]
  path.write_text(json.dumps(bad))
  with pytest.raises(MalformedRowError, match=r"row 1: <image> marker without an image"):
    llava.read_llava(str(path), str(tmp_path))

  path.write_text(json.dumps(rows))
  source = llava_tfds.LlavaTfdsSource(llava_tfds.build(str(tmp_path / "tfds"), str(path),
                                                       str(tmp_path)))
  items = {source[i]["id"]: source[i] for i in range(len(source))}
  assert set(items) == {"img", "text", "null"}
  assert items["text"]["images"] == () and items["null"]["images"] == ()
  assert items["img"]["images"][0][:4] == b"\x89PNG"
  tok = chat.load_tokenizer(kind="hf", path=make_hf_tokenizer(str(tmp_path / "tok")),
                            template="chatml", image_token=IMAGE_TOKEN)
  transform = pipeline.ConversationPreprocess(lambda: tok, 16, 160)
  text = transform.map(items["text"])
  assert tok.image_id not in text["tokens"] and text["tokens"][-1] == tok.pad_id
  np.testing.assert_array_equal(text["image"], 0.0)  # an empty slot, never read
  assert (transform.map(items["img"])["tokens"] == tok.image_id).sum() == 1
