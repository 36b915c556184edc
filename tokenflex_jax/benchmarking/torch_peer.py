"""The benchmark's PyTorch peer: the same VLM built from transformers' modules.

What a user who rewrote this model in PyTorch would write: transformers'
`SiglipVisionModel` and `Qwen2ForCausalLM` (built from config, ``sdpa`` attention), an
adaptive-average-pool + LayerNorm + SwiGLU projector, the visual tokens gathered into
the text at each row's placeholder, the answer loss with the same per-sample weighting,
and torch's AdamW with global-norm clipping; float32 weights, and where our model
computes in bfloat16 the forward pass runs under ``torch.autocast`` in bfloat16 (mixed
precision as PyTorch users write it). On a CPU or a CUDA GPU (`build`'s ``device``). It starts from OUR parameters (exported with
`tokenflex_jax.models.hf`), so its first loss equals ours on the same batch: the two
step times are of one model. A bench-only dependency (torch, transformers).
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
import transformers

from tokenflex_jax.models import hf
from tokenflex_jax.models.vlm import VLMConfig


def device_for(jax_backend: str) -> str:
  """The torch device beside JAX's: "cuda" when JAX runs on a GPU, else "cpu"."""
  return "cuda" if jax_backend == "gpu" else "cpu"


def use_threads(count: int) -> None:
  """torch's intra-op threads: as many as the cores JAX's CPU client uses."""
  torch.set_num_threads(count)


class Projector(torch.nn.Module):
  """Patch features [B, L, C] -> [B, n * n, D]: adaptive average pool, LayerNorm, SwiGLU."""

  def __init__(self, width: int, hidden: int, out: int, eps: float):
    super().__init__()
    self.norm = torch.nn.LayerNorm(width, eps=eps)
    self.gate = torch.nn.Linear(width, hidden, bias=False)
    self.up = torch.nn.Linear(width, hidden, bias=False)
    self.down = torch.nn.Linear(hidden, out, bias=False)

  def forward(self, patches: torch.Tensor, side: int) -> torch.Tensor:
    b, length, c = patches.shape
    s = int(round(length ** 0.5))
    grid = patches.transpose(1, 2).reshape(b, c, s, s)
    x = F.adaptive_avg_pool2d(grid, side).flatten(2).transpose(1, 2)
    x = self.norm(x)
    return self.down(F.silu(self.gate(x)) * self.up(x))


class PeerVLM(torch.nn.Module):
  """The peer model; `loss` is the training objective of `tokenflex_jax.training.loss`
  (weighting "sqrt" or "token_mean")."""

  def __init__(self, vision: torch.nn.Module, projector: Projector, llm: torch.nn.Module,
               image_token_id: int, pad_token_id: int, weighting: str,
               compute_dtype: torch.dtype | None = None):
    super().__init__()
    self.vision, self.projector, self.llm = vision, projector, llm
    self.image_token_id, self.pad_token_id, self.weighting = (image_token_id, pad_token_id,
                                                              weighting)
    self.compute_dtype = compute_dtype  # None: float32 throughout; else autocast to it

  def loss(self, images: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor,
           num_tokens: int) -> torch.Tensor:
    """images [B, 3, H, W]; tokens [B, T] long, right-padded, one placeholder per row or
    none (a text-only row: its image is not read, as LLaVA's own trainer leaves it out);
    loss_mask [B, T] float -> the scalar answer loss (float32)."""
    if self.compute_dtype is None:
      return self._loss(images, tokens, loss_mask, num_tokens)
    with torch.autocast(tokens.device.type, dtype=self.compute_dtype):
      return self._loss(images, tokens, loss_mask, num_tokens)

  def _loss(self, images: torch.Tensor, tokens: torch.Tensor, loss_mask: torch.Tensor,
            num_tokens: int) -> torch.Tensor:
    b, t = tokens.shape
    arange = lambda n: torch.arange(n, device=tokens.device)
    side = int(round(num_tokens ** 0.5))
    visual = self.projector(self.vision(pixel_values=images).last_hidden_state, side)
    text = self.llm.get_input_embeddings()(tokens)
    is_image = tokens == self.image_token_id
    has_image = is_image.any(dim=1, keepdim=True)                                # [B, 1]
    # A text-only row: its visual slots after its last slot, masked out.
    image_pos = torch.where(has_image, is_image.int().argmax(dim=1, keepdim=True), t)
    j = arange(t - 1 + num_tokens)[None, :]
    is_visual = (j >= image_pos) & (j < image_pos + num_tokens)                  # [B, S]
    text_index = torch.where(j < image_pos, j, j - num_tokens + 1).clamp(0, t - 1)
    visual_index = (j - image_pos).clamp(0, num_tokens - 1)
    take = lambda a, i: torch.gather(a, 1, i[..., None].expand(-1, -1, a.shape[-1]))
    x = torch.where(is_visual[..., None], take(visual, visual_index), take(text, text_index))
    valid = (is_visual & has_image) | (~is_visual & torch.gather(
        tokens != self.pad_token_id, 1, text_index))
    positions = valid.long().cumsum(1) - valid.long()
    hidden = self.llm.model(inputs_embeds=x, attention_mask=valid.long(),
                            position_ids=positions, use_cache=False).last_hidden_state
    merged_t = torch.where(arange(t)[None] < image_pos, arange(t)[None],
                           arange(t)[None] + num_tokens - 1)
    hidden = take(hidden, (merged_t - 1).clamp(min=0))                          # [B, T, D]
    logits = self.llm.lm_head(hidden).float()
    ce = F.cross_entropy(logits.transpose(1, 2), tokens, reduction="none")
    w = loss_mask
    if self.weighting == "sqrt":
      w = loss_mask * loss_mask.sum(1, keepdim=True).clamp(min=1.0).rsqrt()
    return (ce * w).sum() / w.sum().clamp(min=1e-9)


def check(config: VLMConfig) -> None:
  """Raises ValueError naming the config field if the peer cannot build this model."""
  wanted = {"model.projector.mlp": (config.projector.mlp, "swiglu"),
            "model.projector.pooling": (config.projector.pooling, "adaptive_avg"),
            "model.projector.position_embedding": (config.projector.position_embedding, False),
            "model.visual_position_span": (config.visual_position_span, 0)}
  for field, (value, needed) in wanted.items():
    if value != needed:
      raise ValueError(f"config.{field}={value!r}: the PyTorch peer is built for "
                       f"{needed!r} only (run the bench with --nopeer)")


def build(config: VLMConfig, params: Mapping[str, Any], weighting: str,
          device: str = "cpu") -> PeerVLM:
  """The peer with ``params`` (our parameter tree, float32) loaded into it, on
  ``device``; it computes in bfloat16 (autocast) where ``config``'s LLM does."""
  check(config)
  params = {k: _numpy(v) for k, v in params.items()}
  with tempfile.TemporaryDirectory() as tmp:
    hf.export_vision(config.vit, params["vit"], os.path.join(tmp, "vision"))
    hf.export_llm(config.llm, params["llm"], os.path.join(tmp, "llm"),
                  "qwen2" if config.llm.qkv_bias else "llama")
    load = lambda cls, name: cls.from_pretrained(os.path.join(tmp, name),
                                                 attn_implementation="sdpa",
                                                 dtype=torch.float32)
    vision = load(transformers.SiglipVisionModel, "vision")
    llm = load(transformers.Qwen2ForCausalLM if config.llm.qkv_bias
               else transformers.LlamaForCausalLM, "llm")
  mlp = params["projector"]["mlp"]
  projector = Projector(config.vit.width, mlp["gate"]["kernel"].shape[1], config.llm.width,
                        config.projector.layer_norm_eps)
  with torch.no_grad():
    projector.norm.weight.copy_(torch.from_numpy(params["projector"]["norm"]["scale"]))
    projector.norm.bias.copy_(torch.from_numpy(params["projector"]["norm"]["bias"]))
    for name in ("gate", "up", "down"):
      getattr(projector, name).weight.copy_(torch.from_numpy(mlp[name]["kernel"].T.copy()))
  compute = torch.bfloat16 if config.llm.dtype == "bfloat16" else None
  return PeerVLM(vision, projector, llm, config.image_token_id, config.pad_token_id,
                 weighting, compute).to(device)


def _numpy(tree: Any) -> Any:
  if isinstance(tree, Mapping):
    return {k: _numpy(v) for k, v in tree.items()}
  return np.array(tree, np.float32)  # a writable copy


def torch_batch(batch: Mapping[str, Any], device: str = "cpu") -> dict[str, torch.Tensor]:
  """Our batch (image [B, H, W, 3], tokens, loss_mask) as the peer's tensors on
  ``device``."""
  return {"images": torch.from_numpy(np.asarray(batch["image"], np.float32)
                                     ).permute(0, 3, 1, 2).contiguous().to(device),
          "tokens": torch.from_numpy(np.asarray(batch["tokens"]).astype(np.int64)).to(device),
          "loss_mask": torch.from_numpy(np.asarray(batch["loss_mask"], np.float32)
                                        ).to(device)}


def optimizer(model: PeerVLM, opt_config: Any) -> torch.optim.Optimizer:
  """torch AdamW with our hyper-parameters; weight decay on matrices that are not
  embeddings (as `tokenflex_jax.training.optimizer.decay_mask`)."""
  decay, no_decay = [], []
  for name, p in model.named_parameters():
    (decay if p.ndim >= 2 and "embed" not in name else no_decay).append(p)
  return torch.optim.AdamW([{"params": decay, "weight_decay": opt_config.weight_decay},
                            {"params": no_decay, "weight_decay": 0.0}],
                           lr=opt_config.learning_rate, betas=(opt_config.b1, opt_config.b2))


def first_loss(model: PeerVLM, batch: Mapping[str, torch.Tensor], num_tokens: int) -> float:
  """The peer's loss on ``batch`` before any step."""
  with torch.no_grad():
    return float(model.loss(batch["images"], batch["tokens"], batch["loss_mask"], num_tokens))


def step_times(model: PeerVLM, opt: torch.optim.Optimizer, batch: Mapping[str, torch.Tensor],
               num_tokens: int, clip_norm: float, warmup: int, calls: int) -> list[float]:
  """Seconds per training step (forward, backward, clipping, AdamW) of ``calls`` steps
  after ``warmup`` untimed ones (each ends in reading the loss, which waits for the
  device)."""
  def step():
    opt.zero_grad(set_to_none=True)
    loss = model.loss(batch["images"], batch["tokens"], batch["loss_mask"], num_tokens)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), clip_norm)
    opt.step()
    return float(loss.detach())
  model.train()
  for _ in range(warmup):
    step()
  times = []
  for _ in range(calls):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  return times
