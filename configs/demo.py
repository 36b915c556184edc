"""The embedded demo: a tiny TokenFLEX VLM on the procedural VQA suite, CPU-sized.

Arguments (``--config=configs/demo.py:stage=N,rules=R``): R picks the sharding rules
preset (dp, fsdp, fsdp_tp; default fsdp_tp, see `tokenflex_jax.sharding`). Stages:
  0: dense vision pre-training of the ViT on the scenes' per-patch labels (the demo's
     stand-in for a pretrained SigLIP), run by ``tokenflex_jax.pretrain_vision``;
  1: alignment with the ViT frozen: projector and LLM train (the paper trains only the
     projector here, but its LLM is pretrained; the demo's starts from scratch);
  2: full tuning (the default): everything trains, the ViT at a reduced learning rate.
The model, data and eval values are the schema's defaults (`tokenflex_jax.app.config_schema`);
the ViT has one attention head, cheaper than two at width 64 on CPU (docs/measurements.md).
``launch/demo.sh`` runs 0 -> 1 -> 2 -> eval, chaining them through ``config.init``.
"""

from __future__ import annotations

import ml_collections

from tokenflex_jax import sharding
from tokenflex_jax.app.config_schema import base_config, parse_arg

RULES = {"dp": sharding.DATA_PARALLEL_RULES, "fsdp": sharding.FSDP_RULES,
         "fsdp_tp": sharding.FSDP_TP_RULES}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The demo config for ``arg`` = ``"stage=0|1|2,rules=dp|fsdp|fsdp_tp"``."""
  args = parse_arg(arg, "configs/demo.py", stage=("2", "0", "1"),
                   rules=("fsdp_tp", "dp", "fsdp"))
  c = base_config()
  c.stage = int(args["stage"])
  # One position span for every visual-token count, so the small decoder generalises to
  # the counts it never trains (docs/measurements.md).
  c.model.visual_position_span = 256
  # The stage-0 ViT's features carry no position (docs/measurements.md): a learned
  # per-patch embedding before pooling gives every count the same map of the image.
  c.model.projector.position_embedding = True
  # Three ViT blocks and two LLM layers this narrow run faster unrolled on a CPU (one
  # fused program) than as a rolled loop (docs/performance.md); the same parameters.
  c.model.scan_layers = False
  c.lr_multipliers = ml_collections.ConfigDict(dict(vit=0.3, projector=1.0, llm=1.0))
  c.sharding.rules = RULES[args["rules"]]
  # `background` weighted like the medium families: at 0.5 it stayed at 87-91.5%
  # (docs/measurements.md).
  c.data.family_weights = (1.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.5)
  if c.stage == 0:  # PatchLabeler's modules
    c.total_steps = 400
    c.checkpoint_every = 200
    c.lr_multipliers = ml_collections.ConfigDict(dict(vit=1.0, color_head=1.0,
                                                      object_head=1.0))
  elif c.stage == 1:
    c.total_steps = 500
    c.checkpoint_every = 250
    c.lr_multipliers = ml_collections.ConfigDict(dict(vit=0.0, projector=1.0, llm=1.0))
  else:
    # 450 steps: at 300 `background` stayed at 81-86% (docs/measurements.md).
    c.total_steps = 450
  return c
