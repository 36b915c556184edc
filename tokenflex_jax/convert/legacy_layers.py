"""Checkpoints written before the layers were stacked: detect them, and stack them.

Until the layer stacks (`models.layers.stacked`), each ViT block and LLM layer had its
own subtree (``vit/block_0``, ``vit/block_1``, ..., ``llm/layer_0``, ...). Now one
subtree holds every layer, stacked on a leading axis (``vit/blocks``, ``llm/layers``,
[depth, ...]). `stack` maps the old tree onto the new one exactly (the same numbers,
layer i at index i); ``python -m tokenflex_jax.convert.stack_layers`` applies it to a
workdir's checkpoint.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

# Top-level module -> (the per-layer key prefix of the old tree, the stacked key).
PER_LAYER_KEYS = {"vit": ("block_", "blocks"), "llm": ("layer_", "layers")}


def _layer_index(key: str, prefix: str) -> int | None:
  match = re.fullmatch(re.escape(prefix) + r"(\d+)", key)
  return int(match.group(1)) if match else None


def per_layer_subtrees(tree: Mapping[str, Any]) -> list[str]:
  """The old-layout per-layer keys of a params tree (e.g. ["llm/layer_0", ...]); empty
  for a stacked tree."""
  found = []
  for module, (prefix, _) in PER_LAYER_KEYS.items():
    sub = tree.get(module)
    if isinstance(sub, Mapping):
      found += [f"{module}/{key}" for key in sub if _layer_index(key, prefix) is not None]
  return sorted(found)


def _stack_trees(layers: list[Any]) -> Any:
  if isinstance(layers[0], Mapping):
    keys = set(layers[0])
    for i, layer in enumerate(layers):
      if set(layer) != keys:
        raise ValueError(f"layer {i} has parameters {sorted(layer)}, layer 0 {sorted(keys)}")
    return {k: _stack_trees([layer[k] for layer in layers]) for k in sorted(keys)}
  return np.stack([np.asarray(x) for x in layers])


def stack(tree: Mapping[str, Any]) -> dict[str, Any]:
  """An old-layout params tree -> the stacked layout (numpy leaves). Other subtrees
  (embeddings, norms, heads, the projector) are kept as they are."""
  out = dict(tree)
  for module, (prefix, stacked_key) in PER_LAYER_KEYS.items():
    sub = tree.get(module)
    if not isinstance(sub, Mapping):
      continue
    indices = sorted(i for key in sub if (i := _layer_index(key, prefix)) is not None)
    if not indices:
      continue
    if indices != list(range(len(indices))):
      raise ValueError(f"{module}: per-layer subtrees {indices} are not 0..{len(indices) - 1}")
    kept = {k: v for k, v in sub.items() if _layer_index(k, prefix) is None}
    kept[stacked_key] = _stack_trees([sub[f"{prefix}{i}"] for i in indices])
    out[module] = kept
  return out
