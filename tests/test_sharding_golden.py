"""Pins the partition spec of every parameter under each rules preset (golden file).

A change to a logical axis name, a rules preset or the fitting of specs to shapes shows
up here as a readable diff. After an intended change, regenerate the file with
  TOKENFLEX_UPDATE_GOLDEN=1 bash launch/test.sh -k golden
and review the diff.
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo, paper
from tokenflex_jax import model_config, sharding
from tokenflex_jax.app import config_schema
from tokenflex_jax.models.vlm import VLM

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
MESH_SHAPE = (2, 2, 2)


def render(config, rules) -> str:
  """'path shape: PartitionSpec' for every parameter of the config's model, one per line."""
  model = VLM(model_config.vlm_config(config, model_config.FixedTokenIds(256, image_id=4)))
  mesh = sharding.make_mesh(MESH_SHAPE)
  rules = sharding.rules_from_config(rules)
  size, text = config.data.image_size, config.data.max_text_length
  with sharding.mesh_rules(mesh, rules):
    boxed = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((8, size, size, 3)), jnp.zeros((8, text), jnp.int32),
        64)["params"])
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  lines = []
  for (path, sh), leaf in zip(jax.tree_util.tree_flatten_with_path(shardings)[0],
                              jax.tree.leaves(sharding.strip_boxes(boxed))):
    lines.append(f"{jax.tree_util.keystr(path)} {tuple(np.shape(leaf))}: {sh.spec}")
  return "\n".join(lines)


def golden_text(name: str) -> str:
  config = config_schema.to_spec({"demo": demo, "paper": paper}[name].get_config())
  blocks = [f"# {name} config, mesh (data, fsdp, tensor) = {MESH_SHAPE}, 8 devices.\n"
            f"# A mesh axis that does not divide a dimension is dropped for that dimension."]
  for preset, rules in demo.RULES.items():
    blocks.append(f"\n## rules={preset}\n" + render(config, rules))
  return "\n".join(blocks) + "\n"


@pytest.mark.parametrize("name", ["demo", "paper"])
def test_parameter_shardings_match_the_golden_file(name):
  assert jax.device_count() == 8
  text = golden_text(name)
  path = os.path.join(GOLDEN_DIR, f"{name}_param_shardings.txt")
  if os.environ.get("TOKENFLEX_UPDATE_GOLDEN"):
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
  with open(path, encoding="utf-8") as f:
    want = f.read()
  assert text == want, "parameter shardings changed; see the module docstring"


def test_presets_differ_where_they_should():
  text = golden_text("demo")
  blocks = dict(b.split("\n", 1) for b in text.split("\n## ")[1:])
  embed = "['llm']['embedding'] (256, 96)"
  line = lambda preset: next(l for l in blocks[f"rules={preset}"].splitlines() if
                             l.startswith(embed))
  assert line("dp").endswith("P(None, None)")                 # replicated
  assert line("fsdp").endswith("P(None, 'fsdp')")             # width split over fsdp
  assert line("fsdp_tp").endswith("P('tensor', 'fsdp')")      # and vocab over tensor
