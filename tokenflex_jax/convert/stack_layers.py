r"""Converts a workdir's checkpoint from per-layer params to stacked layers.

  python -m tokenflex_jax.convert.stack_layers --from=/runs/old --to=/runs/old_stacked \
      [--step=N]

Reads the params of checkpoint N (default: the latest) of a workdir written before the
layers were stacked (``vit/block_<i>``, ``llm/layer_<i>``), stacks them
(`legacy_layers.stack`: the same numbers) and writes them as checkpoint N of a new
workdir, with the old workdir's config.json and tokenizer files. The new workdir
evaluates and predicts as the old one did, and a run continues from it with
``--config.init.checkpoint=/runs/old_stacked``; the optimizer state and the data
position are not carried (a resume would need the same tree for Adam's moments).
"""

from __future__ import annotations

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import app, flags, logging

from tokenflex_jax import cli
from tokenflex_jax.convert import legacy_layers
from tokenflex_jax.training import checkpointing

_FROM = flags.DEFINE_string("from", None, "Workdir with an old-layout checkpoint.")
_TO = flags.DEFINE_string("to", None, "New workdir (must not hold checkpoints).")
_STEP = flags.DEFINE_integer("step", -1, "Checkpoint step to convert; -1: the latest.")


def convert(source: str, target: str, step: int = -1) -> int:
  """Writes ``source``'s checkpoint ``step`` (-1: latest), stacked, into ``target``.
  Returns the step."""
  if checkpointing.latest_step(target) is not None:
    raise ValueError(f"--to={target!r} already holds checkpoints; give a new workdir")
  step = checkpointing.resolve_step(source, step)
  path = os.path.join(checkpointing.checkpoint_dir(source), str(step), "params")
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointing.params_metadata(source, step))
  params = ocp.PyTreeCheckpointer().restore(path, restore_args=as_numpy)
  if not legacy_layers.per_layer_subtrees(params):
    raise ValueError(f"{path} already stores stacked layers; nothing to convert")
  stacked = legacy_layers.stack(params)
  meta = checkpointing.load_meta(source, step)
  os.makedirs(target, exist_ok=True)
  with checkpointing.make_manager(target, asynchronous=False) as manager:
    checkpointing.save_params(manager, step, stacked, meta)
  for name in sorted(os.listdir(source)):
    if os.path.isfile(os.path.join(source, name)) and not name.endswith(".jsonl"):
      shutil.copy2(os.path.join(source, name), os.path.join(target, name))
  return step


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  step = convert(_FROM.value, _TO.value, _STEP.value)
  logging.info("wrote checkpoint %d of %s with stacked layers; continue a run from it "
               "with --config.init.checkpoint=%s", step, _TO.value, _TO.value)


if __name__ == "__main__":
  flags.mark_flags_as_required(["from", "to"])
  cli.run_main(main)
