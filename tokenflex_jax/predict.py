r"""Answers one question about one image with a trained checkpoint.

  python -m tokenflex_jax.predict --workdir=/tmp/run --image=cat.png \
      --question="What colour is the background?" --num_tokens=144
"""

from __future__ import annotations

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from tokenflex_jax import setup, sharding
from tokenflex_jax.data.pipeline import normalize_image
from tokenflex_jax.eval import load_model
from tokenflex_jax.evaluation.generate import encode_prompts, make_generate
from tokenflex_jax.models.projector import token_side

_WORKDIR = flags.DEFINE_string("workdir", None, "Training workdir (config.json + checkpoints).")
_IMAGE = flags.DEFINE_string("image", None, "Image file (PNG, JPEG, ...).")
_QUESTION = flags.DEFINE_string("question", None, "The question.")
_NUM_TOKENS = flags.DEFINE_integer("num_tokens", 144, "Visual tokens (a square: 64, 144, ...).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: latest).")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 8, "Longest answer in tokens.")


def load_image(path: str, size: int) -> np.ndarray:
  """Reads an image file as uint8 [size, size, 3] (RGB, bilinear resize if needed)."""
  try:
    image = Image.open(path).convert("RGB")
  except (FileNotFoundError, OSError) as e:
    raise ValueError(f"--image={path!r}: cannot read image: {e}") from None
  if image.size != (size, size):
    image = image.resize((size, size), Image.BILINEAR)
  return np.asarray(image, np.uint8)


def predict(workdir: str, image_path: str, question: str, num_tokens: int, step: int = -1,
            max_new_tokens: int = 8) -> str:
  token_side(num_tokens)
  config = setup.load_workdir_config(workdir)
  mesh, rules = setup.mesh_and_rules(config)
  model, params, tokenizer, _ = load_model(config, workdir, mesh, rules, step)
  image = normalize_image(load_image(image_path, config.data.image_size))[None]
  image_first = config.data.image_first
  prompts = encode_prompts(tokenizer, [question],
                           len(tokenizer.prompt_ids(question, image_first)), image_first)
  generate = make_generate(model, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id)
  with sharding.mesh_rules(mesh, rules):
    out = jax.jit(generate, static_argnums=3)(params, image, prompts, num_tokens)
  return tokenizer.decode(np.asarray(out)[0].tolist()).strip()


def _main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  print(predict(_WORKDIR.value, _IMAGE.value, _QUESTION.value, _NUM_TOKENS.value, _STEP.value,
                _MAX_NEW.value))


def main() -> None:
  flags.mark_flags_as_required(["workdir", "image", "question"])
  app.run(_main)


if __name__ == "__main__":
  main()
