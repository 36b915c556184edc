"""Orbax checkpoints of a workdir: params, optimizer state, data iterator, metadata.

Layout: ``WORKDIR/checkpoints/<step>/{params,opt_state,data,meta}``. Orbax writes
each step to a temporary directory and renames it when complete (on ``gs://``: in place,
committed by a marker file it writes last), so a run killed mid-save leaves the previous
checkpoint as the latest (and an unfinished directory, which `remove_temporary` deletes
at the next start). Each committed step also gets checksums
(`integrity`), and `restore_latest` falls back from a damaged step to the one before.
"""

from __future__ import annotations

import os
import re
from typing import Any

import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint._src.metadata import array_metadata_store  # no public path

from tokenflex_jax import paths
from tokenflex_jax.errors import CheckpointMismatchError, MissingInputError, UserError
from tokenflex_jax.training import integrity
from tokenflex_jax.specs import InitSpec

RESTORED_ITEMS = ("params", "opt_state", "meta")  # every resumable step has them


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(paths.absolute(workdir), "checkpoints")


def make_manager(workdir: str, keep: int = 2, asynchronous: bool = True,
                 read_only: bool = False) -> ocp.CheckpointManager:
  # A read-only manager keeps and saves nothing: say so, rather than have Orbax warn
  # that it changed the options.
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else keep, save_interval_steps=0 if read_only else 1,
      enable_async_checkpointing=asynchronous, read_only=read_only, create=not read_only)
  registry = _type_handlers()
  handlers = {"params": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
              "opt_state": ocp.PyTreeCheckpointHandler(type_handler_registry=registry),
              "meta": ocp.JsonCheckpointHandler(), "data": grain.checkpoint.CheckpointHandler()}
  return ocp.CheckpointManager(checkpoint_dir(workdir), item_handlers=handlers, options=options)


# Orbax's default splits every replicated array among its replicas to write it in
# parallel, which costs an eager slice program per array shape and replica at the first
# save and gains nothing for small arrays: below this size per replica, one replica
# writes the whole shard.
MIN_REPLICA_SLICE_BYTES = 1 << 20


def _type_handlers() -> Any:
  """Orbax's default leaf handlers, with `MIN_REPLICA_SLICE_BYTES` for arrays."""
  arrays = ocp.type_handlers.ArrayHandler(
      min_slice_bytes_for_replica_parallel=MIN_REPLICA_SLICE_BYTES,
      array_metadata_store=array_metadata_store.Store())  # as Orbax's default handler
  return ocp.type_handlers.create_type_handler_registry(*(
      (ty, arrays if ty is jax.Array else ocp.type_handlers.get_type_handler(ty))
      for ty in ocp.type_handlers.supported_types()))


def save(manager: ocp.CheckpointManager, step: int, params: Any, opt_state: Any,
         data_iterator: grain.DatasetIterator | None, meta: dict[str, Any]) -> None:
  """Starts an (asynchronous) save of everything needed to resume at ``step``."""
  items = {"params": ocp.args.PyTreeSave(params), "opt_state": ocp.args.PyTreeSave(opt_state),
           "meta": ocp.args.JsonSave(meta)}
  if data_iterator is not None:
    items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
  finish(manager)  # Orbax would wait for the previous save here anyway.
  manager.save(step, args=ocp.args.Composite(**items), force=True)
  logging.info("saving checkpoint %s/%d (asynchronously)", manager.directory, step)


def save_params(manager: ocp.CheckpointManager, step: int, params: Any,
                meta: dict[str, Any]) -> None:
  """Saves params and metadata only (a starting point, e.g. converted towers) and waits."""
  manager.save(step, args=ocp.args.Composite(params=ocp.args.PyTreeSave(params),
                                             meta=ocp.args.JsonSave(meta)), force=True)
  finish(manager)


def finish(manager: ocp.CheckpointManager) -> None:
  """Waits for the save in flight, then records the checksums of every committed step
  that has none from this process yet."""
  manager.wait_until_finished()
  for step in manager.all_steps():
    step_dir = os.path.join(str(manager.directory), str(step))
    if not integrity.has_checksums(step_dir, jax.process_index()):
      integrity.write_checksums(step_dir, jax.process_index())


def remove_temporary(workdir: str) -> list[str]:
  """Deletes (process 0) and reports the temporary directories of unfinished saves."""
  if jax.process_index() != 0:
    return []
  return integrity.remove_temporary(checkpoint_dir(workdir))


def has_data_state(manager: ocp.CheckpointManager, step: int) -> bool:
  """Whether ``step`` holds a data-iterator state for this process layout (a checkpoint
  written by a different number of processes has none for it)."""
  name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
  return (epath.Path(manager.directory) / str(step) / "data" / name).exists()


def _restore_args(abstract: Any) -> Any:
  return jax.tree.map(lambda x: ocp.ArrayRestoreArgs(sharding=x.sharding, global_shape=x.shape,
                                                     dtype=x.dtype), abstract)


def restore(manager: ocp.CheckpointManager, step: int, abstract_params: Any,
            abstract_opt_state: Any, data_iterator: grain.DatasetIterator | None
            ) -> tuple[Any, Any, dict[str, Any], bool]:
  """Restores onto the shardings carried by the abstract trees (ShapeDtypeStruct), so
  any mesh shape works; restores ``data_iterator`` in place when the checkpoint has its
  state (see `has_data_state`). Returns (params, opt_state, meta, data restored)."""
  refuse_per_layer_layout(os.path.dirname(str(manager.directory)), step)
  items = {
      "params": ocp.args.PyTreeRestore(abstract_params, _restore_args(abstract_params)),
      "opt_state": ocp.args.PyTreeRestore(abstract_opt_state, _restore_args(abstract_opt_state)),
      "meta": ocp.args.JsonRestore()}
  data_restored = data_iterator is not None and has_data_state(manager, step)
  if data_restored:
    items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
  elif data_iterator is not None:
    logging.warning("checkpoint %d has no data-iterator state for %d processes (written by "
                    "a different number): the data position is recomputed from the step",
                    step, jax.process_count())
  out = manager.restore(step, args=ocp.args.Composite(**items))
  return out["params"], out["opt_state"], out["meta"], data_restored


def mismatches(workdir: str, step: int, abstract_params: Any) -> list[str]:
  """The parameters whose saved shape differs from the model's, or that only one side
  has: one "name: saved S, model M" per parameter ([] when the checkpoint fits)."""
  flat = lambda tree: {"/".join(str(getattr(k, "key", k)) for k in path): tuple(leaf.shape)
                       for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  saved, model = flat(params_metadata(workdir, step)), flat(abstract_params)
  out = []
  for name in sorted(set(saved) | set(model)):
    if saved.get(name) != model.get(name):
      out.append(f"{name}: saved {saved.get(name, 'absent')}, model {model.get(name, 'absent')}")
  return out


def restore_latest(manager: ocp.CheckpointManager, abstract_params: Any,
                   abstract_opt_state: Any, data_iterator: grain.DatasetIterator | None
                   ) -> tuple[int, Any, Any, dict[str, Any], bool] | None:
  """`restore` of the newest good step: (step, params, opt_state, meta, data restored),
  or None when the workdir has no committed step.

  A step whose files fail their checksums (`integrity.problems`: truncated, missing,
  changed), or (with one process) whose restore fails, is skipped with a warning naming
  the file and the fault, and the step before it is tried. Raises
  `CheckpointMismatchError` listing the parameters when a step holds another model's
  shapes, and `UserError` when steps exist but none is usable: a workdir with
  checkpoints never silently starts from scratch.
  """
  workdir = os.path.dirname(str(manager.directory))
  steps = sorted(manager.all_steps(), reverse=True)
  faults = []
  for step in steps:
    step_dir = os.path.join(str(manager.directory), str(step))
    found = _agreed_problems(integrity.problems(step_dir, jax.process_index(), RESTORED_ITEMS))
    if not found:
      try:
        wrong = mismatches(workdir, step, abstract_params)
        if wrong:
          raise CheckpointMismatchError(
              f"checkpoint {step_dir} holds another model: {len(wrong)} parameters differ "
              f"from the config's ({'; '.join(wrong[:8])}"
              f"{'; ...' if len(wrong) > 8 else ''}); use the config it was trained with "
              f"(its config.json) or another --workdir")
        return (step, *restore(manager, step, abstract_params, abstract_opt_state,
                               data_iterator))
      except UserError:
        raise
      except Exception as e:  # pylint: disable=broad-except  # Any read fault of the step.
        if jax.process_count() > 1:
          raise  # The restore is collective: the processes could not agree on a fallback.
        found = [f"{step_dir}: restoring failed: {type(e).__name__}: "
                 f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}"]
    faults.append(f"step {step}: {found[0]}")
    moved = _set_aside(manager, step)
    logging.warning("checkpoint %s is damaged: %s; moved to %s%s", step_dir, "; ".join(found),
                    moved, "; trying the step before it" if step != steps[-1] else "")
  if steps:
    raise UserError(f"{manager.directory} has checkpoints {sorted(steps)} but none can be "
                    f"restored ({'; '.join(faults)}); move the damaged steps away to resume "
                    f"from an older one, or the whole folder to start from scratch")
  return None


def _set_aside(manager: ocp.CheckpointManager, step: int) -> str:
  """Moves a damaged step out of the manager's folder (so the run can save that step
  again) into ``WORKDIR/damaged_checkpoints/<step>``; nothing is deleted."""
  workdir = os.path.dirname(str(manager.directory))
  target = os.path.join(workdir, "damaged_checkpoints", str(step))
  if jax.process_index() == 0:
    suffix = 0
    while epath.Path(target + (f".{suffix}" if suffix else "")).exists():
      suffix += 1
    target += f".{suffix}" if suffix else ""
    epath.Path(target).parent.mkdir(parents=True, exist_ok=True)
    (epath.Path(manager.directory) / str(step)).rename(target)  # on GCS: copy + delete
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(f"set aside damaged checkpoint {step}")
  manager.reload()
  return target


def _agreed_problems(found: list[str]) -> list[str]:
  """This process's problems with a step, plus a note when another process found one
  (every process must pick the same step)."""
  if jax.process_count() == 1:
    return found
  bad = multihost_utils.process_allgather(np.asarray(len(found) > 0))
  if bad.any() and not found:
    return [f"damaged on process(es) {np.flatnonzero(bad).tolist()}"]
  return found


def latest_step(workdir: str) -> int | None:
  if not epath.Path(checkpoint_dir(workdir)).is_dir():
    return None
  with make_manager(workdir, read_only=True, asynchronous=False) as manager:
    return manager.latest_step()


def load_params(workdir: str, abstract_params: Any, step: int | None = None) -> tuple[Any, int]:
  """Loads (a subtree of) the params saved in another workdir.

  ``abstract_params`` may name only some top-level modules (e.g. {"vit": ...}); only
  those are read. Returns (params, step).
  """
  step = resolve_step(workdir, step)
  refuse_per_layer_layout(workdir, step)
  with make_manager(workdir, read_only=True, asynchronous=False) as manager:
    out = manager.restore(step, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
        abstract_params, _restore_args(abstract_params), partial_restore=True)))
  return out["params"], step


def resolve_step(workdir: str, step: int | None = None) -> int:
  """``step`` if the workdir has it, its latest checkpoint for None or -1; raises
  FileNotFoundError naming the workdir and the steps it has otherwise."""
  if not epath.Path(checkpoint_dir(workdir)).is_dir():
    raise MissingInputError(f"no checkpoints in workdir {workdir!r} "
                            f"(expected {checkpoint_dir(workdir)})")
  with make_manager(workdir, read_only=True, asynchronous=False) as manager:
    step = manager.latest_step() if step is None or step < 0 else step
    if step is None or step not in manager.all_steps():
      raise MissingInputError(f"checkpoint step {step} not found in {checkpoint_dir(workdir)}; "
                              f"available: {sorted(manager.all_steps())}")
  return step


def item_metadata(path: str) -> Any:
  """The tree of one saved PyTree item (a step's ``params`` or ``opt_state`` folder),
  array metadata at the leaves."""
  metadata = ocp.PyTreeCheckpointHandler().metadata(epath.Path(path))  # the item's own
  return getattr(metadata, "tree", metadata)


def params_metadata(workdir: str, step: int) -> dict[str, Any]:
  """The nested tree of the params saved at ``step`` (array metadata at the leaves)."""
  return dict(item_metadata(os.path.join(checkpoint_dir(workdir), str(step), "params")))


# The pre-release layout, before the layers were stacked: one subtree per ViT block and
# LLM layer (``vit/block_0``, ``llm/layer_0``, ...).
_PER_LAYER_KEY = re.compile(r"(block|layer)_\d+")
LAST_COMMIT_WITH_STACK_LAYERS = "3ac68c4"


def refuse_per_layer_layout(workdir: str, step: int) -> None:
  """Raises `CheckpointMismatchError` (one line) for a checkpoint in the pre-release
  per-layer layout, which this version does not read."""
  tree = params_metadata(workdir, step)
  old = sorted(f"{module}/{key}" for module in ("vit", "llm")
               if isinstance(tree.get(module), dict)
               for key in tree[module] if _PER_LAYER_KEY.fullmatch(key))
  if old:
    raise CheckpointMismatchError(
        f"checkpoint {checkpoint_dir(workdir)}/{step} stores one subtree per layer "
        f"({old[0]}, ...), the pre-release layout from before the layers were stacked, "
        "which this version does not read; stack it with `python -m "
        "tokenflex_jax.convert.stack_layers` of tokenflex_jax at commit "
        f"{LAST_COMMIT_WITH_STACK_LAYERS} or earlier")


def saved_modules(workdir: str, step: int | None = None) -> tuple[str, ...]:
  """The top-level modules (e.g. "vit", "llm") of the params saved at ``step`` (latest)."""
  return tuple(sorted(params_metadata(workdir, resolve_step(workdir, step))))


def load_meta(workdir: str, step: int) -> dict[str, Any]:
  with make_manager(workdir, read_only=True, asynchronous=False) as manager:
    return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]


def load_init_modules(init: InitSpec, abstract_params: dict[str, Any]
                   ) -> dict[str, Any] | None:
  """The params a fresh run starts from, per ``config.init``: None for a random start.

  ``init.checkpoint`` (a workdir): whichever top-level modules it holds, e.g. all of
  them from an earlier stage, or the ViT and the LLM (no projector) from
  ``python -m tokenflex_jax.convert``. ``init.vision_checkpoint`` (a workdir of
  ``pretrain_vision``): its ViT only. Loaded onto the shardings of ``abstract_params``.
  """
  if init.checkpoint:
    saved = set(saved_modules(init.checkpoint)) & set(abstract_params)
    if not saved:
      raise CheckpointMismatchError(f"config.init.checkpoint={init.checkpoint!r} holds none "
                                    f"of the modules {sorted(abstract_params)}")
    params, step = load_params(init.checkpoint, {k: abstract_params[k] for k in sorted(saved)})
    fresh = sorted(set(abstract_params) - saved)
    logging.info("initialised %s from %s (step %d)%s", ", ".join(sorted(saved)),
                 init.checkpoint, step, f"; {', '.join(fresh)} freshly initialised" if fresh
                 else "")
    return params
  if init.vision_checkpoint:
    params, step = load_params(init.vision_checkpoint, {"vit": abstract_params["vit"]})
    logging.info("initialised the ViT from %s (step %d)", init.vision_checkpoint, step)
    return params
  return None
