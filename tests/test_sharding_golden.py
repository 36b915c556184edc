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

from configs import demo
from tokenflex_jax import setup, sharding
from tokenflex_jax.data.tokenizer import Tokenizer
from tokenflex_jax.models.vlm import VLM

GOLDEN = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden",
                      "demo_param_shardings.txt")
MESH_SHAPE = (2, 2, 2)


class _Ids:
  """The two token ids the model config needs (no tokenizer file)."""
  vocab_size, image_id, pad_id = 256, 4, 0


def render(config_arg: str) -> str:
  """'path shape: PartitionSpec' for every parameter of the demo model, one per line."""
  config = demo.get_config(config_arg)
  model = VLM(setup.model_config(config, _Ids()))
  mesh = sharding.make_mesh(MESH_SHAPE)
  rules = sharding.rules_from_config(config.sharding.rules)
  with sharding.mesh_rules(mesh, rules):
    boxed = jax.eval_shape(lambda: model.init(
        jax.random.key(0), jnp.zeros((8, 32, 32, 3)), jnp.zeros((8, 24), jnp.int32), 64)["params"])
  shardings = sharding.logical_shardings(boxed, mesh, rules)
  lines = []
  for (path, sh), leaf in zip(jax.tree_util.tree_flatten_with_path(shardings)[0],
                              jax.tree.leaves(sharding.strip_boxes(boxed))):
    lines.append(f"{jax.tree_util.keystr(path)} {tuple(np.shape(leaf))}: {sh.spec}")
  return "\n".join(lines)


def golden_text() -> str:
  blocks = [f"# demo config, mesh (data, fsdp, tensor) = {MESH_SHAPE}, 8 devices.\n"
            f"# A mesh axis that does not divide a dimension is dropped for that dimension."]
  for preset in demo.RULES:
    blocks.append(f"\n## rules={preset}\n" + render(f"stage=2,rules={preset}"))
  return "\n".join(blocks) + "\n"


def test_parameter_shardings_match_the_golden_file():
  assert jax.device_count() == 8
  text = golden_text()
  if os.environ.get("TOKENFLEX_UPDATE_GOLDEN"):
    with open(GOLDEN, "w", encoding="utf-8") as f:
      f.write(text)
  with open(GOLDEN, encoding="utf-8") as f:
    want = f.read()
  assert text == want, "parameter shardings changed; see the module docstring"


def test_presets_differ_where_they_should():
  text = golden_text()
  blocks = dict(b.split("\n", 1) for b in text.split("\n## ")[1:])
  embed = "['llm']['embedding'] (256, 96)"
  line = lambda preset: next(l for l in blocks[f"rules={preset}"].splitlines() if
                             l.startswith(embed))
  assert line("dp").endswith("P(None, None)")                 # replicated
  assert line("fsdp").endswith("P(None, 'fsdp')")             # width split over fsdp
  assert line("fsdp_tp").endswith("P('tensor', 'fsdp')")      # and vocab over tensor
