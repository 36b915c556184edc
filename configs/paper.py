"""The paper's model: SigLIP-so400m/14 at 384 px + Qwen2.5-7B-Instruct, TokenFLEX buckets.

``--config=configs/paper.py:stage=N`` (N = 1, 2, 3; default 3):
  1: alignment: the projector alone trains (ViT and LLM frozen);
  2: vision enhancement: ViT and projector train, the LLM stays frozen;
  3: instruction tuning: everything trains, the ViT at a tenth of the learning rate.
``:stage=N,pack=1`` packs rows (docs/data.md#packed-rows): 1536 text tokens and 6 image
slots per row (0.89-0.92 of the positions useful on mix665k-shaped data, against
0.29-0.39 padded), 64 rows per step, about 340 conversations.
The paper states the three stages but not what each freezes, nor batch sizes, learning
rates or step counts: every value marked "ours" below is our default, not the paper's.

Start from converted Hugging Face towers (docs/huggingface.md):
  python -m tokenflex_jax.convert --config=configs/paper.py --workdir=/ckpt/start \
      --vision=.../siglip-so400m-patch14-384 --llm=.../Qwen2.5-7B-Instruct
  python -m tokenflex_jax.train --config=configs/paper.py:stage=1 \
      --config.init.checkpoint=/ckpt/start --workdir=/runs/stage1 ...
The model fields below already match those two checkpoints. Keys not set here keep the
defaults of `tokenflex_jax.app.config_schema.base_config`.
"""

from __future__ import annotations

import ml_collections

from tokenflex_jax import sharding
from tokenflex_jax.app.config_schema import base_config, parse_arg

# (steps, global batch, peak learning rate, {module: lr multiplier}); all ours.
STAGES = {
    1: (2_000, 256, 1e-3, dict(vit=0.0, projector=1.0, llm=0.0)),
    2: (4_000, 256, 2e-5, dict(vit=1.0, projector=1.0, llm=0.0)),
    3: (6_000, 128, 1e-5, dict(vit=0.1, projector=1.0, llm=1.0)),
}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The paper config for ``arg`` = ``"stage=1|2|3"`` (or just the number)."""
  args = parse_arg(arg, "configs/paper.py", stage=("3", "1", "2"), pack=("0", "1"))
  stage = int(args["stage"])
  steps, batch, lr, mults = STAGES[stage]
  c = base_config()
  c.stage = stage

  # SigLIP-so400m-patch14-384: a 27 x 27 = 729-patch grid, width 1152.
  c.model.vit.update(image_size=384, patch_size=14, width=1152, depth=27, mlp_dim=4304,
                     num_heads=16, dtype="bfloat16")
  c.model.projector.update(pooling="resize_avg", dtype="bfloat16")
  # Qwen2.5-7B-Instruct. visual_position_span 0: one rotary position per visual token, as
  # the paper's Qwen2.5 sees them.
  c.model.llm.update(vocab_size=152_064, width=3584, depth=28, num_heads=28, num_kv_heads=4,
                     head_dim=128, mlp_dim=18_944, rope_theta=1_000_000.0, qkv_bias=True,
                     tie_embeddings=False, dtype="bfloat16")
  # Each layer keeps its matmul outputs for the backward pass and recomputes the rest: the
  # least recomputation with which the step fits a 16 GiB chip (a TPU v5e 8x8 slice) at
  # every bucket, by the TPU compiler (docs/performance.md, tests/test_aot.py).
  c.model.remat_policy = "dots"

  c.data.update(
      source="llava",               # python -m tokenflex_jax.data.llava_tfds (docs/data.md)
      num_examples=0, families=(), family_weights=(),
      max_text_length=1024,         # ours
      image_first=True, num_workers=8,
      truncate=True,                # LLaVA practice: cut conversations past the length
      # Ours: count and skip a bad record (a conversation truncation leaves without an
      # answer, a corrupt image) rather than stop; 100 in a row still stop (docs/data.md).
      on_bad_record="skip")

  # Qwen2.5's own tokenizer.json and the Jinja chat template of its tokenizer_config.json
  # (template ""); <|image_pad|> is one of its special tokens and marks where the visual
  # tokens go. system_prompt None: the template's own (Qwen2.5's default system turn).
  c.tokenizer.update(kind="hf", template="", image_token="<|image_pad|>")

  c.batch_size = batch
  if args["pack"] == "1":
    # Ours: the planner's row for mix665k-shaped data (docs/data.md), one row per chip of
    # a 64-chip slice; 3072 positions at 256 tokens, within 16 GiB (docs/performance.md).
    c.data.update(pack=True, max_text_length=1536 + 6, image_slots=6)
    c.batch_size = 64
  c.total_steps = steps
  c.optimizer.update(learning_rate=lr, warmup_steps=min(200, steps // 10),
                     end_lr_fraction=0.0, b2=0.95, weight_decay=0.0)
  c.lr_multipliers = ml_collections.ConfigDict(mults)

  # FSDP over every chip of a TPU v5p/v4 slice (parameters and Adam moments split along
  # the model width); set e.g. (1, -1, 4) and rules=FSDP_TP_RULES for tensor parallelism.
  c.mesh.shape = (1, -1, 1)
  c.sharding.rules = sharding.FSDP_RULES

  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3

  # No evaluation while training unless asked for: --config.eval_every=1000
  # --config.eval.data_path=/data/MMBench_DEV_EN.tsv (the eval binary reads the same keys).
  c.eval_every = 0
  c.eval.update(suite="mmbench",    # or "vqa"; data_path: the TSV / JSONL file
                examples_per_family=0, batch_size=64, max_prompt_length=512,
                max_new_tokens=32)
  return c
