"""Hugging Face checkpoints <-> this project's ViT and LLM parameters.

Reads a local Hugging Face model directory (``config.json`` plus ``model.safetensors``,
or shards listed in ``model.safetensors.index.json``) with the real ``safetensors``
reader, one tensor at a time, and maps it onto the parameter trees of
`models.vit.ViT` and `models.llm.LLM`:

  * vision: SigLIP vision towers (``SiglipVisionModel``, or the ``vision_model`` of a
    full ``SiglipModel``; SigLIP2's fixed-resolution checkpoints use the same layout);
  * vision: SigLIP2 NaFlex towers (``Siglip2VisionModel``, or a full ``Siglip2Model``'s):
    the patch Linear becomes the patch convolution, the ``num_patches`` position table
    our learned position embedding (resized at import if asked for another grid);
  * language: Qwen2 / Qwen2.5 and Llama (grouped-query attention, optional q/k/v bias,
    tied or untied embeddings, RoPE theta, "linear" and "llama3" RoPE scaling).

Layout conventions. Torch ``Linear`` weights are ``[out, in]``; ours are ``[in, out]``,
with attention projections split per head: q/k/v ``[D, H, Dh]``, output ``[H, Dh, D]``.
The patch convolution is ``[C, 3, p, p]`` in torch (SigLIP2: a Linear ``[C, p*p*3]`` over
patches flattened row, column, channel) and ``[p, p, 3, C]`` (HWIO) here. Export applies
the inverse maps, so import -> export is bit-exact. Per-layer weights are stacked on a
leading layer axis (``vit/blocks/...`` and ``llm/layers/...``, [depth, ...]), as the
models' layer stacks read them: one Hugging Face tensor name per layer becomes one slice.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tokenflex_jax.errors import MissingInputError
from tokenflex_jax.models.llm import ROPE_TYPES, LLMConfig
from tokenflex_jax.models.projector import ProjectorConfig
from tokenflex_jax.models.vit import ViTConfig
from tokenflex_jax.models.vlm import VLMConfig

Params = dict[str, Any]
# Receives each converted tensor (its path in the params tree, the array) and returns
# what to store: the array itself, or e.g. a sharded jax.Array made from it.
Place = Callable[[tuple[str, ...], np.ndarray], Any]
SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"
WIDENED = ("bfloat16", "float16")  # tensor dtypes read as float32
EXPORT_DTYPES = ("float32", "bfloat16")  # what an export writes (float32: bit-exact)
SHARD_BYTES = 5 * 2**30  # the largest file an export writes (transformers' usual shard)


# --- Reading and writing checkpoint directories ---------------------------------------

def read_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise MissingInputError(f"{path} not found: not a Hugging Face model directory")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class TensorReader:
  """Reads named tensors from a single-file or sharded safetensors checkpoint; bfloat16
  and float16 tensors come back as float32 (exactly)."""

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, INDEX)
    if os.path.exists(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    else:
      single = os.path.join(hf_dir, SAFETENSORS)
      if not os.path.exists(single):
        raise MissingInputError(f"neither {SAFETENSORS} nor {INDEX} in {hf_dir}")
      with safe_open(single, framework="numpy") as f:
        self.files = {name: single for name in f.keys()}
    self.hf_dir = hf_dir

  def names(self) -> list[str]:
    return sorted(self.files)

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def __call__(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise KeyError(f"tensor {name!r} not in the checkpoint at {self.hf_dir}")
    with safe_open(self.files[name], framework="numpy") as f:
      tensor = f.get_tensor(name)
    # Released checkpoints are mostly bfloat16; parameters here are float32 (the compute
    # dtype is a config field): 16-bit floats widen exactly.
    return tensor.astype(np.float32) if tensor.dtype.name in WIDENED else tensor


def write_checkpoint(hf_dir: str, config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray], dtype: str = "float32",
                     shard_bytes: int = SHARD_BYTES) -> None:
  """Writes ``config.json`` (its and its sub-configs' ``torch_dtype`` set to ``dtype``) and
  the tensors in ``dtype`` (`EXPORT_DTYPES`; float32 ones narrowed to bfloat16 if asked):
  ``model.safetensors``, or, above ``shard_bytes``, shards
  ``model-0000i-of-0000n.safetensors`` of at most that size (a larger tensor alone) and
  ``model.safetensors.index.json``, as transformers writes them. Weight files an earlier
  export left in ``hf_dir`` are removed first."""
  if dtype not in EXPORT_DTYPES:
    raise ValueError(f"export dtype must be one of {EXPORT_DTYPES}, got {dtype!r}")
  os.makedirs(hf_dir, exist_ok=True)
  for name in os.listdir(hf_dir):
    if name in (SAFETENSORS, INDEX) or re.fullmatch(r"model-\d+-of-\d+\.safetensors", name):
      os.remove(os.path.join(hf_dir, name))
  with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(_with_dtype(config, dtype), f, indent=2)
  target = lambda x: jnp.bfloat16 if dtype == "bfloat16" and x.dtype == np.float32 else x.dtype
  names = list(tensors)
  shards = shard_plan([int(np.size(tensors[n])) * np.dtype(target(tensors[n])).itemsize
                       for n in names], shard_bytes)
  files = ([SAFETENSORS] if len(shards) == 1 else
           [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
  weight_map, total = {}, 0
  for file, shard in zip(files, shards):  # one shard's converted copy at a time
    arrays = {names[i]: np.ascontiguousarray(np.asarray(tensors[names[i]]).astype(
        target(tensors[names[i]]), copy=False)) for i in shard}
    save_file(arrays, os.path.join(hf_dir, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in arrays})
    total += sum(x.nbytes for x in arrays.values())
  if len(shards) > 1:
    with open(os.path.join(hf_dir, INDEX), "w", encoding="utf-8") as f:
      json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)


def shard_plan(sizes: list[int], limit: int) -> list[list[int]]:
  """Consecutive groups of the indices of ``sizes`` (bytes), each at most ``limit`` bytes
  in all, except a single item larger than it (one group, at least, even when empty)."""
  groups: list[list[int]] = [[]]
  size = 0
  for i, n in enumerate(sizes):
    if groups[-1] and size + n > limit:
      groups.append([])
      size = 0
    groups[-1].append(i)
    size += n
  return groups


def _with_dtype(config: Mapping[str, Any], dtype: str) -> dict[str, Any]:
  """``config`` with ``torch_dtype`` = ``dtype`` at its top level and in its sub-configs."""
  out = {k: _with_dtype(v, dtype) if isinstance(v, Mapping) and "torch_dtype" in v else v
         for k, v in config.items()}
  return {**out, "torch_dtype": dtype}


def _build(loaders: list[tuple[tuple[str, ...], Callable[[], np.ndarray]]],
           place: Place) -> Params:
  """Reads, converts and places one parameter at a time (a per-layer weight: all its
  layers, stacked) into a nested params dict."""
  params: Params = {}
  for path, load in loaders:
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = place(path, np.ascontiguousarray(load()))
  return params


def _stacked(name: str, depth: int,
             layer: Callable[[int], list[tuple[tuple[str, ...], Callable[[], np.ndarray]]]]
             ) -> list[tuple[tuple[str, ...], Callable[[], np.ndarray]]]:
  """Loaders of the stacked per-layer weights under ``name``, [depth, ...]: one per
  parameter, each reading that parameter of every layer (``layer(i)`` lists layer i's
  (path within the layer, loader) pairs)."""
  per_layer = [layer(i) for i in range(depth)]
  return [((name,) + path,
           lambda k=k: np.stack([per_layer[i][k][1]() for i in range(depth)]))
          for k, (path, _) in enumerate(per_layer[0])]


def _unstacked(stack: Params, depth: int) -> list[Params]:
  """The per-layer param dicts (numpy) of a stacked subtree [depth, ...]."""
  host = jax.tree.map(np.asarray, stack)
  return [jax.tree.map(lambda a, i=i: a[i], host) for i in range(depth)]


# --- Layout maps (torch -> ours; each has an exact inverse) ----------------------------

def _linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> kernel [in, out]."""
  return np.ascontiguousarray(w.T)


def _heads_in(w: np.ndarray, heads: int) -> np.ndarray:
  """q/k/v weight [H*Dh, D] -> [D, H, Dh]."""
  return np.ascontiguousarray(w.T.reshape(w.shape[1], heads, -1))


def _heads_out(w: np.ndarray, heads: int) -> np.ndarray:
  """output weight [D, H*Dh] -> [H, Dh, D]."""
  return np.ascontiguousarray(w.T.reshape(heads, -1, w.shape[0]))


def _unheads_in(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)


def _unheads_out(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)


# --- Vision: SigLIP and SigLIP2 -------------------------------------------------------

SIGLIP_TYPES = ("siglip_vision_model", "siglip")
SIGLIP2_TYPES = ("siglip2_vision_model", "siglip2")
VISION_TYPES = SIGLIP_TYPES + SIGLIP2_TYPES


def _vision_section(config: Mapping[str, Any]) -> tuple[dict[str, Any], str]:
  """(the vision tower's config, its model_type) from a vision or a full model config."""
  cfg = dict(config.get("vision_config", config))
  default = "siglip2_vision_model" if config.get("model_type") in SIGLIP2_TYPES else (
      "siglip_vision_model")
  model_type = cfg.get("model_type", default)
  if model_type not in VISION_TYPES:
    raise ValueError(f"config.json: model_type={model_type!r} is not a supported vision "
                     f"tower {VISION_TYPES}")
  return cfg, model_type


def _siglip2_grid(cfg: Mapping[str, Any]) -> int:
  """Side of SigLIP2's square position table (``num_patches`` = side * side)."""
  num_patches = int(cfg.get("num_patches", 256))
  side = int(round(np.sqrt(num_patches)))
  if side * side != num_patches:
    raise ValueError(f"config.json: vision num_patches={num_patches} is not a square number; "
                     f"SigLIP2's position table must form a square grid")
  return side


def vision_config_from_hf(config: Mapping[str, Any], image_size: int | None = None
                          ) -> ViTConfig:
  """ViTConfig from a SigLIP / SigLIP2 ``config.json`` (a vision config or a full model's).

  SigLIP: ``image_size`` is the checkpoint's. SigLIP2 NaFlex (``Siglip2VisionModel``) has
  no image size, only a ``num_patches`` position table forming a sqrt(num_patches) square
  grid; we take ``image_size = sqrt(num_patches) * patch_size`` (e.g. 256 patches of 16
  px -> 256 px), the resolution at which that table is used unresized. ``image_size``
  overrides that for SigLIP2 (see `import_vision`); SigLIP accepts only its own.
  """
  cfg, model_type = _vision_section(config)
  act = cfg.get("hidden_act", "gelu_pytorch_tanh")
  if act not in ("gelu_pytorch_tanh", "gelu_new"):
    raise ValueError(f"config.json: vision hidden_act={act!r} is not supported (only "
                     f"tanh-approximated GELU)")
  if cfg.get("num_channels", 3) != 3:
    raise ValueError(f"config.json: vision num_channels={cfg['num_channels']} is not "
                     f"supported (RGB only)")
  patch = cfg["patch_size"]
  if model_type in SIGLIP2_TYPES:
    native = _siglip2_grid(cfg) * patch
  else:
    native = cfg["image_size"]
    if image_size not in (None, native):
      raise ValueError(f"image_size={image_size} differs from the SigLIP checkpoint's "
                       f"image_size={native} (config.json); resizing at import is "
                       f"implemented for SigLIP2 only")
  return ViTConfig(image_size=image_size or native, patch_size=patch,
                   width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
                   mlp_dim=cfg["intermediate_size"], num_heads=cfg["num_attention_heads"],
                   layer_norm_eps=cfg.get("layer_norm_eps", 1e-6))


def _vision_prefix(reader: TensorReader) -> str:
  for prefix in ("vision_model.vision_model.", "vision_model.", "model.vision_model.", ""):
    if f"{prefix}embeddings.patch_embedding.weight" in reader:
      return prefix
  raise KeyError(f"no SigLIP vision tower (embeddings.patch_embedding.weight) in "
                 f"{reader.hf_dir}")


def antialiased_bilinear_weights(source: int, target: int) -> np.ndarray:
  """[target, source] row weights of ``F.interpolate(mode="bilinear",
  align_corners=False, antialias=True)`` along one axis, as SigLIP2 computes them."""
  scale = source / target
  support = max(scale, 1.0)
  center = (np.arange(target) + 0.5) * scale - 0.5
  weights = np.clip(1 - np.abs(np.arange(source)[None, :] - center[:, None]) / support, 0, None)
  return weights / weights.sum(-1, keepdims=True)


def resize_siglip2_posemb(table: np.ndarray, side: int) -> np.ndarray:
  """SigLIP2's position-table resize. [n*n, C] (row-major n x n grid) -> [side*side, C].

  Same weights as Hugging Face's ``Siglip2VisionEmbeddings.resize_positional_embeddings``
  (bilinear, align_corners=False, antialias=True), summed in float64 and rounded to the
  table's dtype once; it agrees with Hugging Face's float32 sums to ~1e-6 relative.
  """
  old = int(round(np.sqrt(table.shape[0])))
  if old == side:
    return table
  weights = antialiased_bilinear_weights(old, side)  # [side, old]
  grid = table.astype(np.float64).reshape(old, old, -1)
  resized = np.einsum("ah,bw,hwc->abc", weights, weights, grid)
  return resized.reshape(side * side, -1).astype(table.dtype)


def _patch_kernel(weight: np.ndarray, siglip2: bool, patch: int, where: str) -> np.ndarray:
  """HF patch embedding -> our conv kernel [p, p, 3, C].

  SigLIP: a Conv2d weight [C, 3, p, p]. SigLIP2: a Linear weight [C, p*p*3] over patches
  flattened (row, column, channel), as ``convert_image_to_patches`` lays them out.
  """
  if siglip2:
    if weight.ndim != 2 or weight.shape[1] != patch * patch * 3:
      raise ValueError(f"{where}: SigLIP2 expects a Linear weight [C, {patch * patch * 3}], "
                       f"got {weight.shape}")
    return weight.reshape(weight.shape[0], patch, patch, 3).transpose(1, 2, 3, 0)
  if weight.ndim != 4:
    raise ValueError(f"{where}: SigLIP expects a Conv2d weight [C, 3, p, p], got "
                     f"{weight.shape}; is config.json's model_type right?")
  return weight.transpose(2, 3, 1, 0)


def import_vision(hf_dir: str, place: Place = lambda path, x: x,
                  image_size: int | None = None) -> tuple[ViTConfig, Params]:
  """(config, params) such that ``ViT(config).apply({"params": params}, images_nhwc)``
  equals the tower's ``last_hidden_state`` (images in [-1, 1]).

  SigLIP: for images of the checkpoint's ``image_size``. SigLIP2 NaFlex: for square
  images of ``config.image_size`` (see `vision_config_from_hf`), i.e. what
  ``Siglip2VisionModel`` returns on that image patchified with ``spatial_shapes``
  [side, side] and no padding. By default the grid equals the checkpoint's position
  table and the import is exact. With another ``image_size`` the table is resized here,
  once, with SigLIP2's own antialiased bilinear weights (`resize_siglip2_posemb`), so the
  output matches Hugging Face at that resolution to ~1e-6 relative (float32 rounding of
  the resize), and exporting writes the resized table.

  ``place(path, array)`` receives each converted tensor as it is read (e.g. to put it on
  devices with its sharding), so the host holds one parameter (all its layers) at a
  time.
  """
  hf_config = read_config(hf_dir)
  config = vision_config_from_hf(hf_config, image_size)
  siglip2 = _vision_section(hf_config)[1] in SIGLIP2_TYPES
  reader = TensorReader(hf_dir)
  prefix = _vision_prefix(reader)
  get = lambda name: reader(prefix + name)
  heads, patch = config.num_heads, config.patch_size
  kernel_name = f"{hf_dir}: {prefix}embeddings.patch_embedding.weight"

  def posemb() -> np.ndarray:
    table = get("embeddings.position_embedding.weight")
    return (resize_siglip2_posemb(table, config.grid_side) if siglip2 else table)[None]

  loaders: list[tuple[tuple[str, ...], Callable[[], np.ndarray]]] = [
      (("patch_embed", "kernel"), lambda: _patch_kernel(
          get("embeddings.patch_embedding.weight"), siglip2, patch, kernel_name)),
      (("patch_embed", "bias"), lambda: get("embeddings.patch_embedding.bias")),
      (("pos_embedding",), posemb),
      (("ln_final", "scale"), lambda: get("post_layernorm.weight")),
      (("ln_final", "bias"), lambda: get("post_layernorm.bias")),
  ]
  def block(i: int) -> list[tuple[tuple[str, ...], Callable[[], np.ndarray]]]:
    pre, out = f"encoder.layers.{i}.", []
    for n in ("q", "k", "v"):
      out += [
          ((n, "kernel"), lambda n=n: _heads_in(get(f"{pre}self_attn.{n}_proj.weight"), heads)),
          ((n, "bias"), lambda n=n: get(f"{pre}self_attn.{n}_proj.bias").reshape(heads, -1))]
    out += [
        (("out", "kernel"), lambda: _heads_out(get(f"{pre}self_attn.out_proj.weight"), heads)),
        (("out", "bias"), lambda: get(f"{pre}self_attn.out_proj.bias"))]
    for ours, theirs in (("ln_attn", "layer_norm1"), ("ln_mlp", "layer_norm2")):
      out += [((ours, "scale"), lambda t=theirs: get(f"{pre}{t}.weight")),
              ((ours, "bias"), lambda t=theirs: get(f"{pre}{t}.bias"))]
    for n in ("fc1", "fc2"):
      out += [((n, "kernel"), lambda n=n: _linear(get(f"{pre}mlp.{n}.weight"))),
              ((n, "bias"), lambda n=n: get(f"{pre}mlp.{n}.bias"))]
    return out
  loaders += _stacked("blocks", config.depth, block)
  return config, _build(loaders, place)


VISION_EXPORT_TYPES = ("siglip_vision_model", "siglip2_vision_model")


def export_vision(config: ViTConfig, params: Params, hf_dir: str,
                  model_type: str = "siglip_vision_model", dtype: str = "float32") -> None:
  """Writes a ``SiglipVisionModel`` or (``model_type="siglip2_vision_model"``) a NaFlex
  ``Siglip2VisionModel`` directory, without pooling head, from our ViT params
  (`vision_tensors`), in ``dtype`` (`write_checkpoint`)."""
  write_checkpoint(hf_dir, *vision_tensors(config, params, model_type), dtype=dtype)


def vision_tensors(config: ViTConfig, params: Params, model_type: str = "siglip_vision_model"
                   ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json, tensors) of the tower as Hugging Face names it (no prefix).

  SigLIP2's position table is ours as is (grid_side * grid_side entries, so
  ``num_patches = grid_side ** 2``), and its patch Linear is our kernel flattened
  (row, column, channel): importing a SigLIP2 checkpoint and exporting it back is
  bit-exact when the import did not resize.
  """
  if model_type not in VISION_EXPORT_TYPES:
    raise ValueError(f"model_type must be one of {VISION_EXPORT_TYPES}, got {model_type!r}")
  p = lambda x: np.asarray(x)
  kernel = p(params["patch_embed"]["kernel"])  # [p, p, 3, C]
  siglip2 = model_type == "siglip2_vision_model"
  tensors = {
      "embeddings.patch_embedding.weight": (
          kernel.transpose(3, 0, 1, 2).reshape(kernel.shape[-1], -1) if siglip2
          else kernel.transpose(3, 2, 0, 1)),
      "embeddings.patch_embedding.bias": p(params["patch_embed"]["bias"]),
      "embeddings.position_embedding.weight": p(params["pos_embedding"])[0],
      "post_layernorm.weight": p(params["ln_final"]["scale"]),
      "post_layernorm.bias": p(params["ln_final"]["bias"]),
  }
  for i, block in enumerate(_unstacked(params["blocks"], config.depth)):
    pre = f"encoder.layers.{i}."
    for n in ("q", "k", "v"):
      tensors[f"{pre}self_attn.{n}_proj.weight"] = _unheads_in(block[n]["kernel"])
      tensors[f"{pre}self_attn.{n}_proj.bias"] = block[n]["bias"].reshape(-1)
    tensors[f"{pre}self_attn.out_proj.weight"] = _unheads_out(block["out"]["kernel"])
    tensors[f"{pre}self_attn.out_proj.bias"] = block["out"]["bias"]
    for ours, theirs in (("ln_attn", "layer_norm1"), ("ln_mlp", "layer_norm2")):
      tensors[f"{pre}{theirs}.weight"] = block[ours]["scale"]
      tensors[f"{pre}{theirs}.bias"] = block[ours]["bias"]
    for n in ("fc1", "fc2"):
      tensors[f"{pre}mlp.{n}.weight"] = _linear(block[n]["kernel"])
      tensors[f"{pre}mlp.{n}.bias"] = block[n]["bias"]
  hf_config = {
      "architectures": ["Siglip2VisionModel" if siglip2 else "SiglipVisionModel"],
      "model_type": model_type, "patch_size": config.patch_size,
      "hidden_size": config.width, "num_hidden_layers": config.depth,
      "intermediate_size": config.mlp_dim, "num_attention_heads": config.num_heads,
      "layer_norm_eps": config.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh",
      "num_channels": 3, "vision_use_head": False, "torch_dtype": "float32",
  }
  if siglip2:
    hf_config["num_patches"] = config.grid_side ** 2
  else:
    hf_config["image_size"] = config.image_size
  return hf_config, tensors


# --- Language: Qwen2 / Llama -----------------------------------------------------------

LLM_TYPES = ("qwen2", "llama")
# max_position_embeddings when a config.json has none (LLMConfig's default).
DEFAULT_MAX_POSITIONS = 32768


def _rope_theta(cfg: Mapping[str, Any]) -> float:
  if "rope_theta" in cfg:
    return float(cfg["rope_theta"])
  return float((cfg.get("rope_parameters") or {}).get("rope_theta", 10_000.0))


def _rope_scaling_fields(cfg: Mapping[str, Any]) -> dict[str, Any]:
  """The LLMConfig ``rope_*`` fields for a config's RoPE scaling.

  Reads ``rope_scaling`` (config.json files written before transformers 5) or else
  ``rope_parameters`` (transformers >= 5, which folds rope_theta in). Supports
  ``rope_type`` (or the older ``type``) "default", "linear" and "llama3"; raises a
  ValueError naming the field for anything else.
  """
  field = "rope_scaling" if cfg.get("rope_scaling") else "rope_parameters"
  scaling = cfg.get(field) or {}
  if any(isinstance(v, Mapping) for v in scaling.values()):
    raise ValueError(f"config.json: per-layer-type {field} is not supported")
  if float(scaling.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0))) != 1:
    raise ValueError("config.json: partial_rotary_factor != 1 is not supported")
  key = "rope_type" if "rope_type" in scaling else "type"
  rope_type = scaling.get(key) or "default"
  if rope_type not in ROPE_TYPES:
    raise ValueError(f"config.json: rope_scaling type {rope_type!r} (field {field}.{key}) "
                     f"is not supported; only {ROPE_TYPES}")
  if rope_type == "default":
    return {}

  def need(key: str) -> Any:
    if key not in scaling:
      raise ValueError(f"config.json: {field}.{key} is missing for rope_type {rope_type!r}")
    return scaling[key]

  fields = {"rope_type": rope_type, "rope_factor": float(need("factor"))}
  if rope_type == "llama3":
    # As transformers: a top-level original_max_position_embeddings wins, then the one in
    # the scaling dict, then max_position_embeddings.
    original = cfg.get("original_max_position_embeddings",
                       scaling.get("original_max_position_embeddings",
                                   cfg.get("max_position_embeddings")))
    if original is None:
      raise ValueError(f"config.json: {field}.original_max_position_embeddings is missing "
                       f"for rope_type 'llama3'")
    fields.update(rope_low_freq_factor=float(need("low_freq_factor")),
                  rope_high_freq_factor=float(need("high_freq_factor")),
                  rope_original_max_positions=int(original))
  return fields


def _rope_scaling_json(config: LLMConfig) -> dict[str, Any] | None:
  """The inverse of `_rope_scaling_fields`: config.json's ``rope_scaling``, or None."""
  if config.rope_type == "default":
    return None
  scaling = {"rope_type": config.rope_type, "factor": config.rope_factor}
  if config.rope_type == "llama3":
    scaling.update(low_freq_factor=config.rope_low_freq_factor,
                   high_freq_factor=config.rope_high_freq_factor,
                   original_max_position_embeddings=config.rope_original_max_positions)
  return scaling


def llm_config_from_hf(config: Mapping[str, Any]) -> LLMConfig:
  """LLMConfig from a Qwen2 / Llama ``config.json`` (or a VLM's ``text_config``)."""
  cfg = config.get("text_config", config.get("llm_config", config))
  model_type = cfg.get("model_type", "")
  if model_type not in LLM_TYPES:
    raise ValueError(f"model_type={model_type!r} is not one of the supported LLM families "
                     f"{LLM_TYPES}")
  rope = _rope_scaling_fields(cfg)
  if cfg.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={cfg['hidden_act']!r}: only SwiGLU (silu) MLPs are supported")
  heads = cfg["num_attention_heads"]
  head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
  if model_type == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
    raise ValueError("Llama attention_bias/mlp_bias=True (biases on o_proj and the MLP too) "
                     "is not supported; Qwen2's q/k/v-only biases are")
  bias = model_type == "qwen2"
  return LLMConfig(vocab_size=cfg["vocab_size"], width=cfg["hidden_size"],
                   depth=cfg["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=cfg.get("num_key_value_heads", heads), head_dim=head_dim,
                   mlp_dim=cfg["intermediate_size"], rope_theta=_rope_theta(cfg),
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), qkv_bias=bias,
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                   max_positions=int(cfg.get("max_position_embeddings", DEFAULT_MAX_POSITIONS)),
                   **rope)


def _llm_prefix(reader: TensorReader) -> str:
  for prefix in ("model.", "model.language_model.", "language_model.model."):
    if f"{prefix}embed_tokens.weight" in reader:
      return prefix
  raise KeyError(f"no decoder (model.embed_tokens.weight) in {reader.hf_dir}")


def import_llm(hf_dir: str, place: Place = lambda path, x: x) -> tuple[LLMConfig, Params]:
  """(config, params) such that ``LLM(config).apply({"params": params}, token_ids)``
  equals the Hugging Face causal LM's logits. ``place`` as in `import_vision`."""
  config = llm_config_from_hf(read_config(hf_dir))
  reader = TensorReader(hf_dir)
  prefix = _llm_prefix(reader)
  get = lambda name: reader(prefix + name)
  loaders: list[tuple[tuple[str, ...], Callable[[], np.ndarray]]] = [
      (("embedding",), lambda: get("embed_tokens.weight")),
      (("final_norm", "scale"), lambda: get("norm.weight"))]
  if not config.tie_embeddings:
    head = "" if prefix == "model." else prefix.replace("model.", "", 1)
    loaders.append((("lm_head", "kernel"), lambda: _linear(reader(f"{head}lm_head.weight"))))
  def layer(i: int) -> list[tuple[tuple[str, ...], Callable[[], np.ndarray]]]:
    pre, out = f"layers.{i}.", []
    for n, heads in (("q", config.num_heads), ("k", config.num_kv_heads),
                     ("v", config.num_kv_heads)):
      out.append((("attn", n, "kernel"), lambda n=n, h=heads: _heads_in(
          get(f"{pre}self_attn.{n}_proj.weight"), h)))
      if config.qkv_bias:
        out.append((("attn", n, "bias"), lambda n=n, h=heads: get(
            f"{pre}self_attn.{n}_proj.bias").reshape(h, -1)))
    out += [
        (("attn", "o", "kernel"), lambda: _heads_out(get(f"{pre}self_attn.o_proj.weight"),
                                                     config.num_heads)),
        (("attn_norm", "scale"), lambda: get(f"{pre}input_layernorm.weight")),
        (("mlp_norm", "scale"), lambda: get(f"{pre}post_attention_layernorm.weight"))]
    for n in ("gate", "up", "down"):
      out.append((("mlp", n, "kernel"), lambda n=n: _linear(get(f"{pre}mlp.{n}_proj.weight"))))
    return out
  loaders += _stacked("layers", config.depth, layer)
  return config, _build(loaders, place)


def export_llm(config: LLMConfig, params: Params, hf_dir: str, model_type: str = "qwen2",
               dtype: str = "float32") -> None:
  """Writes a Qwen2 or Llama ``*ForCausalLM`` directory from our LLM params
  (`llm_tensors`), in ``dtype`` (`write_checkpoint`)."""
  write_checkpoint(hf_dir, *llm_tensors(config, params, model_type), dtype=dtype)


def llm_tensors(config: LLMConfig, params: Params, model_type: str = "qwen2"
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json, tensors) of a Qwen2 or Llama ``*ForCausalLM``, its
  ``max_position_embeddings`` the config's ``max_positions`` (the source's, from import)."""
  if model_type not in LLM_TYPES:
    raise ValueError(f"model_type must be one of {LLM_TYPES}, got {model_type!r}")
  if model_type == "qwen2" and not config.qkv_bias:
    raise ValueError("Qwen2 always has q/k/v biases; export a bias-free LLM as 'llama'")
  p = lambda x: np.asarray(x)
  tensors = {"model.embed_tokens.weight": p(params["embedding"]),
             "model.norm.weight": p(params["final_norm"]["scale"])}
  if not config.tie_embeddings:
    tensors["lm_head.weight"] = _linear(p(params["lm_head"]["kernel"]))
  for i, layer in enumerate(_unstacked(params["layers"], config.depth)):
    pre = f"model.layers.{i}."
    for n in ("q", "k", "v"):
      tensors[f"{pre}self_attn.{n}_proj.weight"] = _unheads_in(layer["attn"][n]["kernel"])
      if config.qkv_bias:
        tensors[f"{pre}self_attn.{n}_proj.bias"] = layer["attn"][n]["bias"].reshape(-1)
    tensors[f"{pre}self_attn.o_proj.weight"] = _unheads_out(layer["attn"]["o"]["kernel"])
    tensors[f"{pre}input_layernorm.weight"] = layer["attn_norm"]["scale"]
    tensors[f"{pre}post_attention_layernorm.weight"] = layer["mlp_norm"]["scale"]
    for n in ("gate", "up", "down"):
      tensors[f"{pre}mlp.{n}_proj.weight"] = _linear(layer["mlp"][n]["kernel"])
  hf_config = {
      "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
      "model_type": model_type, "vocab_size": config.vocab_size,
      "hidden_size": config.width, "num_hidden_layers": config.depth,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "intermediate_size": config.mlp_dim,
      "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
      "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
      "max_position_embeddings": config.max_positions, "torch_dtype": "float32",
  }
  if model_type == "llama":
    hf_config.update(attention_bias=config.qkv_bias, mlp_bias=False)
  scaling = _rope_scaling_json(config)
  if scaling is not None:
    hf_config["rope_scaling"] = scaling
  return hf_config, tensors


# --- The whole VLM: a folder transformers loads (hf_remote/modeling_tokenflex.py) -------

VLM_MODEL_TYPE = "tokenflex"
VISION_PREFIX = "vision_model.vision_model."   # a SiglipVisionModel at .vision_model
LLM_PREFIX = "language_model."                 # a *ForCausalLM at .language_model
PROJECTOR_PREFIX = "projector."


def vlm_tensors(config: VLMConfig, params: Params, llm_type: str
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(the config.json fields of the model's shapes, tensors) of the whole VLM as
  `TokenFlexForConditionalGeneration` names them (Ristretto's names: ``vision_model.``,
  ``projector.mlp.``, ``language_model.``). The caller adds the serving fields
  (``num_image_token``, ``auto_map``...)."""
  vision_config, vision = vision_tensors(config.vit, params["vit"])
  llm_config, llm = llm_tensors(config.llm, params["llm"], llm_type)
  proj, pcfg = params["projector"], config.projector
  p = lambda x: np.asarray(x)
  tensors = {VISION_PREFIX + k: v for k, v in vision.items()}
  tensors.update({LLM_PREFIX + k: v for k, v in llm.items()})
  mlp = {"projector.mlp.layernorm.weight": p(proj["norm"]["scale"]),
         "projector.mlp.layernorm.bias": p(proj["norm"]["bias"])}
  if pcfg.mlp == "swiglu":
    for ours, theirs in (("gate", "f1"), ("up", "f2"), ("down", "g")):
      mlp[f"projector.mlp.{theirs}.weight"] = _linear(p(proj["mlp"][ours]["kernel"]))
  else:
    for n in ("fc1", "fc2"):
      mlp[f"projector.mlp.{n}.weight"] = _linear(p(proj["mlp"][n]["kernel"]))
      mlp[f"projector.mlp.{n}.bias"] = p(proj["mlp"][n]["bias"])
  if pcfg.position_embedding:
    mlp["projector.pos_embedding"] = p(proj["pos_embedding"])
  tensors.update(mlp)
  hf_config = {
      "architectures": ["TokenFlexForConditionalGeneration"], "model_type": VLM_MODEL_TYPE,
      "vision_config": vision_config, "llm_config": llm_config,
      "image_token_id": config.image_token_id, "pad_token_id": config.pad_token_id,
      "select_layer": -1, "force_image_size": config.vit.image_size,
      "pooling": pcfg.pooling, "projector_mlp": pcfg.mlp, "projector_mlp_ratio": pcfg.mlp_ratio,
      "projector_position_embedding": pcfg.position_embedding,
      "projector_layer_norm_eps": pcfg.layer_norm_eps,
      "visual_position_span": config.visual_position_span,
      "visual_position_layout": config.visual_position_layout,
      "tie_word_embeddings": config.llm.tie_embeddings, "torch_dtype": "float32"}
  return hf_config, tensors


def vlm_config_from_hf(config: Mapping[str, Any]) -> VLMConfig:
  """The VLMConfig of a TokenFLEX folder's ``config.json`` (`vlm_tensors`' fields)."""
  if config.get("model_type") != VLM_MODEL_TYPE:
    raise ValueError(f"config.json: model_type={config.get('model_type')!r} is not a "
                     f"TokenFLEX export ({VLM_MODEL_TYPE!r})")
  if config.get("select_layer", -1) != -1:
    raise ValueError(f"config.json: select_layer={config['select_layer']}: only the last "
                     "layer's features (-1) are supported")
  projector = ProjectorConfig(
      pooling=config.get("pooling", "adaptive_avg"), mlp=config.get("projector_mlp", "swiglu"),
      mlp_ratio=int(config.get("projector_mlp_ratio", 3)),
      position_embedding=bool(config.get("projector_position_embedding", False)),
      layer_norm_eps=float(config.get("projector_layer_norm_eps", 1e-6)))
  return VLMConfig(vit=vision_config_from_hf(config["vision_config"]), projector=projector,
                   llm=llm_config_from_hf(config["llm_config"]),
                   image_token_id=int(config["image_token_id"]),
                   pad_token_id=int(config.get("pad_token_id") or 0),
                   visual_position_span=int(config.get("visual_position_span", 0)),
                   visual_position_layout=config.get("visual_position_layout", "raster"))


def import_vlm(hf_dir: str, place: Place = lambda path, x: x) -> tuple[VLMConfig, Params]:
  """(config, params {"vit", "projector", "llm"}) of a TokenFLEX folder (written by
  `vlm_tensors`): the inverse of the export, bit-exact. ``place`` as in `import_vision`."""
  config = vlm_config_from_hf(read_config(hf_dir))
  _, vit = import_vision(hf_dir, lambda path, x: place(("vit",) + path, x))
  _, llm = import_llm(hf_dir, lambda path, x: place(("llm",) + path, x))
  reader = TensorReader(hf_dir)
  pcfg = config.projector
  get = lambda name: reader(PROJECTOR_PREFIX + name)
  loaders: list[tuple[tuple[str, ...], Callable[[], np.ndarray]]] = [
      (("norm", "scale"), lambda: get("mlp.layernorm.weight")),
      (("norm", "bias"), lambda: get("mlp.layernorm.bias"))]
  if pcfg.mlp == "swiglu":
    for ours, theirs in (("gate", "f1"), ("up", "f2"), ("down", "g")):
      loaders.append((("mlp", ours, "kernel"), lambda t=theirs: _linear(get(f"mlp.{t}.weight"))))
  else:
    for n in ("fc1", "fc2"):
      loaders += [(("mlp", n, "kernel"), lambda n=n: _linear(get(f"mlp.{n}.weight"))),
                  (("mlp", n, "bias"), lambda n=n: get(f"mlp.{n}.bias"))]
  if pcfg.position_embedding:
    loaders.append((("pos_embedding",), lambda: get("pos_embedding")))
  projector = _build(loaders, lambda path, x: place(("projector",) + path, x))
  return config, {"vit": vit, "projector": projector, "llm": llm}
