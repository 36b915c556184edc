"""`config_checks.check`: every bad config is a `ConfigError` naming the field, before
anything compiles; the binaries print it as one line and exit 2."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from configs import bench, demo, gpu_bench, paper, reproduce
from tests.tiny import tiny_config
from tests.xla_env import REPO
from tokenflex_jax import errors, model_config, predict, sharding
from tokenflex_jax.app import config_checks, config_schema
from tokenflex_jax.models import patch_labeler, vlm
from tokenflex_jax.models.patch_labeler import PatchLabeler
from tokenflex_jax.models.vlm import VLM

Multipliers = ml_collections.ConfigDict


# The checks each binary runs, by the name the cases below use.
JOBS = {"train": config_checks.TRAIN, "aot": config_checks.AOT,
        "pretrain_vision": config_checks.PRETRAIN_VISION, "eval": config_checks.EVAL,
        "predict": config_checks.PREDICT}


def check(config, num_devices=None, job="train"):
  """The config as a binary checks it: typed once (`config_schema.to_spec`), then
  ``job``'s checks."""
  config_checks.check(config_schema.to_spec(config), JOBS[job], num_devices)


def case(id_, pattern, job="train", num_devices=8, stage=2, **overrides):
  """A tiny config with ``overrides`` (dotted keys as ``a__b``) that ``job`` refuses on
  ``num_devices`` devices with a message matching ``pattern`` (from its start)."""
  return pytest.param(stage, overrides, job, num_devices, pattern, id=id_)


CASES = [
    # Token counts: squares, and no more than the ViT's patch grid (16 x 16 here).
    case("counts_not_square", r"config\.token_counts: num_visual_tokens=150 is not a "
         r"positive square", token_counts=(64, 150), token_probs=(0.5, 0.5)),
    case("counts_larger_than_the_grid", r"config\.token_counts=\(64, 1024\): 1024 visual "
         r"tokens need a 32x32 pool, larger than the ViT's 16x16 patch grid "
         r"\(config\.model\.vit\.image_size / patch_size\)",
         token_counts=(64, 1024), token_probs=(0.5, 0.5)),
    case("counts_larger_than_a_coarser_grid", r"config\.token_counts=\(64, 144, 256\): 144 "
         r"visual tokens need a 12x12 pool, larger than the ViT's 8x8 patch grid",
         model__vit__patch_size=4),
    case("counts_larger_than_the_grid_predict", r"config\.token_counts=\(64, 1024\): 1024",
         job="predict", token_counts=(64, 1024), token_probs=(0.5, 0.5)),
    case("counts_empty", r"config\.token_counts is empty", token_counts=(), token_probs=()),
    case("counts_duplicates", r"config\.token_counts has duplicates",
         token_counts=(64, 64), token_probs=(0.5, 0.5)),
    case("eval_tag_not_a_folder_name", r"config\.eval\.tag='\.\./x': letters, digits",
         job="eval", eval__tag="../x"),
    case("eval_counts_not_square", r"config\.eval\.token_counts: num_visual_tokens=120",
         job="eval", eval__token_counts=(64, 120)),
    case("eval_counts_larger_than_the_grid", r"config\.eval\.token_counts=\(64, 324\): 324 "
         r"visual tokens need a 18x18 pool", job="eval", eval__token_counts=(64, 324)),
    case("eval_counts_checked_when_training", r"config\.eval\.token_counts=\(64, 324\)",
         eval_every=10, eval__token_counts=(64, 324)),
    # Token probabilities.
    case("probs_do_not_sum_to_1", r"config\.token_probs must be non-negative and sum to 1, "
         r"got \(0\.5, 0\.5, 0\.5\)", token_probs=(0.5, 0.5, 0.5)),
    case("probs_wrong_length", r"config\.token_probs has 2 entries but config\.token_counts "
         r"has 3", token_probs=(0.5, 0.5)),
    case("probs_negative", r"config\.token_probs must be non-negative",
         token_probs=(-0.2, 0.7, 0.5)),
    # The mesh against the devices, and the rules.
    case("mesh_needs_other_devices", r"config\.mesh\.shape=\(2, 2, 1\) needs 4 devices, but 8 "
         r"are available", mesh__shape=(2, 2, 1)),
    case("mesh_rest_does_not_divide", r"config\.mesh\.shape=\(-1, 3, 1\): 8 devices are not "
         r"divisible by 3", mesh__shape=(-1, 3, 1)),
    case("mesh_of_the_simulated_devices", r"config\.mesh\.shape=\(2, 2, 2\) needs 8 devices, "
         r"but 64 are available", job="aot", num_devices=64),
    case("mesh_entries", r"config\.mesh\.shape must have 3 entries", mesh__shape=(2, 4)),
    case("mesh_zero", r"config\.mesh\.shape=\(0, -1, 1\): every entry must be a positive",
         mesh__shape=(0, -1, 1)),
    case("rules_unknown_axis", r"config\.sharding\.rules: 'batch' maps to unknown mesh axis "
         r"'model'", sharding__rules=(("batch", "model"),)),
    # The global batch against the data-parallel size the rules give it.
    case("batch_over_data_and_fsdp", r"config\.batch_size=6 must be a positive multiple of "
         r"the data-parallel size 4: config\.sharding\.rules split \"batch\" over mesh axes "
         r"\('data', 'fsdp'\)", batch_size=6),
    case("batch_over_every_axis", r"config\.batch_size=12 must be a positive multiple of the "
         r"data-parallel size 8", batch_size=12, sharding__rules=sharding.DATA_PARALLEL_RULES),
    case("batch_pretrain_vision", r"config\.batch_size=6", job="pretrain_vision", stage=0,
         batch_size=6),
    case("mixture_pretrain_vision", r"config\.data\.mixture: stage 0 trains on the "
         r"procedural scenes alone", job="pretrain_vision", stage=0,
         data__mixture=(("procedural", "", 1.0),)),
    case("count_per_microbatch_pretrain_vision", r"config\.count_per_microbatch: stage 0 "
         r"trains the ViT alone", job="pretrain_vision", stage=0, microbatches=2,
         count_per_microbatch=True),
    case("eval_batch", r"config\.eval\.batch_size=6 must be a positive multiple of the "
         r"data-parallel size 4", job="eval", eval__batch_size=6),
    # Learning rates and multipliers (a multiplier of 0 freezes: valid, see below).
    case("learning_rate_zero", r"config\.optimizer\.learning_rate=0\.0 must be positive",
         optimizer__learning_rate=0.0),
    case("learning_rate_negative", r"config\.optimizer\.learning_rate=-1\.0 must be positive",
         optimizer__learning_rate=-1.0),
    case("multiplier_of_no_module", r"config\.lr_multipliers names \['vision'\], but the "
         r"model's modules are \['llm', 'projector', 'vit'\]",
         lr_multipliers=Multipliers(dict(vit=1.0, projector=1.0, llm=1.0, vision=1.0))),
    case("multiplier_missing", r"config\.lr_multipliers has no entry for modules "
         r"\['projector'\]", lr_multipliers=Multipliers(dict(vit=1.0, llm=1.0))),
    case("multiplier_negative", r"config\.lr_multipliers\.vit=-0\.1 must be >= 0",
         lr_multipliers=Multipliers(dict(vit=-0.1, projector=1.0, llm=1.0))),
    case("multipliers_of_the_vlm_for_pretrain_vision", r"config\.lr_multipliers names "
         r"\['llm', 'projector'\], but the model's modules are \['color_head', "
         r"'object_head', 'vit'\]", job="pretrain_vision"),
    case("multipliers_of_pretrain_vision_for_the_vlm", r"config\.lr_multipliers names "
         r"\['color_head', 'object_head'\]", stage=0),
    case("mu_dtype", r"config\.optimizer\.mu_dtype must be one of", optimizer__mu_dtype="int8"),
    case("clip_norm", r"config\.optimizer\.clip_norm=0\.0 must be positive",
         optimizer__clip_norm=0.0),
    case("beta", r"config\.optimizer\.b2=1\.0 must be in \[0, 1\)", optimizer__b2=1.0),
    case("warmup", r"config\.optimizer\.warmup_steps=-1 must be >= 0",
         optimizer__warmup_steps=-1),
    # The model.
    case("llm_heads_not_a_multiple_of_kv_heads", r"config\.model\.llm\.num_heads=3 is not a "
         r"multiple of config\.model\.llm\.num_kv_heads=2",
         model__llm__num_heads=3, model__llm__num_kv_heads=2),
    case("llm_head_dim_odd", r"config\.model\.llm\.head_dim=15 must be even",
         model__llm__head_dim=15),
    case("llm_rope_type", r"config\.model\.llm: LLMConfig\.rope_type='yarn' is not one of",
         model__llm__rope_type="yarn"),
    case("llm_size", r"config\.model\.llm\.depth=0 must be a positive integer",
         model__llm__depth=0),
    case("llm_dtype", r"config\.model\.llm\.dtype='float33' is not a floating-point dtype",
         model__llm__dtype="float33"),
    case("vit_width_not_divisible_by_heads", r"config\.model\.vit\.width=16 is not divisible "
         r"by config\.model\.vit\.num_heads=3", model__vit__num_heads=3),
    case("vit_heads_pretrain_vision", r"config\.model\.vit\.width=16", job="pretrain_vision",
         stage=0, model__vit__num_heads=3),
    case("vit_patch_larger_than_the_image", r"config\.model\.vit\.patch_size=64 is larger "
         r"than the images", model__vit__patch_size=64),
    case("projector_position_embedding_width", r"config\.model\.projector\.position_embedding "
         r"needs config\.model\.vit\.width divisible by 4", model__vit__width=18),
    case("remat_policy", r"config\.model\.remat_policy must be one of",
         model__remat_policy="some"),
    case("attention", r"config\.model\.attention must be one of", model__attention="flash"),
    case("compiler_optimization_level", r"config\.compiler_optimization_level must be \"\" or "
         r"one of \('O0', 'O1', 'O2', 'O3'\), got 'fast'", compiler_optimization_level="fast"),
    case("pooling", r"config\.model\.projector\.pooling must be one of",
         model__projector__pooling="max"),
    case("projector_mlp", r"config\.model\.projector\.mlp must be one of",
         model__projector__mlp="relu"),
    case("visual_position_layout", r"config\.model\.visual_position_layout must be one of",
         model__visual_position_layout="spiral"),
    case("visual_position_span", r"config\.model\.visual_position_span=-1 must be >= 0",
         model__visual_position_span=-1),
    # The loss, the loop's cadences.
    case("eval_every_negative", r"config\.eval_every=-1 must be >= 0", eval_every=-1),
    # Periodic evaluation needs what the eval binary needs: here an MMBench file.
    case("eval_every_without_its_data", r"config\.eval\.suite='mmbench' needs "
         r"config\.eval\.data_path", eval_every=10, eval__suite="mmbench"),
    case("eval_every_batch", r"config\.eval\.batch_size=6", eval_every=10,
         eval__batch_size=6),
    case("loss_weighting", r"config\.loss_weighting must be one of .*'mean'",
         loss_weighting="mean"),
    case("log_every", r"config\.log_every must be positive, got 0", log_every=0),
    case("checkpoint_every", r"config\.checkpoint_every must be positive",
         checkpoint_every=-5),
    case("keep_checkpoints", r"config\.keep_checkpoints must be positive", keep_checkpoints=0),
    # The tokenizer's kind and path, the eval settings.
    case("tokenizer_kind", r"config\.tokenizer\.kind must be one of",
         tokenizer__kind="tiktoken"),
    case("tokenizer_path", r"config\.tokenizer\.kind='hf' needs config\.tokenizer\.path",
         job="eval", tokenizer__kind="hf"),
    case("eval_suite", r"config\.eval\.suite must be one of \('scenes', 'mmbench', 'vqa', "
         r"'vlmeval'\), got 'coco'", job="eval", eval__suite="coco"),
    case("eval_data_path", r"config\.eval\.suite='vqa' needs config\.eval\.data_path, the "
         r"JSONL file$", job="eval", eval__suite="vqa"),
    case("periodic_eval_data_path", r"config\.eval\.suite='mmbench' needs config\.eval\."
         r"data_path, the TSV file \(periodic evaluation while training, config\.eval_every="
         r"10; 0 turns it off\)$", eval_every=10, eval__suite="mmbench"),
    # config.data, for every job (the build folder only where data is read).
    case("data_source", r"config\.data\.source must be one of \('procedural', 'tfds', "
         r"'llava'\), got 'coco'$", job="eval", data__source="coco"),
    case("data_tfds_dir", r"config\.data\.tfds_dir is empty: config\.data\.source='llava' "
         r"reads a build of python -m tokenflex_jax\.data\.llava_tfds from it$",
         data__source="llava"),
    case("data_workers", r"config\.data\.num_workers=-1 must be an integer >= 0$",
         job="aot", data__num_workers=-1),
    case("data_text_length", r"config\.data\.max_text_length=1 must be an integer >= 2 "
         r"\(config\.data\.image_slots placeholders and one answer token\)$",
         job="predict", data__max_text_length=1),
    case("data_image_slots", r"config\.data\.image_slots=0 must be an integer >= 1$",
         data__image_slots=0),
    case("data_scene_size", r"config\.data\.image_size=16: the procedural scenes are drawn "
         r"at 32 px or more$", job="pretrain_vision", stage=0, data__image_size=16,
         model__vit__image_size=16),
    case("data_families", r"config\.data\.families / family_weights: unknown question "
         r"family 'colour'", data__families=("colour",), data__family_weights=(1.0,)),
    case("data_family_weights", r"config\.data\.families / family_weights: 1 family_weights "
         r"for 2 families", data__families=("shape", "count"), data__family_weights=(1.0,)),
    case("eval_auto_counts", r"config\.eval\.auto_counts=\(64, 100\) must be two or more of "
         r"the trained \(and evaluated\) counts \(64, 144\)", job="eval",
         eval__token_counts=(64, 100, 144), eval__auto_counts=(64, 100)),
]


@pytest.mark.parametrize("stage,overrides,job,num_devices,pattern", CASES)
def test_bad_config_is_a_config_error_naming_the_field(stage, overrides, job, num_devices,
                                                        pattern):
  config = tiny_config(stage=stage, **overrides)
  with pytest.raises(errors.ConfigError, match="^" + pattern):
    check(config, num_devices, job=job)


def test_every_problem_of_a_config_is_reported_at_once():
  """Three independent mistakes, three lines, in one check; the eval counts are not
  checked while training without periodic evaluation."""
  config = tiny_config(token_counts=(64, 120), token_probs=(0.5, 0.5),
                       optimizer__learning_rate=-1.0, eval__token_counts=(64, 324))
  check(tiny_config(eval__token_counts=(64, 324)), 8)  # eval_every=0
  with pytest.raises(errors.ConfigError) as raised:
    check(config, 8)
  lines = str(raised.value).splitlines()
  assert len(lines) == 2 and lines[0].startswith("config.optimizer.learning_rate=-1.0")
  assert lines[1].startswith("config.token_counts"), lines
  config.eval_every = 10
  config.eval.suite = "vqa"
  with pytest.raises(errors.ConfigError) as raised:
    check(config, 8)
  lines = str(raised.value).splitlines()
  assert [re.match(r"[\w.]+", l).group() for l in lines] == [
      "config.optimizer.learning_rate", "config.token_counts", "config.eval.token_counts",
      "config.eval.suite"], lines


def test_a_bad_count_and_too_many_probabilities_are_both_reported_once_each():
  with pytest.raises(errors.ConfigError) as raised:
    check(tiny_config(token_counts=(64, 1024), token_probs=(0.2, 0.3, 0.5)), 8)
  lines = str(raised.value).splitlines()
  assert len(lines) == 2, lines
  assert lines[0].startswith("config.token_counts=(64, 1024): 1024 visual tokens need a")
  assert lines[1] == "config.token_probs has 3 entries but config.token_counts has 2"


def test_a_config_error_is_a_one_line_user_error_and_a_value_error():
  assert issubclass(errors.ConfigError, errors.UserError)
  assert issubclass(errors.ConfigError, ValueError)


@pytest.mark.parametrize("stage,job", [(0, "pretrain_vision"), (1, "train"), (1, "aot"),
                                       (2, "train"), (2, "eval"), (2, "predict")])
def test_tiny_configs_pass(stage, job):
  """Including stage 1's frozen ViT: a multiplier of 0 is valid."""
  config = tiny_config(stage=stage)
  check(config, 8, job=job)
  check(config, job=job)  # The default: jax.device_count(), 8 here.


def test_shipped_configs_pass():
  for stage in ("0", "1", "2"):
    config = demo.get_config(f"stage={stage}")
    for job in ("pretrain_vision",) if stage == "0" else ("train", "eval", "predict"):
      check(config, 1, job=job)
  for stage in ("1", "2", "3"):
    config = paper.get_config(stage)
    check(config, 64, job="aot")
    config.tokenizer.path = "/models/qwen/tokenizer.json"
    config.eval.data_path = "/data/mmbench.tsv"
    for job in ("eval", "predict"):
      check(config, 64, job=job)
    with pytest.raises(errors.ConfigError, match=r"^config\.data\.tfds_dir is empty"):
      check(config, 64, job="train")  # training reads the LLaVA build
    config.data.tfds_dir = "/data/llava_tfds"
    check(config, 64, job="train")
  check(bench.get_config(), 1)
  for size in gpu_bench.SIZES:
    check(gpu_bench.get_config(f"size={size}"), 1)
  for variant in reproduce.VARIANTS:
    for stage in ("1", "2"):
      check(reproduce.get_config(f"model={variant},stage={stage}"), 1)


def test_the_vocabulary_check_names_the_field_and_the_tokenizer():
  config = tiny_config()
  with pytest.raises(errors.ConfigError, match=r"^config\.model\.llm\.vocab_size=256 is "
                     r"smaller than the tokenizer's 300 pieces \(config\.tokenizer\.kind="
                     r"'project', path='WORKDIR/tokenizer\.model'\)"):
    model_config.vlm_config(config_schema.to_spec(config), model_config.FixedTokenIds(300))


def test_predict_checks_num_tokens_against_the_patch_grid():
  """Refused before the workdir is read (there is none)."""
  with pytest.raises(errors.ConfigError, match=r"^--num_tokens=\(1024,\): 1024 visual tokens "
                     r"need a 32x32 pool, larger than the ViT's 16x16 patch grid"):
    predict.predict("/nonexistent", "/nonexistent.png", "?", 1024, config=tiny_config())


def test_module_names_are_the_models_top_level_modules():
  """`vlm.MODULES` and `patch_labeler.MODULES`, which config.lr_multipliers is checked
  against, are the top-level modules of the models' parameters."""
  config = config_schema.to_spec(tiny_config())
  size, length = config.data.image_size, config.data.max_text_length
  images = jnp.zeros((1, size, size, 3))
  model = VLM(model_config.vlm_config(config, model_config.FixedTokenIds(256)))
  params = jax.eval_shape(lambda r: model.init(
      r, images, jnp.zeros((1, length), jnp.int32), 64)["params"], jax.random.key(0))
  assert sorted(params) == sorted(vlm.MODULES)
  labeler = PatchLabeler(model_config.vit_config(config), num_colors=3, num_objects=2)
  params = jax.eval_shape(lambda r: labeler.init(r, images)["params"], jax.random.key(0))
  assert sorted(params) == sorted(patch_labeler.MODULES)


def _binary(module, *flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", module, *flags], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("module,flags,line", [
    ("tokenflex_jax.train", ("--config=configs/demo.py", "--config.optimizer.learning_rate=-1"),
     r"error: config\.optimizer\.learning_rate=-1\.0 must be positive .*"),
    ("tokenflex_jax.pretrain_vision", ("--config=configs/demo.py:stage=0",
                                       "--config.model.vit.num_heads=3"),
     r"error: config\.model\.vit\.width=64 is not divisible by config\.model\.vit\.num_heads=3"),
    ("tokenflex_jax.aot", ("--config=configs/paper.py", "--num_cpu_devices=64",
                           "--config.mesh.shape=(1,-1,3)"),
     r"error: config\.mesh\.shape=\(1, -1, 3\): 64 devices are not divisible by 3"),
], ids=["train", "pretrain_vision", "aot"])
def test_binary_refuses_a_bad_config_in_one_line(tmp_path, module, flags, line):
  """Exit 2, the last line of stderr the message, no traceback, nothing compiled or
  written (each takes seconds: the check comes before any compile)."""
  workdir = tmp_path / "run"
  result = _binary(module, *flags, f"--workdir={workdir}")
  assert result.returncode == errors.USAGE_EXIT_CODE, result.stderr[-3000:]
  assert re.fullmatch(line, result.stderr.strip().splitlines()[-1]), result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert "Compiling" not in result.stderr and "compiled" not in result.stderr
  assert not workdir.exists()


def test_binary_reports_three_mistakes_in_three_lines(tmp_path):
  """Exit 2, one `error:` line per mistake, in one run, nothing written."""
  workdir = tmp_path / "run"
  result = _binary("tokenflex_jax.train", "--config=configs/demo.py",
                   "--config.optimizer.learning_rate=-1", "--config.token_counts=(64,120)",
                   "--config.token_probs=(0.5,0.5)", "--config.eval_every=10",
                   "--config.eval.token_counts=(64,324)", f"--workdir={workdir}")
  assert result.returncode == errors.USAGE_EXIT_CODE, result.stderr[-3000:]
  errors_printed = [l for l in result.stderr.splitlines() if l.startswith("error: ")]
  assert [re.match(r"error: ([\w.]+)", l).group(1) for l in errors_printed] == [
      "config.optimizer.learning_rate", "config.token_counts", "config.eval.token_counts"
  ], result.stderr[-3000:]
  assert not workdir.exists()


def test_problems_record_user_errors_and_let_bugs_through():
  """A user error of any kind is a line; a knock-on ValueError after one is dropped; a bug
  (any other exception) is never swallowed."""
  def raising(error):
    def fn():
      raise error
    return fn

  problems = config_checks.Problems()
  with pytest.raises(ZeroDivisionError):  # nothing recorded yet: not a consequence
    problems.check(raising(ZeroDivisionError("patch 0")))
  problems.check(raising(errors.MissingInputError("config.tokenizer.path: no such file")))
  problems.check(raising(ZeroDivisionError("patch 0")))  # a consequence: dropped
  with pytest.raises(RuntimeError, match="a bug"):
    problems.check(raising(RuntimeError("a bug")))
  assert problems.lines == ["config.tokenizer.path: no such file"]
  with pytest.raises(errors.ConfigError, match="^config.tokenizer.path: no such file$"):
    problems.raise_all()


BAD_DATA = "--config.data.on_bad_record=sometimes"
BAD_DATA_LINE = ("error: config.data.on_bad_record must be 'error' (stop at a bad record) or "
                 "'skip' (count and skip it), got 'sometimes'")


@pytest.mark.parametrize("module,flags", [
    ("tokenflex_jax.train", ("--config=configs/demo.py",)),
    ("tokenflex_jax.pretrain_vision", ("--config=configs/demo.py:stage=0",)),
    ("tokenflex_jax.eval", ("--config=configs/demo.py",)),
    ("tokenflex_jax.predict", ("--config=configs/demo.py", "--image=x.png", "--question=q",
                               "--num_tokens=64")),
    ("tokenflex_jax.bench", ("--config=configs/bench.py",)),
    ("tokenflex_jax.microbench", ("--config=configs/bench.py",)),
    ("tokenflex_jax.aot", ("--config=configs/demo.py", "--num_cpu_devices=8")),
    ("tokenflex_jax.gpu_check", ("--config=configs/gpu_bench.py:size=tiny", "--dry")),
    ("tokenflex_jax.convert", ("--config=configs/demo.py", "--vision=/nonexistent")),
    ("tokenflex_jax.convert", ("--config=configs/demo.py", "--export_to=/nonexistent")),
], ids=lambda v: v.rsplit(".", 1)[-1] if isinstance(v, str) else "")
def test_every_binary_refuses_a_bad_data_value_at_the_door(tmp_path, module, flags):
  """A bad ``config.data.*`` value: exit 2, one line naming the field, nothing written."""
  workdir = tmp_path / "run"
  result = _binary(module, *flags, BAD_DATA, f"--workdir={workdir}")
  assert result.returncode == errors.USAGE_EXIT_CODE, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == BAD_DATA_LINE, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert not workdir.exists()


def test_the_row_planner_refuses_a_bad_data_value_before_reading_rows(tmp_path):
  """The planner (no workdir): exit 2, the same one line, the lengths file not read."""
  rows = tmp_path / "rows.jsonl"
  result = _binary("tokenflex_jax.data.packing", "--config=configs/demo.py", BAD_DATA,
                   f"--lengths={rows}", "--synthetic=10")
  assert result.returncode == errors.USAGE_EXIT_CODE, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1] == BAD_DATA_LINE, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and not rows.exists()
