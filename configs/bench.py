"""The benchmark model: the widths the speed issue measured against the PyTorch peer.

``python -m tokenflex_jax.bench --config=configs/bench.py --workdir=/tmp/bench`` (or
``bash launch/bench.sh --out=DIR``). A SigLIP-shaped ViT 384 wide x 4 blocks (6 heads,
MLP 1536) on a 16 x 16 patch grid (64 px scenes, 4 px patches), the paper's projector,
and a Qwen2-shaped decoder 512 wide x 4 layers (8 query heads on 2 KV heads of 64,
q/k/v biases, MLP 1408, tied embeddings), batch 16, every module trained, the paper's
buckets and mix. Data and tokenizer are the demo's (procedural scenes, the project's
sentencepiece model). `tokenflex_jax.benchmarking.torch_peer` builds the same model from
transformers' modules.
"""

from __future__ import annotations

import ml_collections

from tokenflex_jax.app.config_schema import base_config


def get_config() -> ml_collections.ConfigDict:
  """The benchmark config (the bench binary also compiles it with the layers scanned)."""
  c = base_config()
  c.model.vit.update(image_size=64, patch_size=4, width=384, depth=4, mlp_dim=1536,
                     num_heads=6)
  c.model.llm.update(width=512, depth=4, num_heads=8, num_kv_heads=2, head_dim=64,
                     mlp_dim=1408, qkv_bias=True)
  # Unrolled: faster on a CPU at these widths than the rolled loop, whose stacked
  # residuals and gradients cost extra copies (docs/performance.md); the bench compiles
  # and times both.
  c.model.scan_layers = False
  c.batch_size = 16
  c.log_every = 1
  return c
