"""The embedded demo: a tiny TokenFLEX VLM on the procedural VQA suite, CPU-sized.

Arguments (``--config=configs/demo.py:stage=N,rules=R``): R picks the sharding rules
preset (dp, fsdp, fsdp_tp; default fsdp_tp, see `tokenflex_jax.sharding`). Stages:
  0: dense vision pre-training of the ViT on the scenes' per-patch labels (the demo's
     stand-in for a pretrained SigLIP), run by ``tokenflex_jax.pretrain_vision``;
  1: alignment with the ViT frozen: projector and LLM train (the paper trains only the
     projector here, but its LLM is pretrained; the demo's starts from scratch). With no
     ViT backward pass its steps are cheap; the decoder learns the answer format and
     starts reading colours off the stage-0 features (500 steps of it alone: coarse
     families at 55-65%);
  2: full tuning (the default): everything trains, the ViT at a reduced learning rate.
The ViT has one attention head: at width 64 its step is ~20-35% cheaper on CPU than with
two heads of 32 (measured, see README).
``launch/demo.sh`` runs 0 -> 1 -> 2 -> eval, chaining them through ``config.init``.
"""

import ml_collections

from tokenflex_jax import sharding

RULES = {"dp": sharding.DATA_PARALLEL_RULES, "fsdp": sharding.FSDP_RULES,
         "fsdp_tp": sharding.FSDP_TP_RULES}


def parse_arg(arg: str | None) -> tuple[int, str]:
  """``"stage=1,rules=fsdp"`` -> (1, "fsdp"); ``"1"`` -> (1, "fsdp_tp"); None -> (2, "fsdp_tp")."""
  values = {"stage": "2", "rules": "fsdp_tp"}
  for i, part in enumerate(p for p in (arg or "").split(",") if p):
    key, value = part.split("=", 1) if "=" in part else ("stage" if i == 0 else "", part)
    if key not in values:
      raise ValueError(f"configs/demo.py: unknown argument {part!r}; use stage=0|1|2, "
                       f"rules={'|'.join(RULES)}")
    values[key] = value
  if values["stage"] not in ("0", "1", "2"):
    raise ValueError(f"configs/demo.py: stage must be 0, 1 or 2, got {values['stage']!r}")
  if values["rules"] not in RULES:
    raise ValueError(f"configs/demo.py: rules must be one of {tuple(RULES)}, "
                     f"got {values['rules']!r}")
  return int(values["stage"]), values["rules"]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  stage, rules = parse_arg(arg)
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.vit = ml_collections.ConfigDict(dict(
      image_size=32, patch_size=2, width=64, depth=3, mlp_dim=256, num_heads=1,
      layer_norm_eps=1e-6, dtype="float32"))
  c.model.projector = ml_collections.ConfigDict(dict(
      pooling="adaptive_avg", mlp_ratio=3, layer_norm_eps=1e-6, dtype="float32"))
  # Rematerialise ViT blocks and LLM layers in the backward pass (memory for FLOPs;
  # the same parameters): not needed at this size.
  c.model.remat = False
  # Rotary positions of the visual tokens: 0 gives each token its own position (the
  # LLaVA convention, configs/paper.py); K > 0 spreads any count over K positions, so the text's
  # positions do not depend on the count. Measured: without it the 2-layer decoder fell
  # to 55-63% on shape_color at the untrained 100 and 196 tokens; with it, 99-100% in
  # two runs (see models/vlm.py and the README).
  c.model.visual_position_span = 256
  c.model.llm = ml_collections.ConfigDict(dict(
      vocab_size=256, width=96, depth=2, num_heads=2, num_kv_heads=1, head_dim=48,
      mlp_dim=256, rope_theta=10_000.0, rms_norm_eps=1e-6, qkv_bias=False,
      tie_embeddings=True, dtype="float32",
      # RoPE scaling as in a Hugging Face config (see models/llm.py): none here.
      rope_type="default", rope_factor=1.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_positions=8192))

  c.data = ml_collections.ConfigDict()
  c.data.source = "procedural"      # or "tfds": read the array_record build in tfds_dir
  c.data.tfds_dir = ""
  c.data.seed = 1
  c.data.image_size = c.model.vit.get_ref("image_size")
  c.data.num_examples = 1_000_000   # size of the procedural train split
  c.data.families = ("background", "shape_color", "shape", "count", "quadrant", "dots",
                     "marks")
  c.data.family_weights = (0.5, 0.5, 1.0, 1.0, 1.0, 1.5, 1.0)
  c.data.max_text_length = 24       # prompt + answer tokens, padded
  # Where the <image> placeholder goes: before the question (True) or after it (False).
  # After it, the visual tokens can attend to the question; with the demo's small
  # decoder this trained better in the time budget (measured, see README).
  c.data.image_first = False
  c.data.num_workers = 0            # grain worker processes (0: in the main process)
  c.data.truncate = False           # conversations longer than max_text_length: error

  # "project": the demo's own sentencepiece model (path "" -> WORKDIR/tokenizer.model,
  # trained on the suite's text if missing). An LLM's own: kind "hf" (tokenizer.json,
  # templates chatml | llama3) or "sentencepiece" (templates llama2 | gemma).
  c.tokenizer = ml_collections.ConfigDict(dict(
      kind="project", path="", template="", image_token="",
      system_prompt=ml_collections.config_dict.placeholder(str)))  # None: the template's

  # TokenFLEX: the visual-token budget of each step is drawn from these (the paper's set).
  # The demo evaluates 100 and 196 too, which it never trains (see README for how its
  # tiny decoder fares there).
  c.token_counts = (64, 144, 256)
  c.token_probs = (0.2, 0.3, 0.5)
  c.loss_weighting = "sqrt"         # per-sample 1/sqrt(answer tokens), or "token_mean"

  c.batch_size = 32                 # global
  c.total_steps = 300
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=50, end_lr_fraction=0.05, b1=0.9, b2=0.98,
      weight_decay=0.05, clip_norm=1.0))
  # Learning-rate multiplier per module group; 0 freezes the group.
  c.lr_multipliers = ml_collections.ConfigDict(dict(vit=0.3, projector=1.0, llm=1.0))

  c.init = ml_collections.ConfigDict()
  c.init.checkpoint = ""            # a workdir: start from its latest params (all modules)
  c.init.vision_checkpoint = ""     # a workdir of pretrain_vision: take its ViT only

  c.mesh = ml_collections.ConfigDict(dict(shape=(-1, 1, 1)))
  # Logical axis -> mesh axes: the one table every sharding is derived from.
  c.sharding = ml_collections.ConfigDict(dict(rules=RULES[rules]))

  c.log_every = 25
  c.checkpoint_every = 150
  c.keep_checkpoints = 2

  c.vision_pretrain = ml_collections.ConfigDict(dict(object_weight=5.0))

  c.eval = ml_collections.ConfigDict()
  c.eval.suite = "scenes"           # or "mmbench" (TSV) / "vqa" (JSONL) at data_path
  c.eval.data_path = ""
  c.eval.image_dir = ""             # vqa: folder of relative image paths ("" -> data_path's)
  c.eval.skip_malformed = False     # count and skip bad rows instead of failing
  c.eval.token_counts = (64, 100, 144, 196, 256)
  c.eval.examples_per_family = 200
  c.eval.batch_size = 100
  c.eval.max_prompt_length = 20
  c.eval.max_new_tokens = 4
  c.eval.seed = 12345
  c.eval.checkpoint_step = -1       # -1: the latest

  if stage == 0:
    c.total_steps = 400
    c.checkpoint_every = 200
    c.lr_multipliers = ml_collections.ConfigDict(dict(vit=1.0))
  elif stage == 1:
    c.total_steps = 500
    c.checkpoint_every = 250
    c.lr_multipliers = ml_collections.ConfigDict(dict(vit=0.0, projector=1.0, llm=1.0))
  return c
