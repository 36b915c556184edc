"""The paper's model: SigLIP-so400m/14 at 384 px + Qwen2.5-7B-Instruct, TokenFLEX buckets.

``--config=configs/paper.py:stage=N`` (N = 1, 2, 3; default 3):
  1: alignment: the projector alone trains (ViT and LLM frozen);
  2: vision enhancement: ViT and projector train, the LLM stays frozen;
  3: instruction tuning: everything trains, the ViT at a tenth of the learning rate.
The paper states the three stages but not what each freezes, nor batch sizes, learning
rates or step counts: every value marked "ours" below is our default, not the paper's.

Start from converted Hugging Face towers (see README, "From Hugging Face checkpoints"):
  python -m tokenflex_jax.convert --config=configs/paper.py --workdir=/ckpt/start \
      --vision=.../siglip-so400m-patch14-384 --llm=.../Qwen2.5-7B-Instruct
  python -m tokenflex_jax.train --config=configs/paper.py:stage=1 \
      --config.init.checkpoint=/ckpt/start --workdir=/runs/stage1 ...
The model fields below already match those two checkpoints.
"""

import ml_collections

from tokenflex_jax import sharding

# (steps, global batch, peak learning rate, {module: lr multiplier}); all ours.
STAGES = {
    1: (2_000, 256, 1e-3, dict(vit=0.0, projector=1.0, llm=0.0)),
    2: (4_000, 256, 2e-5, dict(vit=1.0, projector=1.0, llm=0.0)),
    3: (6_000, 128, 1e-5, dict(vit=0.1, projector=1.0, llm=1.0)),
}


def parse_stage(arg: str | None) -> int:
  value = (arg or "stage=3").split("=", 1)[-1]
  if value not in ("1", "2", "3"):
    raise ValueError(f"configs/paper.py: stage must be 1, 2 or 3, got {arg!r}")
  return int(value)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  stage = parse_stage(arg)
  steps, batch, lr, mults = STAGES[stage]
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  # SigLIP-so400m-patch14-384: a 27 x 27 = 729-patch grid, width 1152.
  c.model.vit = ml_collections.ConfigDict(dict(
      image_size=384, patch_size=14, width=1152, depth=27, mlp_dim=4304, num_heads=16,
      layer_norm_eps=1e-6, dtype="bfloat16"))
  c.model.projector = ml_collections.ConfigDict(dict(
      pooling="resize_avg", mlp_ratio=3, layer_norm_eps=1e-6, dtype="bfloat16"))
  # Rematerialise ViT blocks and LLM layers in the backward pass. Off: at 2 sequences
  # per device it bought no memory in the 64-device compile (+22% FLOPs); the
  # temporaries are gathered weights and gradients, not activations (see README).
  c.model.remat = False
  # One rotary position per visual token, as the paper's Qwen2.5 sees them.
  c.model.visual_position_span = 0
  # Qwen2.5-7B-Instruct.
  c.model.llm = ml_collections.ConfigDict(dict(
      vocab_size=152_064, width=3584, depth=28, num_heads=28, num_kv_heads=4, head_dim=128,
      mlp_dim=18_944, rope_theta=1_000_000.0, rms_norm_eps=1e-6, qkv_bias=True,
      tie_embeddings=False, dtype="bfloat16",
      # RoPE scaling as in a Hugging Face config (see models/llm.py): none here.
      rope_type="default", rope_factor=1.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_positions=8192))

  c.data = ml_collections.ConfigDict()
  c.data.source = "llava"           # python -m tokenflex_jax.data.llava_tfds (see README)
  c.data.tfds_dir = ""
  c.data.seed = 1
  c.data.image_size = c.model.vit.get_ref("image_size")
  c.data.num_examples = 0
  c.data.families = ()
  c.data.family_weights = ()
  c.data.max_text_length = 1024     # ours
  c.data.image_first = True
  c.data.num_workers = 8
  c.data.truncate = True            # LLaVA practice: cut conversations past the length

  # Qwen2.5's own tokenizer.json and chat template; <|image_pad|> is one of its
  # special tokens and marks where the visual tokens go.
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="hf", path="", template="chatml", image_token="<|image_pad|>",
      system_prompt=ml_collections.config_dict.placeholder(str)))  # None: Qwen2.5's default

  c.token_counts = (64, 144, 256)
  c.token_probs = (0.2, 0.3, 0.5)
  c.loss_weighting = "sqrt"

  c.batch_size = batch
  c.total_steps = steps
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=lr, warmup_steps=min(200, steps // 10), end_lr_fraction=0.0, b1=0.9,
      b2=0.95, weight_decay=0.0, clip_norm=1.0))
  c.lr_multipliers = ml_collections.ConfigDict(mults)

  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ""
  c.init.vision_checkpoint = ""

  # FSDP over every chip of a TPU v5p/v4 slice (parameters and Adam moments split along
  # the model width); set e.g. (1, -1, 4) and rules=FSDP_TP_RULES for tensor parallelism.
  c.mesh = ml_collections.ConfigDict(dict(shape=(1, -1, 1)))
  c.sharding = ml_collections.ConfigDict(dict(rules=sharding.FSDP_RULES))

  c.log_every = 10
  c.checkpoint_every = 500
  c.keep_checkpoints = 3

  c.eval = ml_collections.ConfigDict()
  c.eval.suite = "mmbench"          # or "vqa"; data_path: the TSV / JSONL file
  c.eval.data_path = ""
  c.eval.image_dir = ""
  c.eval.skip_malformed = False
  c.eval.token_counts = (64, 100, 144, 196, 256)
  c.eval.examples_per_family = 0
  c.eval.batch_size = 64
  c.eval.max_prompt_length = 512
  c.eval.max_new_tokens = 32
  c.eval.seed = 12345
  c.eval.checkpoint_step = -1
  return c
