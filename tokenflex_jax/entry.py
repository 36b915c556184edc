"""How every binary runs: ``absl.app.run`` with a bad flag or input as one line and exit
2 (`errors.USAGE_EXIT_CODE`), a preemption as its own exit code, and the library log
lines that need no action dropped. The config-driven binaries add their ``--config``
rule on top (`cli`); the dataset builders in `data` use this alone.
"""

from __future__ import annotations

import functools
import glob
import importlib.util
import logging
import os
import sys
from collections.abc import Callable, Mapping
from typing import Any

import jax
from absl import app, flags
from absl import logging as absl_logging

from tokenflex_jax import errors


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


_CONFIG_ERROR = f"{errors.ConfigError.__module__}.{errors.ConfigError.__qualname__}: "


def _config_file_error(message: str) -> str:
  """A flag error's message; for a config file's own `errors.ConfigError` (a bad
  ``--config=FILE:ARG``), which ml_collections hands on as its traceback's text, that
  error's message alone. Any other error in a config file keeps its traceback."""
  lines = message.rstrip().splitlines()
  if lines and lines[-1].startswith(_CONFIG_ERROR):
    return lines[-1][len(_CONFIG_ERROR):]
  return message


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with a bad flag (unknown, malformed, a missing config file or
  key) as one line and `errors.USAGE_EXIT_CODE` instead of absl's usage text."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = _config_file_error(str(e))
  except (AttributeError, KeyError) as e:  # config_flags: an override of a key not there
    key = str(e).strip("\"'")
    named = [a for a in argv if a.startswith("--config.") and key and key in a.split("=")[0]]
    message = (f"{named[0] if named else 'a --config override'}: the config has no key "
               f"{key!r} (tokenflex_jax/app/config_schema.py lists every key)")
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(errors.USAGE_EXIT_CODE)


def quiet_library_logs() -> None:
  """`QuietLibraryInfo` on absl's handler, before any backend starts."""
  handler = absl_logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraryInfo) for f in handler.filters):
    handler.addFilter(QuietLibraryInfo())


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


def no_tpu_probe_without_a_tpu() -> None:
  """`host_platforms`, applied before any backend starts."""
  platforms = host_platforms(os.environ, glob.glob,
                             lambda name: importlib.util.find_spec(name) is not None)
  if platforms:
    jax.config.update("jax_platforms", platforms)


def run(main: Callable[[list[str]], Any], argv: list[str] | None = None) -> None:
  """``absl.app.run`` of a binary's ``main`` on ``argv`` (default ``sys.argv``) with
  `parse_flags`, `handle_errors`, `quiet_library_logs` and `no_tpu_probe_without_a_tpu`."""
  quiet_library_logs()
  no_tpu_probe_without_a_tpu()
  app.run(handle_errors(main), argv=sys.argv if argv is None else argv,
          flags_parser=parse_flags)
