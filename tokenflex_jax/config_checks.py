"""Every check of a run config that needs no data and no tokenizer, run by one call.

Each binary (train, pretrain_vision, eval, predict, bench, aot) calls `check` first,
before it writes to a workdir, reads data or compiles, so that a config that cannot
work is one line per problem, each naming its field, all in one run (`errors.ConfigError`;
the binaries print them and exit with `errors.USAGE_EXIT_CODE`) rather than a traceback
from inside XLA or the model. The
checks live next to the code that reads each field (`model_config`, `sharding`,
`data.pipeline`, `training.buckets`, `training.optimizer`, `training.loss`, `training.trainer`,
`evaluation.evaluator`, `evaluation.auto_budget`); this module only calls them.

The one check that needs the tokenizer, its vocabulary against
``config.model.llm.vocab_size``, is `model_config.vlm_config`'s: every binary that
builds the VLM from a tokenizer calls it before compiling.
"""

from __future__ import annotations

import jax
import ml_collections

from tokenflex_jax import errors, model_config, run_tokenizer, sharding
from tokenflex_jax.data import pipeline
from tokenflex_jax.evaluation import auto_budget, evaluator
from tokenflex_jax.models import patch_labeler, vlm
from tokenflex_jax.training import buckets, loss, optimizer, trainer

# What a binary does with the config: "train" (train, bench: the VLM's train step),
# "aot" (the same, compiled from shapes: no tokenizer is read), "pretrain_vision" (the
# PatchLabeler's train step), "eval", "predict".
JOBS = ("train", "aot", "pretrain_vision", "eval", "predict")


def grid_side(config: ml_collections.ConfigDict) -> tuple[int, str]:
  """(side of the ViT's patch grid the projector pools, the fields it comes from)."""
  side = config.data.image_size // config.model.vit.patch_size
  if config.data.image_size == config.model.vit.image_size:
    return side, "config.model.vit.image_size / patch_size"
  return side, "config.data.image_size / config.model.vit.patch_size"



def check(config: ml_collections.ConfigDict, num_devices: int | None = None, *,
          job: str = "train") -> None:
  """Raises `errors.ConfigError` naming every config value that cannot work for ``job``
  (one of `JOBS`) on ``num_devices`` devices (default ``jax.device_count()``; aot passes
  the count it simulates): one line per problem, each starting with its field.

  Every job:
  - the model's fields (`model_config`): positive sizes; ``config.model.vit.width``
    divisible by its ``num_heads``; a patch no larger than the images;
    ``config.model.llm.num_heads`` a multiple of ``num_kv_heads``; an even
    ``head_dim``; known ``rope_type``, ``projector.pooling``, ``projector.mlp``,
    ``visual_position_layout``, ``remat_policy`` and ``attention``; floating-point
    dtypes; a ViT width divisible by 4 for ``projector.position_embedding``; a
    ``visual_position_span`` >= 0 (pretrain_vision: the ViT's and the layer flags only);
  - a known ``config.tokenizer.kind``, with a ``path`` for an LLM's tokenizer (not
    "aot", which reads no tokenizer);
  - ``config.data`` (`pipeline.check_data_config`): a known source (with its
    ``tfds_dir`` for "train" and "pretrain_vision", which read it), bad-record policy,
    worker count, text length, image size and, for the procedural scenes, their families;
  - ``config.mesh.shape`` fits exactly the devices (one -1 at most, for the rest);
    ``config.sharding.rules`` map logical axes onto the mesh axes (data, fsdp, tensor).
  "train", "aot" and "pretrain_vision":
  - ``config.batch_size``, ``log_every``, ``checkpoint_every``, ``keep_checkpoints``
    positive; the global batch divisible by the data-parallel size (the mesh axes the
    rules map "batch" onto) and by the processes;
  - ``config.optimizer``: learning_rate > 0 (a module is frozen by a multiplier of 0),
    warmup_steps, end_lr_fraction, weight_decay >= 0, clip_norm > 0, b1 and b2 in
    [0, 1), a known mu_dtype;
  - ``config.lr_multipliers``: one entry >= 0 per top-level module of the model, no
    other (the VLM's `vlm.MODULES`; pretrain_vision's `patch_labeler.MODULES`).
  "train" and "aot": ``config.token_counts`` distinct squares of at most the ViT's patch grid,
  ``config.token_probs`` one per count, >= 0, summing to 1, a known
  ``config.loss_weighting``; ``config.eval_every`` >= 0; "train" with ``eval_every`` > 0
  also the "eval" checks below.
  "eval": ``config.token_counts`` and ``config.eval.token_counts`` as above;
  ``config.eval.batch_size`` as the global batch; a known ``config.eval.suite`` (with
  ``config.eval.data_path`` for a file); ``config.eval.auto_counts`` among the trained
  and evaluated counts.
  "predict": ``config.token_counts`` as above.
  """
  if job not in JOBS:
    raise ValueError(f"job must be one of {JOBS}, got {job!r}")
  problems = Problems()
  problems.check(model_config.layer_flags, config)
  if job == "pretrain_vision":
    problems.check(model_config.vit_config, config)
  else:  # The vocabulary is checked against the tokenizer when there is one.
    problems.check(model_config.vlm_config, config,
                   model_config.FixedTokenIds(config.model.llm.vocab_size))
  if job != "aot":
    problems.check(run_tokenizer.tokenizer_path, config, "")
  problems.check(pipeline.check_data_config, config.data,
                 reads_data=job in ("train", "pretrain_vision"))
  num_devices = jax.device_count() if num_devices is None else num_devices
  mesh_shape = problems.check(lambda: dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(
      config.mesh.shape, num_devices))))
  rules = problems.check(sharding.rules_from_config, config.sharding.rules)
  mesh_known = mesh_shape is not None and rules is not None

  def batch_divisible(field: str, value: int) -> None:
    if mesh_known:
      problems.check(sharding.check_batch_divisible, field, value, mesh_shape, rules,
                     jax.process_count())

  training = job in ("train", "aot")
  if training or job == "pretrain_vision":
    problems.check(trainer.check_loop_config, config)
    batch_divisible("config.batch_size", config.batch_size)
    problems.check(optimizer.check_optimizer, config.optimizer)
    modules = patch_labeler.MODULES if job == "pretrain_vision" else vlm.MODULES
    problems.check(optimizer.check_multipliers, modules, config.lr_multipliers.to_dict())
  if job != "pretrain_vision":
    side_fields = problems.check(grid_side, config)
    grid_known = side_fields is not None and side_fields[0] > 0
    if training:
      if grid_known:
        problems.check(buckets.validate_buckets, tuple(config.token_counts),
                       tuple(config.token_probs), *side_fields)
      problems.check(loss.check_weighting, config.loss_weighting)
    elif grid_known:
      problems.check(buckets.check_counts, tuple(config.token_counts), "config.token_counts",
                     *side_fields)
    if training and config.eval_every < 0:
      problems.add(f"config.eval_every={config.eval_every} must be >= 0 (0: no periodic "
                   "evaluation)")
    evaluates = job == "eval" or (job == "train" and config.eval_every > 0)
    if evaluates:
      if grid_known:
        problems.check(buckets.check_counts, tuple(config.eval.token_counts),
                       "config.eval.token_counts", *side_fields)
      batch_divisible("config.eval.batch_size", config.eval.batch_size)
      during = (f" (periodic evaluation while training, config.eval_every="
                f"{config.eval_every}; 0 turns it off)" if training else "")
      problems.check(evaluator.check_suite, config, context=during)
      if len(set(config.token_counts) & set(config.eval.token_counts)) >= 2:
        problems.check(auto_budget.ladder_counts, config.eval.auto_counts, config.token_counts,
                       config.eval.token_counts)
  problems.raise_all()


class Problems:
  """The config problems found so far: each check runs, whatever the others found, so one
  run reports them all (one line each)."""

  def __init__(self):
    self.lines: list[str] = []

  def add(self, line: str) -> None:
    self.lines.append(line)

  def check(self, fn, *args, **kwargs):
    """``fn(*args, **kwargs)``, or None when it raised a `errors.UserError` (recorded).
    An arithmetic, type, value or lookup error after a recorded problem is taken as that
    problem's consequence (e.g. a zero patch size dividing) and not reported again; any
    other exception propagates."""
    try:
      return fn(*args, **kwargs)
    except errors.UserError as e:
      self.lines.extend(str(e).splitlines())
    except (ArithmeticError, TypeError, ValueError, LookupError):
      if not self.lines:
        raise
    return None

  def raise_all(self) -> None:
    if self.lines:
      raise errors.ConfigError("\n".join(self.lines))
