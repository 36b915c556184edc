"""The command line shared by the config-driven binaries (train, pretrain_vision, eval,
predict, bench, aot, convert).

One rule for ``--config`` in every binary: given, it is the config (a binary that reads
a trained workdir refuses one that describes another model, `trained_model`); not
given, the config is the workdir's own config.json, and ``--config.a.b=V`` overrides
apply to it (`with_workdir_config`).

Flags are defined when a binary starts, not when its module is imported, so the library
functions behind the binaries (``train.train``, ``eval.run_eval``, ...) can be imported
together by tests and notebooks.
"""

from __future__ import annotations

import os
import re
import sys
from typing import Any, Callable

import jax
from absl import app, flags
from absl import logging as absl_logging

from tokenflex_jax import entry, errors
from tokenflex_jax.app import compilation_cache as compilation_cache_lib
from tokenflex_jax.app import config_schema, distributed, workdir as workdir_lib

SAVED_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_config.py")


def _flag_value(argv: list[str], name: str) -> str | None:
  """The value of ``--name=V``, ``--name V`` (or with one dash) in argv, the last one;
  None if absent."""
  value = None
  for i, arg in enumerate(argv):
    match = re.fullmatch(rf"--?{name}(=(.*))?", arg)
    if match and match.group(1):
      value = match.group(2)
    elif match and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def with_workdir_config(argv: list[str]) -> list[str]:
  """``argv`` with ``--config=<saved_config.py>:<workdir>`` inserted first when it names
  a ``--workdir`` but no ``--config`` (flag files read, as absl and config_flags read
  them). A workdir without config.json (a new run, converted towers) is then one line and
  `errors.USAGE_EXIT_CODE`: pass ``--config``."""
  try:
    given = flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)
  except flags.Error:
    return argv  # absl reports the unreadable flag file.
  if any(re.match(r"--?config(=|$)", a) for a in given):
    return argv
  workdir = _flag_value(given, "workdir")
  if not workdir:
    return argv  # absl says that --config is required.
  if not workdir_lib.has_config(workdir):
    print(f"error: --workdir={workdir} has no {workdir_lib.CONFIG_FILE} (no run was trained "
          "there): pass --config=FILE", file=sys.stderr, flush=True)
    sys.exit(errors.USAGE_EXIT_CODE)
  return [argv[0], f"--config={SAVED_CONFIG_FILE}:{workdir}", *argv[1:]]


def command_line() -> list[str]:
  """``sys.argv`` under the rule of `with_workdir_config`; what the binaries parse."""
  return with_workdir_config(sys.argv)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS,
                 sys_argv: list[str] | None = None,
                 workdir_required: bool = True) -> tuple[flags.FlagHolder, flags.FlagHolder]:
  """Defines ``--config`` (with its ``--config.a.b=V`` overrides) and ``--workdir``.

  ``sys_argv`` is the command line the overrides are read from (default `command_line`,
  which `run_main` parses).
  """
  config = config_schema.define_config_flag(
      flag_values, command_line() if sys_argv is None else sys_argv)
  workdir = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, logs, tokenizer.",
                                flag_values=flag_values)
  required = ["config", "workdir"] if workdir_required else ["config"]
  flags.mark_flags_as_required(required, flag_values=flag_values)
  return config, workdir


def define_distributed_flags(flag_values: flags.FlagValues = flags.FLAGS
                             ) -> tuple[flags.FlagHolder, ...]:
  """``--coordinator_address``, ``--num_processes``, ``--process_id`` (see `distributed`)."""
  return (
      flags.DEFINE_string("coordinator_address", None,
                          "HOST:PORT of process 0, for a multi-process run started by hand "
                          "(TPU pods and SLURM are detected without it).",
                          flag_values=flag_values),
      flags.DEFINE_integer("num_processes", None, "Processes in the run (with "
                           "--coordinator_address).", flag_values=flag_values),
      flags.DEFINE_integer("process_id", None, "This process's index (with "
                           "--coordinator_address).", flag_values=flag_values))


def start_processes(address: flags.FlagHolder, count: flags.FlagHolder,
                    index: flags.FlagHolder) -> None:
  """Joins the multi-process runtime if the run has several processes; quietens the
  logs of every process but 0 to warnings."""
  distributed.initialize(address.value, count.value, index.value)
  if jax.process_index() != 0:
    absl_logging.set_verbosity(absl_logging.WARNING)


def run_main(main: Callable[[list[str]], Any]) -> None:
  """`entry.run` of a binary's main; the command line is `command_line` for a binary
  that `define_flags` gave ``--config``."""
  takes_config = ("config" in flags.FLAGS and
                  flags.FLAGS["config"].flag_type() == "config object")  # config_flags'
  entry.run(main, command_line() if takes_config else sys.argv)


def run(job: Callable[[config_schema.ConfigDict, str], Any],
        compilation_cache: bool = False) -> None:
  """Parses ``--config=FILE[:ARG] [--config.a.b=V ...] --workdir=DIR`` (and the
  multi-process flags) and calls ``job(config, workdir)`` under `entry.run`; with
  ``compilation_cache`` (a binary whose restarts compile the same programs), first
  points JAX's persistent cache where the config says (`compilation_cache`)."""
  config, workdir = define_flags()
  process_flags = define_distributed_flags()

  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    loaded = config_schema.loaded(config)
    start_processes(*process_flags)
    if compilation_cache:
      compilation_cache_lib.enable(loaded, workdir.value)
    job(loaded, workdir.value)

  entry.run(main, command_line())
