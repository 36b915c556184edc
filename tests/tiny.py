"""A tiny variant of the demo config for fast tests (same code paths, small widths)."""

import json
import os

import ml_collections

from configs import demo
from tokenflex_jax import specs
from tokenflex_jax.app import config_schema

# The same settings as command-line overrides, for tests that run the binaries.
TINY_FLAGS = (
    "--config.model.vit.width=16", "--config.model.vit.depth=1", "--config.model.vit.mlp_dim=32",
    "--config.model.llm.width=32", "--config.model.llm.depth=1", "--config.model.llm.mlp_dim=64",
    "--config.model.llm.head_dim=16", "--config.batch_size=8", "--config.log_every=1",
    "--config.mesh.shape=(2,2,2)", "--config.optimizer.warmup_steps=2",
    "--config.eval.examples_per_family=8", "--config.eval.batch_size=8",
    "--config.eval.token_counts=(64,100)",
    "--config.token_counts=(64,144,256)", "--config.token_probs=(0.2,0.3,0.5)",
)


def tiny_config(stage: int = 2, **overrides) -> ml_collections.ConfigDict:
  """The demo config with TINY_FLAGS applied, plus ``overrides`` (dotted keys)."""
  c = demo.get_config(f"stage={stage}")
  for flag in TINY_FLAGS:
    key, value = flag[len("--config."):].split("=", 1)
    _set(c, key, eval(value))  # pylint: disable=eval-used  # Literal ints and tuples only.
  for key, value in overrides.items():
    _set(c, key.replace("__", "."), value)
  return c


def tiny_spec(stage: int = 2, **overrides) -> specs.RunSpec:
  """`tiny_config` as the library takes it: a frozen `specs.RunSpec`."""
  return config_schema.to_spec(tiny_config(stage, **overrides))


def _set(c, dotted, value):
  *parents, leaf = dotted.split(".")
  for p in parents:
    c = c[p]
  c[leaf] = value


def losses(workdir):
  """{step: (loss, num_tokens)} from a run's metrics.jsonl (the last record wins for
  repeated steps)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if "train/loss" in rec:  # Not a periodic evaluation's record.
        out[rec["step"]] = (rec["train/loss"], int(rec["train/num_tokens"]))
  return out
