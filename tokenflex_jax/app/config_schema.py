"""The one config schema: every key, its default, the config-file argument parser, the
reading of a workdir's saved ``config.json``, and the one conversion of a config into the
frozen, typed `specs.RunSpec` the library takes (`to_spec`).

``configs/*.py`` start from `base_config()` and override values only; they add no keys.
This module, the binaries and ``configs/`` are the only ones that see ``ml_collections``.
"""

from __future__ import annotations

import copy
import dataclasses
import types
import typing
from collections.abc import Mapping
from typing import Any

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from tokenflex_jax import errors, sharding, specs
from tokenflex_jax.data import scenes

ConfigDict = ml_collections.ConfigDict


def base_config() -> ConfigDict:
  """Every config key with its default (the demo's values, except where noted)."""
  c = ConfigDict()
  c.stage = 2                       # training stage, set by the config file's argument
  c.seed = 0                        # parameter init and token-count sampling

  c.model = ConfigDict()
  c.model.vit = ConfigDict(dict(
      image_size=32, patch_size=2, width=64, depth=3, mlp_dim=256, num_heads=1,
      layer_norm_eps=1e-6, dtype="float32"))
  # pooling: adaptive_avg | resize_avg; mlp: swiglu | gelu (LLaVA's); position_embedding:
  # a learned per-patch embedding added before pooling (models/projector.py).
  c.model.projector = ConfigDict(dict(
      pooling="adaptive_avg", mlp="swiglu", mlp_ratio=3, position_embedding=False,
      layer_norm_eps=1e-6, dtype="float32"))
  c.model.llm = ConfigDict(dict(
      vocab_size=256, width=96, depth=2, num_heads=2, num_kv_heads=1, head_dim=48,
      mlp_dim=256, rope_theta=10_000.0, rms_norm_eps=1e-6, qkv_bias=False,
      tie_embeddings=True, dtype="float32",
      # RoPE scaling as in a Hugging Face config (see models/llm.py): none by default.
      rope_type="default", rope_factor=1.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_positions=8192,
      # The longest sequence the LLM supports (its max_position_embeddings): read at
      # import, written at export; it changes no parameter.
      max_positions=32768))
  # Performance flags for the ViT blocks and LLM layers; the parameter tree (weights
  # stacked per layer) is the same whatever they say. remat_policy: what the backward
  # pass keeps of each layer, "none" (everything) | "dots" (matmul outputs) |
  # "dots_except_mlp" (the attention's projections) | "full" (the layer's input only;
  # models/layers.py REMAT_POLICIES). scan_layers: one rolled loop (compiles one layer) or
  # unrolled (models/layers.py `stacked`).
  c.model.remat_policy = "none"
  c.model.scan_layers = True
  # Attention: "reference" (scores written out), "blocked" (the reference on causal query
  # blocks; on packed rows only the blocks a conversation reaches; the ViT's full
  # attention is the reference), "xla" or "cudnn" (jax.nn.
  # dot_product_attention's implementations; cuDNN: NVIDIA GPUs, 16-bit), "splash" (the
  # Pallas TPU kernel, models/splash.py), "auto": chosen per backend (models/layers.py
  # `resolve_attention`).
  c.model.attention = "auto"
  # Rotary positions of the visual tokens: 0 gives each token its own position (the
  # LLaVA convention); K > 0 spreads any count over K positions, so the text's positions
  # do not depend on the count (see models/vlm.py).
  c.model.visual_position_span = 0
  # With a span: "raster" (token i at p + i * K / N) or "grid" (each token at its cell's
  # place in the image, the same map at every count; models/vlm.py).
  c.model.visual_position_layout = "raster"

  c.data = ConfigDict()
  c.data.source = "procedural"      # "procedural" | "tfds" (array_record in tfds_dir) | "llava"
  c.data.tfds_dir = ""
  c.data.seed = 1
  c.data.image_size = c.model.vit.get_ref("image_size")
  c.data.num_examples = 1_000_000   # size of the procedural train split
  c.data.families = scenes.DEFAULT_FAMILIES  # procedural question families, their weights
  c.data.family_weights = (0.5, 0.5, 1.0, 1.0, 1.0, 1.0, 1.5)
  c.data.max_text_length = 24       # prompt + answer tokens, padded
  # The <image> placeholder before the question (True) or after it, where the visual
  # tokens can attend to the question.
  c.data.image_first = False
  c.data.num_workers = 0            # grain worker processes (0: in the main process)
  c.data.truncate = False           # conversations longer than max_text_length: cut, or error
  # A training record that cannot be used (unreadable image, broken conversation, too long
  # without truncate; data/pipeline.py): "error" stops the run naming its file and row,
  # "skip" logs it, counts it by reason and feeds the next good record in its place.
  c.data.on_bad_record = "error"
  # A weighted mixture of sources instead of the one above: ((source, tfds_dir, weight),
  # ...), e.g. (("llava", "/data/llava_tfds", 0.8), ("procedural", "", 0.2)); each example
  # is drawn from a source with probability weight / sum (data/pipeline.py `MixedSource`).
  c.data.mixture = ()
  # A row's shape: max_text_length token slots, of which image_slots (K) hold image
  # placeholders; at N visual tokens per image a row is max_text_length + K (N - 1)
  # positions whatever it holds. pack: several conversations per row (first fit in the
  # shuffled order, each attending to itself only), or one per row, padded.
  c.data.image_slots = 1
  c.data.pack = False

  # "project": the demo's own sentencepiece model (path "" -> WORKDIR/tokenizer.model,
  # trained on the suite's text if missing). An LLM's own: kind "hf" (tokenizer.json; template
  # "" renders its own Jinja chat_template, chatml | llama3 are hand-written for files
  # without one) or "sentencepiece" (templates llama2 | gemma).
  c.tokenizer = ConfigDict(dict(
      kind="project", path="", template="", image_token="",
      system_prompt=ml_collections.config_dict.placeholder(str)))  # None: the template's

  # TokenFLEX: the visual-token budget of each step is drawn from these (the paper's set).
  c.token_counts = (64, 144, 256)
  c.token_probs = (0.2, 0.3, 0.5)
  c.loss_weighting = "sqrt"         # per-sample 1/sqrt(answer tokens), or "token_mean"
  # The loss computes the logits this many vocabulary entries at a time (an online
  # softmax), so [batch, text, vocab] float32 logits never exist at once; 0 or more than
  # the vocabulary: all at once. A performance flag: the same loss (training/loss.py).
  c.loss_vocab_chunk = 16384
  # XLA's optimization level for the train step: "" (the compiler's default) or "O0" ..
  # "O3". A performance flag: a lower level compiles faster and runs slower (by the TPU
  # compiler's own estimate, docs/performance.md; training/compiled.py).
  c.compiler_optimization_level = ""

  c.batch_size = 32                 # global
  # Gradient accumulation: each step's global batch runs as this many microbatches, one
  # after another, their gradients summed into the one update of the whole batch
  # (training/steps.py); activations of one microbatch at a time.
  c.microbatches = 1
  # With microbatches: each microbatch draws its own visual-token count from token_counts
  # (the mix inside every step, one compiled forward and backward per count); False: one
  # count per step, as the paper trains.
  c.count_per_microbatch = False
  c.total_steps = 300
  c.optimizer = ConfigDict(dict(
      learning_rate=2e-3, warmup_steps=50, end_lr_fraction=0.05, b1=0.9, b2=0.98,
      weight_decay=0.05, clip_norm=1.0,
      mu_dtype="float32"))         # Adam's first moment: float32 or bfloat16
  # Learning-rate multiplier per top-level parameter module, every one named; 0 freezes
  # it. Config files replace the whole dict.
  c.lr_multipliers = ConfigDict(dict(vit=1.0, projector=1.0, llm=1.0))

  c.init = ConfigDict()
  c.init.checkpoint = ""            # a workdir: start from its latest params (all modules)
  c.init.vision_checkpoint = ""     # a workdir of pretrain_vision: take its ViT only

  c.mesh = ConfigDict(dict(shape=(-1, 1, 1)))  # (data, fsdp, tensor); -1: the rest
  # Logical axis -> mesh axes: the one table every sharding is derived from.
  c.sharding = ConfigDict(dict(rules=sharding.FSDP_TP_RULES))

  c.log_every = 25
  c.checkpoint_every = 150
  c.keep_checkpoints = 2
  # train, pretrain_vision and eval keep what they compile in this directory ("":
  # WORKDIR/compilation_cache; a shared gs:// folder serves several runs), so a restart
  # loads its steps instead of compiling them again (app/compilation_cache.py).
  c.compilation_cache = True
  c.compilation_cache_dir = ""

  # Stage 0 (pretrain_vision): loss weight of the per-patch object labels.
  c.vision_pretrain = ConfigDict(dict(object_weight=5.0))

  # Periodic evaluation while training, every this many steps (0: off): the eval
  # binary's evaluation (config.eval) of the current parameters, its accuracies to
  # TensorBoard (eval/<N>tokens/<family>) and its files to WORKDIR/eval/<suite or file
  # stem>/step_<step>/.
  c.eval_every = 0
  c.eval = ConfigDict()
  c.eval.suite = "scenes"           # or "mmbench" (TSV) / "vqa" (JSONL) / "vlmeval" at data_path
  c.eval.data_path = ""
  # vlmeval: one of evaluation/benchmarks.py BENCHMARKS ("": the data file's name says)
  c.eval.benchmark = ""
  c.eval.image_dir = ""             # vqa: folder of relative image paths ("" -> data_path's)
  c.eval.skip_malformed = False     # count and skip bad rows instead of failing
  c.eval.token_counts = (64, 100, 144, 196, 256)
  c.eval.examples_per_family = 200  # scenes suite
  c.eval.batch_size = 100
  c.eval.max_prompt_length = 20
  c.eval.max_new_tokens = 4
  c.eval.seed = 12345
  # Set: results go to WORKDIR/eval/<suite>_<tag>/ (e.g. "dev" for a development seed).
  c.eval.tag = ""
  c.eval.checkpoint_step = -1       # -1: the latest
  c.eval.overwrite = False          # replace an existing evaluation of that suite and step
  # predict --num_tokens=auto: answer at the smallest trained count, escalate to the
  # next while the answer's mean token log-probability is under this.
  c.eval.auto_threshold = -0.1
  # The counts it escalates over, ascending; () = the trained counts. The eval binary
  # also reports every other order (e.g. 64 -> 256, skipping 144) in results.json.
  c.eval.auto_counts = ()
  # The router (evaluation/auto_budget.py): its threshold is the cheapest whose accuracy
  # on the evaluated questions is within this of the best; save_router also writes it to
  # WORKDIR/router.json, where predict --num_tokens=auto uses it (evaluate on a
  # development seed for that, not on the questions you report).
  c.eval.router_tolerance = 0.01
  c.eval.save_router = False
  return c


def define_config_flag(flag_values: flags.FlagValues, sys_argv: list[str]
                       ) -> flags.FlagHolder:
  """``--config=FILE[:ARG]`` with its ``--config.a.b=V`` overrides (read from
  ``sys_argv``); the config is locked: an override of a key not in the schema fails."""
  return config_flags.DEFINE_config_file(
      "config", None, "ml_collections config file, e.g. configs/demo.py:stage=1 (default: "
      "the --workdir's own config.json).", flag_values=flag_values, lock_config=True,
      sys_argv=sys_argv)


def loaded(config_flag: flags.FlagHolder) -> ConfigDict:
  """The config of a `define_config_flag` flag. A file that cannot be loaded is an
  `errors.MissingInputError` (one line; config_flags reports it only when read)."""
  try:
    value = config_flag.value
    value.keys()
  except OSError as e:
    raise errors.MissingInputError(" ".join(str(e).split())) from None
  return value


def parse_arg(arg: str | None, file: str, **choices: tuple[str, ...]) -> dict[str, str]:
  """Parses a config file's argument, e.g. ``"stage=1,rules=fsdp"``, into {key: value}.

  ``choices`` maps each key to its allowed values, the first being the default. A bare
  first value (``"1"``) sets the first key. Raises `errors.ConfigError` naming ``file``,
  the key and the allowed values.
  """
  values = {key: allowed[0] for key, allowed in choices.items()}
  usage = ",".join(f"{key}={'|'.join(sorted(allowed))}" for key, allowed in choices.items())
  first = next(iter(choices))
  for i, part in enumerate(p for p in (arg or "").split(",") if p):
    key, value = part.split("=", 1) if "=" in part else (first if i == 0 else "", part)
    if key not in choices:
      raise errors.ConfigError(f"{file}: unknown argument {part!r}; use {usage}")
    if value not in choices[key]:
      raise errors.ConfigError(f"{file}: {key} must be {_one_of(sorted(choices[key]))}, "
                               f"got {value!r}; use {usage}")
    values[key] = value
  return values


def _one_of(values: list[str]) -> str:
  return values[0] if len(values) == 1 else f"{', '.join(values[:-1])} or {values[-1]}"


def read_saved(saved: Mapping[str, Any]) -> ConfigDict:
  """A workdir's saved config (``json.load`` of its config.json) as a full config:
  `base_config()` with the saved values laid over it.

  JSON lists become tuples where the schema has a tuple; ``lr_multipliers`` is taken
  whole. Legacy: a config without ``tokenizer`` used the project's sentencepiece model
  at ``data.tokenizer_path``; ``model.remat`` (a bool) is ``model.remat_policy`` "full"
  or "none". Keys the schema does not know are kept, with a warning.
  """
  saved = copy.deepcopy(dict(saved))
  model = saved.get("model")
  if isinstance(model, dict) and isinstance(model.get("remat"), bool):
    model["remat_policy"] = "full" if model.pop("remat") else "none"
  if "tokenizer" not in saved:
    data = saved.get("data") if isinstance(saved.get("data"), dict) else {}
    saved["tokenizer"] = dict(kind="project", path=data.pop("tokenizer_path", ""),
                              template="", image_token="")
  config = base_config()
  _overlay(config, saved, "config")
  return config


def _overlay(target: ConfigDict, saved: Mapping[str, Any], path: str) -> None:
  for key, value in saved.items():
    name = f"{path}.{key}"
    if key not in target:
      logging.warning("%s is not in the config schema (tokenflex_jax/app/config_schema.py); "
                      "kept as saved", name)
      target[key] = ConfigDict(value) if isinstance(value, dict) else value
    elif name == "config.lr_multipliers":
      target[key] = ConfigDict(value)
    elif isinstance(target[key], ConfigDict) and isinstance(value, dict):
      _overlay(target[key], value, name)
    else:
      if isinstance(target[key], tuple):
        value = _tuples(value)
      try:
        target[key] = value
      except TypeError as e:
        raise ValueError(f"{name}={value!r} in the saved config: {e}") from e


def _tuples(value: Any) -> Any:
  """JSON lists back to (nested) tuples, e.g. sharding rules [["batch", ["data"]]]."""
  return tuple(_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


def to_spec(config: ConfigDict | Mapping[str, Any] | specs.RunSpec) -> specs.RunSpec:
  """``config`` as a frozen `specs.RunSpec`, each field's type checked: an integer where
  the schema has one (a bool is not), a number for a float, a string, a bool, a tuple of
  such (from a tuple or list). Raises `errors.ConfigError`, one line per wrong field,
  naming it (``config.model.vit.width='64' must be an integer``). Keys the schema does
  not know (kept by `read_saved`) are left out. A `specs.RunSpec` is returned as is."""
  if isinstance(config, specs.RunSpec):
    return config
  tree = config.to_dict() if isinstance(config, ConfigDict) else dict(config)
  problems: list[str] = []
  spec = _build(specs.RunSpec, tree, "config", problems)
  if problems:
    raise errors.ConfigError("\n".join(problems))
  return spec


def read_saved_spec(saved: Mapping[str, Any]) -> specs.RunSpec:
  """A workdir's saved config (`read_saved`) as a `specs.RunSpec`."""
  return to_spec(read_saved(saved))


def _build(cls: type, tree: Any, path: str, problems: list[str]) -> Any:
  if not isinstance(tree, Mapping):
    problems.append(f"{path}={tree!r} must be a section (a dict of fields)")
    return None
  hints = typing.get_type_hints(cls)
  values = {}
  for field in dataclasses.fields(cls):
    name = f"{path}.{field.name}"
    if field.name not in tree:
      problems.append(f"{name} is missing (tokenflex_jax/app/config_schema.py lists every key)")
      continue
    values[field.name] = _typed(hints[field.name], tree[field.name], name, problems)
  if len(values) < len(dataclasses.fields(cls)):
    return None
  try:
    return cls(**values)
  except ValueError as e:  # a class that checks its own fields (e.g. LLMConfig.rope_type)
    problems.append(f"{path}: {e}")
    return None


_KINDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string"}


def _typed(kind: Any, value: Any, name: str, problems: list[str]) -> Any:
  """``value`` as ``kind`` (a spec class, a scalar type, ``X | None``, ``tuple[X, ...]``,
  ``Mapping[str, float]`` or ``Any``), or None with a line in ``problems``."""
  origin, args = typing.get_origin(kind), typing.get_args(kind)
  if dataclasses.is_dataclass(kind):
    return _build(kind, value, name, problems)
  if origin in (types.UnionType, typing.Union):
    if value is None and type(None) in args:
      return None
    return _typed(next(a for a in args if a is not type(None)), value, name, problems)
  if origin is tuple:
    if not isinstance(value, (tuple, list)):
      problems.append(f"{name}={value!r} must be a tuple")
      return None
    return tuple(_typed(args[0], v, f"{name}[{i}]", problems) for i, v in enumerate(value))
  if origin is Mapping or kind is Mapping:
    if not isinstance(value, Mapping):
      problems.append(f"{name}={value!r} must be a dict")
      return None
    return {str(k): _typed(args[1] if args else Any, v, f"{name}.{k}", problems)
            for k, v in value.items()}
  if kind is Any:
    return _tuples(value)
  ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if not ok:
    problems.append(f"{name}={value!r} must be {_KINDS.get(kind, kind.__name__)}")
    return None
  return value
