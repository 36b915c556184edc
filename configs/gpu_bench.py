"""The GPU benchmark's model: the paper model's shape at ~1.6B parameters.

``--config=configs/gpu_bench.py:size=S`` (``launch/gpu_check.sh`` runs it):
  1b:   a SigLIP-so400m-like ViT (384 px, patch 14: 729 patches; width 1152, MLP 4304,
        16 heads) 6 blocks deep and a Qwen2.5-1.5B-shaped decoder (1536 x 28, 12 query
        heads on 2 KV heads of 128, MLP 8960, vocabulary 151,936, tied embeddings),
        bfloat16 compute on float32 master weights, text 1,024, batch 4, each layer
        keeping its matmul outputs for the backward pass (remat "dots": ours and the
        PyTorch peer share the GPU's memory in the check);
  cpu:  the same shares at a CPU's size (224 px, ViT 192 x 4, decoder 384 x 6,
        vocabulary 8,192, text 512, batch 4);
  tiny: the smallest model on the same code path (``gpu_check --dry`` in CI).
Six ViT blocks, not so400m's 27, so that the ViT's share of the step's model FLOPs is
the paper model's (SigLIP-so400m + Qwen2.5-7B: 4.1 / 3.9 / 3.5% at 64 / 144 / 256
tokens; 1b: 4.2 / 3.9 / 3.6%; cpu: 4.3 / 3.8 / 3.3%; `models.flops`, tested):
an MFU measured on it is the paper model's MFU in miniature, which the demo-shaped
configs/bench.py (ViT 35-65% of its FLOPs) is not. Every module trains (stage 3), the
paper's buckets and mix; data and tokenizer are the demo's (procedural scenes, padded
to the text length), which only the step's shapes depend on.
"""

from __future__ import annotations

import ml_collections

from tokenflex_jax.app.config_schema import base_config, parse_arg

# Per size: the ViT's and the LLM's fields, text length, global batch, remat policy.
# Every size has SigLIP's patch 14, a Qwen2-style decoder (q/k/v biases, tied embeddings)
# and bfloat16 compute.
SIZES = {
    "1b": (dict(image_size=384, width=1152, depth=6, mlp_dim=4304, num_heads=16),
           dict(vocab_size=151_936, width=1536, depth=28, num_heads=12, num_kv_heads=2,
                head_dim=128, mlp_dim=8960, rope_theta=1_000_000.0),
           1024, 4, "dots"),
    "cpu": (dict(image_size=224, width=192, depth=4, mlp_dim=720, num_heads=3),
            dict(vocab_size=8192, width=384, depth=6, num_heads=6, num_kv_heads=1,
                 head_dim=64, mlp_dim=2240),
            512, 4, "none"),
    "tiny": (dict(image_size=224, width=64, depth=1, mlp_dim=256, num_heads=1),
             dict(vocab_size=512, width=64, depth=2, num_heads=2, num_kv_heads=1, head_dim=32,
                  mlp_dim=256),
             64, 2, "none"),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The GPU benchmark config for ``arg`` = ``"size=1b|cpu|tiny"`` (default 1b)."""
  size = parse_arg(arg, "configs/gpu_bench.py", size=tuple(SIZES))["size"]
  vit, llm, text_length, batch, remat = SIZES[size]
  c = base_config()
  c.stage = 3
  c.model.vit.update(patch_size=14, dtype="bfloat16", **vit)
  c.model.llm.update(qkv_bias=True, tie_embeddings=True, dtype="bfloat16", **llm)
  c.model.projector.dtype = "bfloat16"
  c.model.remat_policy = remat
  c.data.max_text_length = text_length
  c.batch_size = batch
  c.lr_multipliers = ml_collections.ConfigDict(dict(vit=0.1, projector=1.0, llm=1.0))
  c.log_every = 1
  return c
