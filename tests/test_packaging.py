"""pyproject.toml and requirements.txt agree, and every console script resolves."""

import importlib
import os
import tomllib

from tests.xla_env import REPO


def _requirements(name="requirements.txt"):
  with open(os.path.join(REPO, name), encoding="utf-8") as f:
    lines = [line.split("#")[0].strip() for line in f]
  return {line for line in lines if line}


def test_pyproject_pins_match_requirements():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    project = tomllib.load(f)["project"]
  runtime = set(project["dependencies"])
  test = set(project["optional-dependencies"]["test"])
  assert runtime == _requirements()
  assert test == _requirements("requirements-test.txt")
  assert set(project["optional-dependencies"]["tpu"]) == _requirements("requirements-tpu.txt")
  assert all("==" in d for d in runtime | test)


def test_console_scripts_point_at_main_functions():
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    scripts = tomllib.load(f)["project"]["scripts"]
  assert {"tokenflex-train", "tokenflex-eval", "tokenflex-predict"} <= set(scripts)
  for target in scripts.values():
    module, func = target.split(":")
    assert callable(getattr(importlib.import_module(module), func)), target
