r"""Answers one question about one image with a trained checkpoint.

  python -m tokenflex_jax.predict --workdir=/tmp/run --image=cat.png \
      --question="What colour is the background?" --num_tokens=144 [--config=...]

``--num_tokens=auto`` chooses the budget per question: the ViT runs once, the model
answers at the smallest count and again at the next while unsure. With a router saved
for this checkpoint (WORKDIR/router.json, written by ``eval --config.eval.save_router``)
it escalates over the router's counts while the router expects the next count to do
better by less than its threshold; without one, over the trained counts
(``config.token_counts``, or the ladder ``config.eval.auto_counts``) while the answer's
mean token log-probability is under ``config.eval.auto_threshold`` (see
`evaluation.auto_budget`).

Without ``--config`` the workdir's own config is used (``--config.a.b=V`` overrides apply
to it); with it, it must describe the same model (the rule of every binary, `cli`).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath

from tokenflex_jax import errors, sharding
from tokenflex_jax.app import cli, config_checks, config_schema, trained_model
from tokenflex_jax.data import images
from tokenflex_jax.data.pipeline import normalize_image
from tokenflex_jax.evaluation import auto_budget, outputs
from tokenflex_jax.evaluation.generate import encode_prompts, make_generate
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training import buckets


def load_image(path: str, size: int) -> np.ndarray:
  """Reads an image file as uint8 [size, size, 3]: `images.decode`, as in training (any
  mode to RGB, bicubic resize if needed); an unreadable file is an `errors.InputError`."""
  try:
    with open(path, "rb") as f:
      return images.decode(f.read(), size)
  except (OSError, images.ImageError) as e:
    raise errors.InputError(f"--image={path!r}: cannot read image: {e}") from None


@dataclasses.dataclass(frozen=True)
class Answer:
  text: str
  num_tokens: int       # the count that answered
  confidence: float     # its mean token log-probability
  visual_tokens: int    # spent over every attempt
  signal: str = ""      # what decided the budget: "router", "log-probability" or ""


def answer(trained: trained_model.TrainedModel, image: np.ndarray, prompts: np.ndarray,
           counts: Sequence[int], threshold: float, max_new_tokens: int,
           router: auto_budget.Router | None = None) -> Answer:
  """Answers at ``counts[0]``, then at each next count while the confidence is under
  ``threshold`` (with a ``router``: while it does not stop). image: f32 [1, H, W, 3];
  prompts: i32 [1, P]. The ViT runs once."""
  tokenizer, model = trained.tokenizer, trained.model
  generate = jax.jit(make_generate(model, max_new_tokens, tokenizer.eos_id, tokenizer.pad_id),
                     static_argnums=3)
  patches = jax.jit(lambda p, x: model.apply({"params": p}, x, method=VLM.patches))(
      trained.params, image)
  spent = 0
  for n in counts:
    out, confidence = generate(trained.params, None, prompts, n, patches)
    spent += n
    if router is not None:
      stop = bool(router.stops(n, prompts, np.asarray(confidence, np.float64))[0])
    else:
      stop = float(confidence[0]) >= threshold
    if stop:
      break
  signal = "" if len(counts) == 1 else "router" if router is not None else "log-probability"
  return Answer(tokenizer.decode(np.asarray(out)[0].tolist()).strip(), n,
                float(confidence[0]), spent, signal)


def saved_router(workdir: str, step: int) -> auto_budget.Router | None:
  """WORKDIR/router.json when it was fitted on checkpoint ``step``; None (logged) when
  there is none or it is of another step."""
  path = epath.Path(workdir) / outputs.ROUTER_FILE
  if not path.exists():
    return None
  router = auto_budget.Router.from_json(json.loads(path.read_text()))
  if router.fitted_on.get("step") != step:
    logging.warning("%s was fitted on step %s, not the checkpoint's %d: not used (run eval "
                    "--config.eval.save_router=True again)", path, router.fitted_on.get("step"),
                    step)
    return None
  return router


def predict(workdir: str, image_path: str, question: str, num_tokens: int | str,
            step: int = -1, max_new_tokens: int = 8,
            config: config_schema.ConfigDict | RunSpec | None = None) -> Answer:
  """The model's answer to ``question`` about the image at ``image_path``, at
  ``num_tokens`` visual tokens or, with "auto", at the budget chosen for it."""
  config = trained_model.run_config(workdir, None if config is None else
                                    config_schema.to_spec(config))
  config_checks.check(config, config_checks.PREDICT)  # Before any checkpoint is read or compile.
  if num_tokens == "auto":
    counts = list(auto_budget.ladder_counts(config.eval.auto_counts, config.token_counts))
    threshold = config.eval.auto_threshold
  elif isinstance(num_tokens, int) or str(num_tokens).isdigit():
    counts, threshold = [int(num_tokens)], -float("inf")
    buckets.check_counts(counts, "--num_tokens", *config_checks.grid_side(config))
  else:
    raise errors.ConfigError(f"--num_tokens must be a square count (64, 144, ...) or 'auto', "
                             f"got {num_tokens!r}")
  mesh, rules = sharding.mesh_from_config(config)
  trained = trained_model.load(config, workdir, mesh, rules, step)
  router = saved_router(workdir, trained.step) if num_tokens == "auto" else None
  if router is not None:
    counts = list(router.counts)
  image = normalize_image(load_image(image_path, config.data.image_size))[None]
  image_first = config.data.image_first
  prompts = encode_prompts(trained.tokenizer, [question],
                           len(trained.tokenizer.prompt_ids(question, image_first)), image_first)
  with sharding.mesh_rules(mesh, rules):
    return answer(trained, image, prompts, counts, threshold, max_new_tokens, router)


def main() -> None:
  config, workdir = cli.define_flags()
  image = flags.DEFINE_string("image", None, "Image file (PNG, JPEG, ...).")
  question = flags.DEFINE_string("question", None, "The question.")
  num_tokens = flags.DEFINE_string("num_tokens", "144", "Visual tokens (a square: 64, 144, "
                                   "...), or 'auto' to choose them per question.")
  step = flags.DEFINE_integer("step", -1, "Checkpoint step (-1: latest).")
  max_new = flags.DEFINE_integer("max_new_tokens", 8, "Longest answer in tokens.")
  flags.mark_flags_as_required(["image", "question"])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    result = predict(workdir.value, image.value, question.value, num_tokens.value, step.value,
                     max_new.value, config_schema.loaded(config))
    logging.info("answered at %d visual tokens (%d spent), confidence %.3f%s",
                 result.num_tokens, result.visual_tokens, result.confidence,
                 f", budget by the {result.signal}" if result.signal else "")
    print(result.text)

  cli.run_main(run)


if __name__ == "__main__":
  main()
