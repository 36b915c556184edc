"""Every check of a run's typed config that needs no data and no tokenizer.

Each binary turns its config into a `specs.RunSpec` (`config_schema.to_spec`, which
checks the types) and calls `check` with its own tuple of checks (`TRAIN`, `AOT`,
`PRETRAIN_VISION`, `EVAL`, `PREDICT`, `IMPORT_TOWERS`), before it writes to a workdir, reads
data or compiles. A config that cannot work is one line per problem, each naming its
field, all in one run (`errors.ConfigError`; the binaries print them and exit with
`errors.USAGE_EXIT_CODE`) rather than a traceback from inside XLA or the model. Each rule
lives next to the code that reads its field (`model_config`, `sharding`,
`data.pipeline`, `training.buckets`, `training.optimizer`, `training.loss`,
`training.trainer`, `evaluation.evaluator`, `evaluation.auto_budget`); this module only
calls them.

The one check that needs the tokenizer, its vocabulary against
``config.model.llm.vocab_size``, is `model_config.vlm_config`'s: every binary that
builds the VLM from a tokenizer calls it before compiling.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import jax

from tokenflex_jax import errors, model_config, sharding
from tokenflex_jax.app import run_tokenizer
from tokenflex_jax.data import pipeline
from tokenflex_jax.evaluation import auto_budget, evaluator
from tokenflex_jax.models import patch_labeler, vlm
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training import buckets, compiled, loss, optimizer, trainer


def grid_side(config: RunSpec) -> tuple[int, str]:
  """(side of the ViT's patch grid the projector pools, the fields it comes from)."""
  side = config.data.image_size // config.model.vit.patch_size
  if config.data.image_size == config.model.vit.image_size:
    return side, "config.model.vit.image_size / patch_size"
  return side, "config.data.image_size / config.model.vit.patch_size"


@dataclasses.dataclass(frozen=True)
class Facts:
  """What several checks need, worked out once: the mesh's axis sizes and the rules
  (None where the config's are unusable, already reported), the patch grid's side and
  the fields it comes from (None likewise), and the processes of the run."""
  mesh_shape: dict[str, int] | None
  rules: Any
  grid: tuple[int, str] | None
  processes: int

  def batch_divisible(self, problems: "Problems", field: str, value: int) -> None:
    if self.mesh_shape is not None and self.rules is not None:
      problems.check(sharding.check_batch_divisible, field, value, self.mesh_shape, self.rules,
                     self.processes)

  def counts(self, problems: "Problems", field: str, counts: tuple[int, ...]) -> None:
    if self.grid is not None:
      problems.check(buckets.check_counts, counts, field, *self.grid)


# A check: (problems, config, facts) -> None, adding a line per problem it finds.
Check = Callable[["Problems", RunSpec, Facts], None]


def check(config: RunSpec, checks: Sequence[Check], num_devices: int | None = None) -> None:
  """Runs ``checks`` (one of the tuples below, the binary's) and the mesh's, then raises
  `errors.ConfigError` naming every config value that cannot work on ``num_devices``
  devices (default ``jax.device_count()``; aot passes the count it simulates): one line
  per problem, each starting with its field. The mesh's: ``config.mesh.shape`` fits
  exactly the devices (one -1 at most, for the rest); ``config.sharding.rules`` map
  logical axes onto the mesh axes (data, fsdp, tensor)."""
  problems = Problems()
  num_devices = jax.device_count() if num_devices is None else num_devices
  mesh_shape = problems.check(lambda: dict(zip(sharding.MESH_AXES, sharding.resolve_mesh_shape(
      config.mesh.shape, num_devices))))
  rules = problems.check(sharding.rules_from_config, config.sharding.rules)
  grid = problems.check(grid_side, config)
  facts = Facts(mesh_shape, rules, grid if grid is not None and grid[0] > 0 else None,
                jax.process_count())
  for one in checks:
    one(problems, config, facts)
  problems.raise_all()


def vlm_model(problems: "Problems", config: RunSpec, facts: Facts) -> None:
  """Every ``config.model`` field of the VLM (`model_config.vlm_config`): positive sizes;
  a ViT width its heads divide; a patch no larger than the images; LLM query heads a
  multiple of the KV heads; an even head_dim; known rope_type, projector pooling and
  MLP, visual_position_layout, remat_policy and attention; floating-point dtypes; a ViT
  width divisible by 4 for the projector's position embedding; a visual_position_span
  >= 0. The vocabulary is checked against the tokenizer when there is one."""
  del facts
  problems.check(model_config.layer_flags, config)
  problems.check(model_config.vlm_config, config,
                 model_config.FixedTokenIds(config.model.llm.vocab_size))


def vision_model(problems: "Problems", config: RunSpec, facts: Facts) -> None:
  """``config.model.vit`` and the layer flags alone (the PatchLabeler's)."""
  del facts
  problems.check(model_config.layer_flags, config)
  problems.check(model_config.vit_config, config)


def tokenizer(problems: "Problems", config: RunSpec, facts: Facts) -> None:
  """A known ``config.tokenizer.kind``, with a ``path`` for an LLM's tokenizer."""
  del facts
  problems.check(run_tokenizer.tokenizer_path, config, "")


def data_read(problems: "Problems", config: RunSpec, facts: Facts) -> None:
  """``config.data`` for a binary that reads it (`pipeline.check_data_config`): a known
  source with its ``tfds_dir``, bad-record policy, worker count, text length, image size
  and, for the procedural scenes, their families."""
  del facts
  problems.check(pipeline.check_data_config, config.data, reads_data=True)


def data_described(problems: "Problems", config: RunSpec, facts: Facts) -> None:
  """``config.data`` as `data_read`, for a binary that only takes its shapes (the
  ``tfds_dir`` not needed)."""
  del facts
  problems.check(pipeline.check_data_config, config.data, reads_data=False)


def _training(problems: "Problems", config: RunSpec, facts: Facts,
              modules: tuple[str, ...]) -> None:
  problems.check(trainer.check_loop_config, config)
  facts.batch_divisible(problems, "config.batch_size", config.batch_size)
  if config.microbatches > 1 and config.batch_size % config.microbatches == 0:
    facts.batch_divisible(problems, "config.batch_size / config.microbatches",
                          config.batch_size // config.microbatches)
  problems.check(optimizer.check_optimizer, config.optimizer)
  problems.check(optimizer.check_multipliers, modules, dict(config.lr_multipliers))
  problems.check(compiled.compiler_options, config.compiler_optimization_level)


def vlm_training(problems: "Problems", config: RunSpec, facts: Facts) -> None:
  """The VLM's train step and loop: ``config.batch_size``, ``log_every``,
  ``checkpoint_every``, ``keep_checkpoints`` positive; the global batch divisible by the
  data-parallel size and the processes; ``config.optimizer`` usable; one
  ``config.lr_multipliers`` entry >= 0 per module of `vlm.MODULES`, no other; a known
  ``config.compiler_optimization_level``; the token
  buckets (`trained_counts`, `buckets.check_probs`); a known ``config.loss_weighting``;
  ``config.eval_every`` >= 0; ``config.count_per_microbatch`` only with microbatches."""
  _training(problems, config, facts, vlm.MODULES)
  trained_counts(problems, config, facts)
  problems.check(buckets.check_probs, tuple(config.token_counts), tuple(config.token_probs))
  problems.check(loss.check_weighting, config.loss_weighting)
  if config.count_per_microbatch and config.microbatches < 2:
    problems.add("config.count_per_microbatch=True needs config.microbatches >= 2, got "
                 f"{config.microbatches}")
  if config.eval_every < 0:
    problems.add(f"config.eval_every={config.eval_every} must be >= 0 (0: no periodic "
                 "evaluation)")


def vision_training(problems: "Problems", config: RunSpec, facts: Facts) -> None:
  """`vlm_training`'s loop, optimizer and batch checks for the PatchLabeler
  (`patch_labeler.MODULES`); no data mixture and no ``config.count_per_microbatch``
  (stage 0 has no visual-token count)."""
  _training(problems, config, facts, patch_labeler.MODULES)
  if config.count_per_microbatch:
    problems.add("config.count_per_microbatch: stage 0 trains the ViT alone, without a "
                 "visual-token count; set config.count_per_microbatch=False")
  if config.data.mixture:
    problems.add("config.data.mixture: stage 0 trains on the procedural scenes alone; set "
                 "config.data.mixture=()")


def trained_counts(problems: "Problems", config: RunSpec, facts: Facts) -> None:
  """``config.token_counts``: distinct squares of at most the ViT's patch grid."""
  facts.counts(problems, "config.token_counts", tuple(config.token_counts))


def evaluation(problems: "Problems", config: RunSpec, facts: Facts, context: str = "") -> None:
  """``config.eval``: its token counts as `trained_counts`; its batch as the global
  batch; a known suite (with ``data_path`` for a file); ``auto_counts`` among the
  trained and evaluated counts; a ``tag`` that names one folder. ``context`` ends each
  suite line."""
  facts.counts(problems, "config.eval.token_counts", tuple(config.eval.token_counts))
  if config.eval.tag and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", config.eval.tag):
    problems.add(f"config.eval.tag={config.eval.tag!r}: letters, digits, '_', '.' and '-' "
                 "only (it names a folder)")
  facts.batch_divisible(problems, "config.eval.batch_size", config.eval.batch_size)
  problems.check(evaluator.check_suite, config, context=context)
  if len(set(config.token_counts) & set(config.eval.token_counts)) >= 2:
    problems.check(auto_budget.ladder_counts, config.eval.auto_counts, config.token_counts,
                   config.eval.token_counts)


def periodic_evaluation(problems: "Problems", config: RunSpec, facts: Facts) -> None:
  """`evaluation` when the run evaluates while training (``config.eval_every`` > 0)."""
  if config.eval_every > 0:
    evaluation(problems, config, facts, context=(
        f" (periodic evaluation while training, config.eval_every={config.eval_every}; 0 "
        "turns it off)"))


# What each binary checks.
TRAIN: tuple[Check, ...] = (vlm_model, tokenizer, data_read, vlm_training, periodic_evaluation)
AOT: tuple[Check, ...] = (vlm_model, data_described, vlm_training)  # no tokenizer is read
PRETRAIN_VISION: tuple[Check, ...] = (vision_model, tokenizer, data_read, vision_training)
EVAL: tuple[Check, ...] = (vlm_model, tokenizer, data_described, trained_counts, evaluation)
PREDICT: tuple[Check, ...] = (vlm_model, tokenizer, data_described, trained_counts)
IMPORT_TOWERS: tuple[Check, ...] = (data_described,)  # convert: the towers bring their shapes


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
