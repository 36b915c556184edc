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

import functools
import glob
import importlib.util
import logging
import os
import re
import sys
from collections.abc import Mapping
from typing import Any, Callable

import jax
from absl import app, flags
from absl import logging as absl_logging

from tokenflex_jax import config_schema, distributed, errors, workdir as workdir_lib

SAVED_CONFIG_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "saved_config.py")


class QuietLibraryInfo(logging.Filter):
  """Drops the library lines that need no action: INFO from inside Orbax (dozens per
  checkpoint), JAX's INFO that a backend it probes for (a TPU on a GPU or CPU host) is
  absent, Orbax's warning that a manager opened to read is read-only and TFDS's that a
  builder has a config. Keeps every other warning."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno <= logging.INFO:
      return not ("/orbax/" in record.pathname or (
          record.name.startswith("jax") and str(record.msg).startswith("Unable to initialize "
                                                                        "backend")))
    message = str(record.msg)
    return not (("/orbax/" in record.pathname and message.startswith("Given directory is read "
                                                                      "only")) or
                ("/tensorflow_datasets/" in record.pathname and
                 message.startswith("Using custom data configuration")))


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


def handle_errors(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  """Wraps an ``absl.app.run`` main: a `errors.UserError` prints one line per problem and exits with
  `errors.USAGE_EXIT_CODE`; a non-finite loss prints one line and exits 1;
  `errors.Preempted` exits with `errors.PREEMPTED_EXIT_CODE`
  (the launch scripts restart on it); any other exception keeps its traceback."""

  @functools.wraps(main)
  def wrapped(argv: list[str]) -> Any:
    try:
      return main(argv)
    except errors.UserError as e:
      for line in str(e).splitlines() or [""]:  # A config's several problems: a line each.
        print(f"error: {line}", file=sys.stderr, flush=True)
      sys.exit(errors.USAGE_EXIT_CODE)
    except errors.NonFiniteLossError as e:
      print(f"error: {e}", file=sys.stderr, flush=True)
      sys.exit(1)
    except errors.Preempted as e:
      absl_logging.warning("%s", e)
      sys.exit(errors.PREEMPTED_EXIT_CODE)

  return wrapped


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag (unknown, malformed, a missing config file or
  key) as one line and `errors.USAGE_EXIT_CODE` instead of absl's usage text."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e)
  except (AttributeError, KeyError) as e:  # config_flags: an override of a key not there
    key = str(e).strip("\"'")
    named = [a for a in argv if a.startswith("--config.") and key and key in a.split("=")[0]]
    message = (f"{named[0] if named else 'a --config override'}: the config has no key "
               f"{key!r} (config_schema.py lists every key)")
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(errors.USAGE_EXIT_CODE)


def host_platforms(environ: Mapping[str, str], device_files: Callable[[str], list[str]],
                   installed: Callable[[str], bool]) -> str | None:
  """The JAX platforms for a host with libtpu installed (requirements-tpu.txt, for the
  TPU compiler) but no TPU chips: "cpu", or "cuda,cpu" with an NVIDIA GPU and JAX's CUDA
  plugin (``device_files`` is `glob.glob`, ``installed`` whether a module can be
  imported). Otherwise None, JAX's own choice: ``JAX_PLATFORMS`` set, TPU chips present
  (/dev/accel*, /dev/vfio/N) or no libtpu. Why: JAX would start libtpu's backend on any
  host, and libtpu prints errors about the chips and cloud metadata it cannot find."""
  if (environ.get("JAX_PLATFORMS") or not installed("libtpu")
      or device_files("/dev/accel*") or device_files("/dev/vfio/[0-9]*")):
    return None
  cuda = installed("jax_cuda12_plugin") or installed("jax_cuda13_plugin")
  return "cuda,cpu" if cuda and device_files("/dev/nvidia[0-9]*") else "cpu"


def _no_tpu_probe_without_a_tpu() -> None:
  platforms = host_platforms(os.environ, glob.glob,
                             lambda name: importlib.util.find_spec(name) is not None)
  if platforms:
    jax.config.update("jax_platforms", platforms)


def _quiet_library_logs() -> None:
  """`QuietLibraryInfo` on absl's handler, before any backend starts."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraryInfo) for f in handler.filters):
    handler.addFilter(QuietLibraryInfo())


def run_main(main: Callable[[list[str]], Any]) -> None:
  """``absl.app.run`` of a binary's main with `parse_flags` and `handle_errors`; the
  command line is `command_line` for a binary that `define_flags` gave ``--config``."""
  _quiet_library_logs()
  takes_config = ("config" in flags.FLAGS and
                  flags.FLAGS["config"].flag_type() == "config object")  # config_flags'

  app.run(handle_errors(main), argv=command_line() if takes_config else sys.argv,
          flags_parser=parse_flags)


def run(job: Callable[[config_schema.ConfigDict, str], Any]) -> None:
  """Parses ``--config=FILE[:ARG] [--config.a.b=V ...] --workdir=DIR`` (and the
  multi-process flags) and calls ``job(config, workdir)`` under ``absl.app.run``."""
  config, workdir = define_flags()
  process_flags = define_distributed_flags()

  @handle_errors
  def main(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    try:
      loaded = config.value
      loaded.keys()  # config_flags reports a file it could not load only when read
    except OSError as e:
      raise errors.MissingInputError(" ".join(str(e).split())) from None
    start_processes(*process_flags)
    job(loaded, workdir.value)

  _quiet_library_logs()
  _no_tpu_probe_without_a_tpu()
  app.run(main, argv=command_line(), flags_parser=parse_flags)
