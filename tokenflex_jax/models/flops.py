"""Model FLOPs of a train step from an explicit formula (what MFU is measured against).

Counted: every matmul and attention product, 2 FLOPs per multiply-add; norms,
activations, softmax and the optimizer are left out. The forward pass of one example:
the ViT on the full patch grid (attention over all patches), the projector (the two
pooling matmuls and its MLP) per image slot, the LLM on the T + K (N - 1) merged
positions of a row of T text slots and K image slots (causal attention over the whole
row: each query attends to itself and the positions before it, as the kernels compute
it, whether or not a packed row's conversations mask some of it out) and the output
projection on the T text positions. The backward pass of a trained module costs 2x its
forward (its inputs' and its weights' gradients); a frozen module costs 1x when a
trained module lies before it (the gradient passes through) and nothing otherwise, so
a frozen tower at the input (stage 1's ViT) costs its forward pass only.
Rematerialisation's recomputation is not model FLOPs and is not counted.

XLA's cost analysis counts a loop's body once, so it cannot count scanned layers; the
benchmark compares it with this formula on unrolled layers.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

from tokenflex_jax.models.llm import LLMConfig
from tokenflex_jax.models.projector import ProjectorConfig, token_side
from tokenflex_jax.models.vit import ViTConfig
from tokenflex_jax.models.vlm import VLMConfig



@dataclasses.dataclass(frozen=True)
class Forward:
  """Forward FLOPs of one module for one example: weight matmuls and attention."""
  weights: float
  attention: float = 0.0


def vit_forward(cfg: ViTConfig) -> Forward:
  """The ViT on its full grid: patch embedding, blocks (q, k, v, out, fc1, fc2, and
  full attention over the L patches)."""
  length, width = cfg.grid_side ** 2, cfg.width
  patch = 2 * length * cfg.patch_size ** 2 * 3 * width
  per_block = 2 * length * width * (4 * width + 2 * cfg.mlp_dim)
  attention = 2 * 2 * length * length * width
  return Forward(patch + cfg.depth * per_block, cfg.depth * attention)


def projector_forward(cfg: ProjectorConfig, vit: ViTConfig, out_width: int,
                      num_tokens: int) -> Forward:
  """Pooling (two separable matmuls over the grid) and the MLP on the N tokens."""
  side, n, c = vit.grid_side, token_side(num_tokens), vit.width
  pooling = 2 * (n * side * side * c + n * n * side * c)
  if cfg.mlp == "swiglu":
    hidden = cfg.mlp_ratio * c
    mlp = 2 * num_tokens * (2 * c * hidden + hidden * out_width)
  else:  # LLaVA's GELU MLP, both layers out_width wide
    mlp = 2 * num_tokens * (c * out_width + out_width * out_width)
  return Forward(pooling + mlp)


def llm_forward(cfg: LLMConfig, positions: int, text_positions: int) -> Forward:
  """The decoder on ``positions`` merged positions (causal attention) and the output
  projection on ``text_positions``."""
  q, kv = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
  per_layer = 2 * positions * cfg.width * (2 * q + 2 * kv + 3 * cfg.mlp_dim)
  attended = positions * (positions + 1) / 2  # (query, key) pairs under the causal mask
  attention = 2 * 2 * attended * q
  head = 2 * text_positions * cfg.width * cfg.vocab_size
  return Forward(cfg.depth * per_layer + head, cfg.depth * attention)


def train_flops(forwards: Mapping[str, Forward], trainable: Mapping[str, bool]) -> float:
  """Forward + backward FLOPs from per-module forwards, listed from the input on (as
  `vlm.MODULES`), and which modules train (see the module docstring)."""
  total, before = 0.0, False
  for name, fwd in forwards.items():
    trains = trainable[name]
    # Attention has no weights: its backward is the two input gradients of its products.
    backward = (2 * fwd.weights if trains else fwd.weights if before else 0.0)
    backward += 2 * fwd.attention if (trains or before) else 0.0
    total += fwd.weights + fwd.attention + backward
    before = before or trains
  return total


def vlm_train_flops(cfg: VLMConfig, num_tokens: int, text_length: int, batch: int,
                    trainable: Mapping[str, bool], image_slots: int = 1) -> float:
  """Model FLOPs of one train step of ``batch`` rows at ``num_tokens`` visual tokens per
  image, each row ``text_length`` token slots with ``image_slots`` images (one
  placeholder each among the slots)."""
  times = lambda f, k: Forward(f.weights * k, f.attention * k)
  forwards = {
      "vit": times(vit_forward(cfg.vit), image_slots),
      "projector": times(projector_forward(cfg.projector, cfg.vit, cfg.llm.width, num_tokens),
                         image_slots),
      "llm": llm_forward(cfg.llm, text_length + image_slots * (num_tokens - 1), text_length)}
  return batch * train_flops(forwards, trainable)


def patch_labeler_train_flops(cfg: ViTConfig, num_heads_outputs: int, batch: int) -> float:
  """Stage 0: the ViT and its per-patch linear heads (``num_heads_outputs`` classes in
  all), everything trained."""
  heads = Forward(2 * cfg.grid_side ** 2 * cfg.width * num_heads_outputs)
  return batch * train_flops({"vit": vit_forward(cfg), "heads": heads},
                             {"vit": True, "heads": True})
