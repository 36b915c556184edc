"""Device mesh and the mapping from logical axis names to mesh axes.

Every parameter and the main activations carry logical axis names (see
`models/`). One rules table (``config.sharding.rules``) maps those names onto the
mesh axes ``("data", "fsdp", "tensor")``; every sharding in the project is derived
from it with `logical_shardings`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

Rules = tuple[tuple[str, Any], ...]

# Rules presets: logical axis -> mesh axes. A config puts one in config.sharding.rules.
# Pure data parallelism: the batch is split over every device, parameters replicated.
DATA_PARALLEL_RULES: Rules = (
    ("batch", ("data", "fsdp", "tensor")),
    ("length", None), ("embed", None), ("mlp", None), ("heads", None), ("kv_heads", None),
    ("head_dim", None), ("vocab", None), ("norm", None), ("classes", None),
)
# FSDP (ZeRO-3 style): the batch over every device, parameters and optimizer moments split
# along their model width over the fsdp axis and gathered per layer when used.
FSDP_RULES: Rules = (
    ("batch", ("data", "fsdp", "tensor")),
    ("length", None), ("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv_heads", None),
    ("head_dim", None), ("vocab", None), ("norm", None), ("classes", None),
)
# FSDP + tensor parallelism (Megatron style): MLP hidden units, attention heads and the
# vocabulary split over the tensor axis; each tensor-parallel group shares its batch.
FSDP_TP_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
    ("kv_heads", "tensor"), ("head_dim", None), ("vocab", "tensor"), ("norm", None),
    ("classes", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; one entry of ``shape`` may be -1 ("the rest")."""
  devices = list(jax.devices() if devices is None else devices)
  shape = list(shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"config.mesh.shape must have {len(MESH_AXES)} entries "
                     f"{MESH_AXES}, got {tuple(shape)}")
  if shape.count(-1) > 1:
    raise ValueError(f"config.mesh.shape may contain at most one -1, got {tuple(shape)}")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if len(devices) % known:
      raise ValueError(f"config.mesh.shape={tuple(shape)}: {len(devices)} devices are "
                       f"not divisible by {known}")
    shape[shape.index(-1)] = len(devices) // known
  if math.prod(shape) != len(devices):
    raise ValueError(f"config.mesh.shape={tuple(shape)} needs {math.prod(shape)} devices, "
                     f"but {len(devices)} are available")
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(tuple(shape), MESH_AXES, axis_types=auto, devices=devices)


def rules_from_config(rules: Sequence[Sequence[Any]]) -> Rules:
  """Normalises the config's rules table (tuples of (logical, mesh axis or axes or None))."""
  out = []
  for entry in rules:
    if len(entry) != 2:
      raise ValueError(f"config.sharding.rules entry {entry!r} is not (logical_name, mesh_axes)")
    name, target = entry
    if isinstance(target, list):
      target = tuple(target)
    for axis in (target if isinstance(target, tuple) else (target,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"config.sharding.rules: {name!r} maps to unknown mesh axis {axis!r}; "
                         f"mesh axes are {MESH_AXES}")
    out.append((name, target))
  return tuple(out)


def _fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh) -> PartitionSpec:
  """Drops mesh axes from dimensions they do not divide (those dims stay replicated)."""
  fitted = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    if axes is None:
      fitted.append(None)
      continue
    axes_tuple = axes if isinstance(axes, tuple) else (axes,)
    kept = []
    for axis in axes_tuple:
      if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
        kept.append(axis)
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*fitted)


def strip_boxes(tree: Any) -> Any:
  """Replaces `nn.LogicallyPartitioned` boxes by their values, without applying the
  sharding constraint that `nn.unbox` adds inside a mesh context."""
  return jax.tree.map(lambda x: x.value if isinstance(x, nn.Partitioned) else x, tree,
                      is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_shardings(abstract_tree: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree of (possibly boxed) abstract arrays.

  Leaves wrapped in `nn.LogicallyPartitioned` are mapped through ``rules``; other
  leaves (step counters, optimizer scalars) are replicated. A mesh axis that does
  not divide a dimension is dropped for that dimension, so tiny demo models and
  huge ones share one rules table.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  unboxed = strip_boxes(abstract_tree)

  def to_sharding(spec, leaf):
    spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
    return NamedSharding(mesh, _fit_spec(spec, np.shape(leaf), mesh))

  return jax.tree.map(to_sharding, mesh_specs, unboxed,
                      is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a host batch array whose leading dimension is the batch."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def describe(shardings: Any) -> str:
  """One line per leaf: its path and partition spec (for logs and golden tests)."""
  lines = []
  for path, sharding in jax.tree_util.tree_flatten_with_path(shardings)[0]:
    lines.append(f"{jax.tree_util.keystr(path)}: {sharding.spec}")
  return "\n".join(lines)


def log_shardings(shardings: Any) -> None:
  for line in describe(shardings).splitlines():
    logging.info("sharding %s", line)


@contextlib.contextmanager
def mesh_rules(mesh: Mesh, rules: Rules):
  """Context in which linen's logical constraints resolve against ``mesh``."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield
