"""The config schema: config files only override `base_config`, one argument parser, and
saved configs read back through the schema."""

from __future__ import annotations

import json

import ml_collections
import pytest
from absl import flags
from ml_collections import config_flags

from configs import demo, paper
from tests.xla_env import REPO
from tokenflex_jax import sharding
from tokenflex_jax.app.config_schema import base_config, parse_arg, read_saved

ARGS = [(demo, f"stage={s},rules={r}") for s in "012" for r in demo.RULES] + [
    (paper, f"stage={s}") for s in "123"]


def _keys(tree: dict, prefix: str = "") -> set[str]:
  out = set()
  for key, value in tree.items():
    out.add(prefix + key)
    # lr_multipliers is replaced whole: its module names are per config.
    if isinstance(value, dict) and prefix + key != "lr_multipliers":
      out |= _keys(value, f"{prefix}{key}.")
  return out


@pytest.mark.parametrize("module,arg", ARGS)
def test_config_files_add_no_keys(module, arg):
  config = module.get_config(arg)
  assert _keys(config.to_dict()) == _keys(base_config().to_dict())


def test_parser_accepts_every_spelling():
  demo_choices = dict(stage=("2", "0", "1"), rules=("fsdp_tp", "dp", "fsdp"))
  for arg, want in [(None, ("2", "fsdp_tp")), ("", ("2", "fsdp_tp")), ("1", ("1", "fsdp_tp")),
                    ("stage=1", ("1", "fsdp_tp")), ("stage=1,rules=fsdp", ("1", "fsdp")),
                    ("rules=dp", ("2", "dp")), ("0,rules=dp", ("0", "dp"))]:
    values = parse_arg(arg, "configs/demo.py", **demo_choices)
    assert (values["stage"], values["rules"]) == want, arg
  for arg, want in [(None, 3), ("3", 3), ("stage=3", 3), ("1", 1), ("stage=2", 2)]:
    assert paper.get_config(arg).stage == want
  assert demo.get_config("stage=0,rules=dp").sharding.rules == sharding.DATA_PARALLEL_RULES


@pytest.mark.parametrize("module,arg,match", [
    (demo, "stage=7", r"configs/demo.py: stage must be 0, 1 or 2, got '7'"),
    (demo, "rules=tp", r"configs/demo.py: rules must be dp, fsdp or fsdp_tp"),
    (demo, "steps=3", r"configs/demo.py: unknown argument 'steps=3'; use stage=0\|1\|2,rules="),
    (demo, "1,2", r"configs/demo.py: unknown argument '2'"),
    (paper, "stage=0", r"configs/paper.py: stage must be 1, 2 or 3, got '0'"),
    (paper, "4", r"configs/paper.py: stage must be 1, 2 or 3"),
])
def test_parser_rejects_bad_arguments(module, arg, match):
  with pytest.raises(ValueError, match=match):
    module.get_config(arg)


def _flags(*args: str) -> ml_collections.ConfigDict:
  argv = ["prog", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "config file", flag_values=fv,
                                  lock_config=True, sys_argv=argv)
  fv(argv)
  return fv.config


def test_command_line_overrides_follow_references_and_tuples():
  c = _flags(f"--config={REPO}/configs/paper.py:stage=1", "--config.model.vit.image_size=64",
             "--config.token_counts=(144,)", "--config.mesh.shape=(1,-1,4)")
  assert c.data.image_size == 64 and c.stage == 1
  assert c.token_counts == (144,) and c.mesh.shape == (1, -1, 4)
  assert _flags(f"--config={REPO}/configs/demo.py").data.image_size == 32
  with pytest.raises(Exception, match="no_such_key"):
    _flags(f"--config={REPO}/configs/demo.py", "--config.no_such_key=1")


@pytest.mark.parametrize("module,arg", ARGS)
def test_saved_config_round_trips(module, arg):
  config = module.get_config(arg)
  back = read_saved(json.loads(config.to_json_best_effort()))
  assert back.to_dict() == config.to_dict()
  assert back.sharding.rules == config.sharding.rules
  back.model.vit.image_size = 48  # still one field referenced twice
  assert back.data.image_size == 48


def test_legacy_saved_config_gets_the_defaults():
  saved = json.loads(demo.get_config().to_json_best_effort())
  del saved["tokenizer"], saved["model"]["visual_position_span"]
  del saved["model"]["remat_policy"], saved["model"]["scan_layers"]
  saved["model"]["remat"] = True  # the bool the schema had before remat policies
  saved["data"]["tokenizer_path"] = "/old/tokenizer.model"
  saved["gone"] = {"a": 1}
  c = read_saved(saved)
  assert c.tokenizer.to_dict() == dict(kind="project", path="/old/tokenizer.model",
                                       template="", image_token="", system_prompt=None)
  assert "tokenizer_path" not in c.data
  assert c.model.visual_position_span == 0 and c.model.remat_policy == "full"
  assert c.model.scan_layers is True and "remat" not in c.model
  assert c.gone.a == 1  # unknown keys are kept (with a warning)


def test_saved_sharding_rules_are_tuples_again():
  for rules in demo.RULES.values():
    saved = json.loads(json.dumps({"sharding": {"rules": rules}}))
    assert read_saved(saved).sharding.rules == rules
    assert sharding.rules_from_config(read_saved(saved).sharding.rules) == rules
