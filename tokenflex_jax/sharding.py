"""Device mesh and the mapping from logical axis names to mesh axes.

Every parameter and the main activations carry logical axis names (see
`models/`). One rules table (``config.sharding.rules``) maps those names onto the
mesh axes ``("data", "fsdp", "tensor")``; every sharding in the project is derived
from it: the parameters' with `logical_shardings` (which logs each mesh axis it has to
drop from a dimension it does not divide), the optimizer state's from the parameters'
with `opt_state_shardings`, and `assert_params_sufficiently_sharded` refuses a mesh on
which a large parameter would end up replicated.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, NamedTuple

import flax.linen as nn
import jax
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tokenflex_jax import errors

if TYPE_CHECKING:  # specs imports the models, which import this module
  from tokenflex_jax.specs import RunSpec

MESH_AXES = ("data", "fsdp", "tensor")

# Parameters of at least this many elements must not end up fully replicated when the
# rules ask to shard them (see `assert_params_sufficiently_sharded`).
MIN_SHARDED_SIZE = 2**20

Rules = tuple[tuple[str, Any], ...]

# Rules presets: logical axis -> mesh axes. A config puts one in config.sharding.rules.
# "layers" is the stacking axis of per-layer weights ([depth, ...]); it stays whole, so
# a rolled loop over the layers reads one layer's slice on every device.
# Pure data parallelism: the batch is split over every device, parameters replicated.
DATA_PARALLEL_RULES: Rules = (
    ("batch", ("data", "fsdp", "tensor")),
    ("length", None), ("embed", None), ("mlp", None), ("heads", None), ("kv_heads", None),
    ("head_dim", None), ("vocab", None), ("norm", None), ("classes", None),
    ("layers", None),
)
# FSDP (ZeRO-3 style): the batch over every device, parameters and optimizer moments split
# along their model width over the fsdp axis and gathered per layer when used.
FSDP_RULES: Rules = (
    ("batch", ("data", "fsdp", "tensor")),
    ("length", None), ("embed", "fsdp"), ("mlp", None), ("heads", None), ("kv_heads", None),
    ("head_dim", None), ("vocab", None), ("norm", None), ("classes", None),
    ("layers", None),
)
# FSDP + tensor parallelism (Megatron style): MLP hidden units, attention heads and the
# vocabulary split over the tensor axis; each tensor-parallel group shares its batch.
FSDP_TP_RULES: Rules = (
    ("batch", ("data", "fsdp")),
    ("length", None), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
    ("kv_heads", "tensor"), ("head_dim", None), ("vocab", "tensor"), ("norm", None),
    ("classes", None), ("layers", None),
)


def resolve_mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """``config.mesh.shape`` with its -1 ("the rest") resolved for ``num_devices``; raises
  `errors.ConfigError` naming the field unless it fits exactly that many devices."""
  given = tuple(shape)
  if len(given) != len(MESH_AXES):
    raise errors.ConfigError(f"config.mesh.shape must have {len(MESH_AXES)} entries "
                             f"{MESH_AXES}, got {given}")
  if given.count(-1) > 1:
    raise errors.ConfigError(f"config.mesh.shape may contain at most one -1, got {given}")
  if any(s < 1 and s != -1 for s in given):
    raise errors.ConfigError(f"config.mesh.shape={given}: every entry must be a positive "
                             "size or -1 (the rest of the devices)")
  resolved = list(given)
  known = math.prod(s for s in given if s != -1)
  if -1 in given:
    if num_devices % known:
      raise errors.ConfigError(f"config.mesh.shape={given}: {num_devices} devices are "
                               f"not divisible by {known}")
    resolved[given.index(-1)] = num_devices // known
  if math.prod(resolved) != num_devices:
    raise errors.ConfigError(f"config.mesh.shape={given} needs {math.prod(resolved)} "
                             f"devices, but {num_devices} are available")
  return tuple(resolved)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Builds a (data, fsdp, tensor) mesh; one entry of ``shape`` may be -1 ("the rest")."""
  devices = list(jax.devices() if devices is None else devices)
  auto = (jax.sharding.AxisType.Auto,) * len(MESH_AXES)
  return jax.make_mesh(resolve_mesh_shape(shape, len(devices)), MESH_AXES, axis_types=auto,
                       devices=devices)


def rules_from_config(rules: Sequence[Sequence[Any]]) -> Rules:
  """Normalises the config's rules table (tuples of (logical, mesh axis or axes or None))."""
  out = []
  for entry in rules:
    if len(entry) != 2:
      raise errors.ConfigError(f"config.sharding.rules entry {entry!r} is not "
                               "(logical_name, mesh_axes)")
    name, target = entry
    if isinstance(target, list):
      target = tuple(target)
    for axis in (target if isinstance(target, tuple) else (target,)):
      if axis is not None and axis not in MESH_AXES:
        raise errors.ConfigError(f"config.sharding.rules: {name!r} maps to unknown mesh "
                                 f"axis {axis!r}; mesh axes are {MESH_AXES}")
    out.append((name, target))
  return tuple(out)


class DroppedAxis(NamedTuple):
  """A mesh axis `fit_spec` left out of a dimension because it does not divide it."""
  dim: int                  # index of the dimension in the array's shape
  dim_size: int             # that dimension's size
  mesh_axis: str            # the mesh axis the rules asked for
  axis_size: int            # its size in the mesh
  after: tuple[str, ...]    # the axes already kept for this dimension, if several

  def describe(self) -> str:
    kept = f" together with {self.after}" if self.after else ""
    return (f"mesh axis {self.mesh_axis!r} (size {self.axis_size}){kept} does not divide "
            f"dim {self.dim} (size {self.dim_size})")


def fit_spec(spec: PartitionSpec, shape: Sequence[int], mesh: Mesh
             ) -> tuple[PartitionSpec, tuple[DroppedAxis, ...]]:
  """Fits a mesh partition spec to an array shape: (fitted spec, the axes it dropped).

  For each dimension of ``shape`` the mesh axes of ``spec`` are kept in order while the
  product of the kept axes' sizes divides the dimension; an axis that would break that
  is dropped for this dimension (which then stays replicated over it). ``spec`` may be
  shorter than ``shape``; the fitted spec has one entry per dimension.
  """
  fitted, dropped = [], []
  for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    if axes is None:
      fitted.append(None)
      continue
    axes_tuple = axes if isinstance(axes, tuple) else (axes,)
    kept = []
    for axis in axes_tuple:
      if dim % (math.prod(mesh.shape[a] for a in kept) * mesh.shape[axis]) == 0:
        kept.append(axis)
      else:
        dropped.append(DroppedAxis(i, int(dim), axis, int(mesh.shape[axis]), tuple(kept)))
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return PartitionSpec(*fitted), tuple(dropped)


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
  huge ones share one rules table. Each drop is logged once per leaf and call, naming
  the leaf's path, the dimension, its size and the mesh axis size: as a warning for
  leaves of at least `MIN_SHARDED_SIZE` elements, whose replicas cost memory, as info
  for smaller ones (a bias over one head, by design).
  Returns a tree of the unboxed structure with a NamedSharding per leaf.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  unboxed = strip_boxes(abstract_tree)

  def to_sharding(path, spec, leaf):
    spec = spec if isinstance(spec, PartitionSpec) else PartitionSpec()
    fitted, dropped = fit_spec(spec, np.shape(leaf), mesh)
    log = logging.warning if math.prod(np.shape(leaf)) >= MIN_SHARDED_SIZE else logging.info
    for d in dropped:
      log("sharding: %s %s: %s, so that dimension is not split over it (the rules ask for "
          "%s)", jax.tree_util.keystr(path), tuple(np.shape(leaf)), d.describe(), spec)
    return NamedSharding(mesh, fitted)

  return jax.tree_util.tree_map_with_path(
      to_sharding, mesh_specs, unboxed,
      is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)


def opt_state_shardings(tx: optax.GradientTransformation, abstract_params: Any,
                        param_shardings: Any, mesh: Mesh) -> Any:
  """NamedShardings for ``tx.init(params)``'s state, derived from the parameters'.

  ``abstract_params``: the (possibly boxed) parameter tree, arrays or ShapeDtypeStructs;
  ``param_shardings``: a NamedSharding per parameter, same tree unboxed. optax's own
  `optax.tree_map_params` finds every copy of the parameter tree inside the state
  (Adam's mu and nu, inside `multi_transform`'s and `masked`'s sub-states): each of its
  leaves takes the sharding of its parameter, and an `optax.MaskedNode` (a parameter of
  another group, for which no state is kept) stays one; every other leaf (counts,
  scalars) is replicated. A parameter-tree leaf whose shape is not its parameter's is
  an error, not a guess. Returns a tree of the structure of
  ``jax.eval_shape(tx.init, params)`` with a NamedSharding per array leaf.
  """
  params = strip_boxes(abstract_params)
  state = jax.eval_shape(tx.init, params)
  paths = jax.tree_util.tree_map_with_path(lambda path, _: jax.tree_util.keystr(path), params)
  rep = NamedSharding(mesh, PartitionSpec())

  def of_param(leaf, param, param_sharding, path):
    if isinstance(leaf, optax.MaskedNode):
      return leaf
    if tuple(np.shape(leaf)) != tuple(np.shape(param)):
      raise ValueError(f"optimizer state leaf for parameter {path} has shape "
                       f"{tuple(np.shape(leaf))}, the parameter {tuple(np.shape(param))}: "
                       "no sharding can be derived for it")
    return param_sharding

  return optax.tree_map_params(tx, of_param, state, params, param_shardings, paths,
                               transform_non_params=lambda _: rep,
                               is_leaf=lambda x: isinstance(x, optax.MaskedNode))


class _Unshardable(NamedTuple):
  path: str
  shape: tuple[int, ...]
  logical: PartitionSpec
  unused: tuple[str, ...]     # the mesh axes asked for and not used, with their dims


def _unsharded_large_params(boxed_params: Any, shardings: Any, mesh: Mesh, rules: Rules,
                            min_size: int) -> list[_Unshardable]:
  """The parameters of at least ``min_size`` elements that are fully replicated although
  the rules map one of their logical axes onto a mesh axis of size > 1; largest first."""
  logical = nn.get_partition_spec(boxed_params)
  unboxed = strip_boxes(boxed_params)
  found = []

  def check(path, names, leaf, sh):
    shape = tuple(int(d) for d in np.shape(leaf))
    if not isinstance(names, PartitionSpec) or math.prod(shape) < min_size:
      return
    if not sh.is_fully_replicated:
      return
    wanted = nn.logical_to_mesh_axes(tuple(names), rules)
    unused = []
    for i, (dim, axes) in enumerate(zip(shape, tuple(wanted))):
      for axis in (() if axes is None else axes if isinstance(axes, tuple) else (axes,)):
        if mesh.shape[axis] > 1:
          unused.append(f"{axis!r} (size {mesh.shape[axis]}) for dim {i} "
                        f"({names[i]!r}, size {dim})")
    if unused:
      found.append(_Unshardable(jax.tree_util.keystr(path), shape, names, tuple(unused)))

  jax.tree_util.tree_map_with_path(
      check, logical, unboxed, shardings,
      is_leaf=lambda x: isinstance(x, PartitionSpec) or x is None)
  return sorted(found, key=lambda u: -math.prod(u.shape))


def assert_params_sufficiently_sharded(boxed_params: Any, shardings: Any, mesh: Mesh,
                                       rules: Rules, min_size: int = MIN_SHARDED_SIZE) -> None:
  """Raises ValueError if a large parameter is fully replicated though it should not be.

  ``boxed_params``: the parameter tree with its `nn.LogicallyPartitioned` boxes
  (abstract or real); ``shardings``: a NamedSharding per parameter (the unboxed tree,
  e.g. from `logical_shardings`). A parameter of at least ``min_size`` elements fails
  when its sharding is fully replicated although ``rules`` map one of its logical axes
  onto a mesh axis of size > 1, i.e. every such axis was dropped because it does not
  divide the dimension. Small parameters, parameters whose rules ask for no sharding
  (or that carry no logical names) and meshes whose parameter axes all have size 1
  pass. The spirit of MaxText's check, without its tolerance: one replicated large
  parameter is already a configuration mistake.

  Why ``min_size`` = 2**20 elements by default: a replicated parameter of that size
  costs 4 MiB per device in float32, 12 MiB with Adam's two moments, small next to any
  accelerator's memory, so below it replication is a fair price for simple rules. The
  bound also falls between the two kinds of tensors of the paper's model: every weight
  matrix is larger (the smallest, a ViT attention kernel 1152 x 16 x 72, has 1,327,104
  elements), while its norms, biases, patch kernel and position embedding are smaller
  (the largest, the 1 x 729 x 1152 position embedding, has 839,808). The demo's largest
  parameter (256 x 96) is far below it, so the demo passes on every mesh.
  """
  bad = _unsharded_large_params(boxed_params, shardings, mesh, rules, min_size)
  if not bad:
    return
  details = "; ".join(f"{u.path} {u.shape} logical {tuple(u.logical)}: "
                      f"{', '.join(u.unused)}" for u in bad[:3])
  more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
  raise errors.ConfigError(
      f"{len(bad)} parameter(s) of >= {min_size} elements are fully replicated on mesh "
      f"{dict(mesh.shape)}: none of the mesh axes the rules ask for divides its dimension: "
      f"{details}{more}. Change config.mesh.shape so that those mesh axes divide the "
      "dimensions, or config.sharding.rules to shard other logical axes.")


def mesh_from_config(config: RunSpec,
                     devices: Sequence[jax.Device] | None = None) -> tuple[Mesh, Rules]:
  """The (data, fsdp, tensor) mesh of ``config.mesh.shape`` over ``devices`` (default:
  all of this run's) and the normalised ``config.sharding.rules``."""
  mesh = make_mesh(tuple(config.mesh.shape), devices)
  rules = rules_from_config(config.sharding.rules)
  logging.info("mesh %s over %d %s devices (%d processes)", dict(mesh.shape), mesh.size,
               mesh.devices.flat[0].device_kind, jax.process_count())
  return mesh, rules


def data_parallel_size(mesh_shape: Mapping[str, int], rules: Rules) -> int:
  """How many ways the rules split a batch over a mesh of ``mesh_shape`` ({axis: size}):
  the product of the sizes of the mesh axes the logical axis "batch" maps onto (1 if
  the rules do not name it)."""
  axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
  axes = () if axes is None else axes if isinstance(axes, tuple) else (axes,)
  return math.prod(int(mesh_shape[a]) for a in axes)


def check_batch_divisible(field: str, batch_size: int, mesh_shape: Mapping[str, int],
                          rules: Rules, num_processes: int = 1) -> None:
  """Raises `errors.ConfigError` naming ``field`` (a global batch size) unless it is
  positive and divisible by the `data_parallel_size` of the mesh and by the processes
  (each feeds an equal share)."""
  ways = data_parallel_size(mesh_shape, rules)
  if batch_size < 1 or batch_size % ways or batch_size % num_processes:
    axes = nn.logical_to_mesh_axes(("batch",), rules)[0]
    processes = f", and of the {num_processes} processes" if num_processes > 1 else ""
    raise errors.ConfigError(
        f"{field}={batch_size} must be a positive multiple of the data-parallel size "
        f"{ways}: config.sharding.rules split \"batch\" over mesh axes {axes} of the mesh "
        f"{dict(mesh_shape)} (config.mesh.shape){processes}")


def batch_sharding(mesh: Mesh, rules: Rules, ndim: int) -> NamedSharding:
  """Sharding of a host batch array whose leading dimension is the batch."""
  spec = nn.logical_to_mesh_axes(("batch",) + (None,) * (ndim - 1), rules)
  return NamedSharding(mesh, spec)


def bytes_per_device(tree: Any) -> int:
  """Bytes one device holds of ``tree``'s arrays (abstract or concrete, each with its
  ``sharding``): every leaf's shard shape times its item size."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
             for x in jax.tree.leaves(tree))


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
