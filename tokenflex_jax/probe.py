r"""Linear position probes of a trained model: can the ViT's patch features, and the visual
tokens the projector hands the decoder at each count, tell where in the image they are?

  python -m tokenflex_jax.probe --workdir=/tmp/run/stage2 [--num_images=256]

Prints R^2 of the row and column (`studies.position_probe`) and writes
WORKDIR/eval/position_probe.json. The scene images come from the suite's generator.
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from absl import flags, logging

from tokenflex_jax import sharding
from tokenflex_jax.app import cli, trained_model, workdir as workdir_lib
from tokenflex_jax.data import scenes
from tokenflex_jax.data.pipeline import normalize_image
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.studies.position_probe import linear_probe_r2

def probe(workdir: str, num_images: int = 256) -> dict[str, dict[str, float]]:
  """{"vit patches": {"row", "col"}, "tokens at N": {...} per evaluated count N}."""
  config = workdir_lib.read_config(workdir)
  mesh, rules = sharding.mesh_from_config(config)
  trained = trained_model.load(config, workdir, mesh, rules)
  images = normalize_image(np.stack([
      scenes.generate_example(config.eval.seed + 1, i, image_size=config.data.image_size)["image"]
      for i in range(num_images)]))
  variables = {"params": trained.params}
  with sharding.mesh_rules(mesh, rules):
    patches = jax.jit(lambda v, x: trained.model.apply(v, x, method=VLM.patches))(
        variables, images)
    out = {"vit patches": linear_probe_r2(np.asarray(patches))}
    for n in config.eval.token_counts:
      tokens = jax.jit(lambda v, p, n=n: trained.model.apply(
          v, None, n, p, method=VLM.encode_images))(variables, patches)
      out[f"tokens at {n}"] = linear_probe_r2(np.asarray(tokens))
  return out


def write_probe(workdir: str, num_images: int) -> None:
  """Prints the probe's table and writes WORKDIR/eval/position_probe.json."""
  results = probe(workdir, num_images)
  lines = ["| features | row R^2 | column R^2 |", "|---|---|---|"]
  lines += [f"| {k} | {v['row']:.3f} | {v['col']:.3f} |" for k, v in results.items()]
  print("\n".join(lines))
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, "position_probe.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2)
  logging.info("wrote %s/position_probe.json", out_dir)


def main() -> None:
  # Flags are defined when the binary starts, not at import (see `cli`).
  workdir = flags.DEFINE_string("workdir", None, "A trained VLM's workdir.", required=True)
  num_images = flags.DEFINE_integer("num_images", 256, "Scene images to probe on.")
  cli.run_main(lambda argv: write_probe(workdir.value, num_images.value))


if __name__ == "__main__":
  main()
