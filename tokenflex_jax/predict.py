r"""Answers one question about one image with a trained checkpoint.

  python -m tokenflex_jax.predict --workdir=/tmp/run --image=cat.png \
      --question="What colour is the background?" --num_tokens=144 [--config=...]

Without ``--config`` the workdir's own config is used; with it, it must describe the
same model (the rule of every binary that reads a workdir, see `trained_model`).
"""

from __future__ import annotations

import jax
import ml_collections
import numpy as np
from absl import app, flags
from PIL import Image

from tokenflex_jax import cli, sharding, trained_model
from tokenflex_jax.data.pipeline import normalize_image
from tokenflex_jax.evaluation.generate import encode_prompts, make_generate
from tokenflex_jax.models.projector import token_side


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
            max_new_tokens: int = 8, config: ml_collections.ConfigDict | None = None) -> str:
  """The model's answer (decoded text) to ``question`` about the image at ``image_path``."""
  token_side(num_tokens)
  config = trained_model.run_config(workdir, config)
  mesh, rules = sharding.mesh_from_config(config)
  trained = trained_model.load(config, workdir, mesh, rules, step)
  tokenizer = trained.tokenizer
  image = normalize_image(load_image(image_path, config.data.image_size))[None]
  image_first = config.data.image_first
  prompts = encode_prompts(tokenizer, [question],
                           len(tokenizer.prompt_ids(question, image_first)), image_first)
  generate = make_generate(trained.model, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id)
  with sharding.mesh_rules(mesh, rules):
    out = jax.jit(generate, static_argnums=3)(trained.params, image, prompts, num_tokens)
  return tokenizer.decode(np.asarray(out)[0].tolist()).strip()


def main() -> None:
  config, workdir = cli.define_flags(config_required=False)
  image = flags.DEFINE_string("image", None, "Image file (PNG, JPEG, ...).")
  question = flags.DEFINE_string("question", None, "The question.")
  num_tokens = flags.DEFINE_integer("num_tokens", 144, "Visual tokens (a square: 64, 144, ...).")
  step = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: latest).")
  max_new = flags.DEFINE_integer("max_new_tokens", 8, "Longest answer in tokens.")
  flags.mark_flags_as_required(["image", "question"])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    print(predict(workdir.value, image.value, question.value, num_tokens.value, step.value,
                  max_new.value, config.value))

  app.run(run)


if __name__ == "__main__":
  main()
