"""The binaries' shared command line: Orbax's INFO chatter is filtered, warnings are not."""

import logging

from tokenflex_jax.cli import QuietLibraryInfo


def _record(level, path):
  return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_orbax_info_is_dropped_but_warnings_and_our_lines_stay():
  f = QuietLibraryInfo()
  orbax = "/venv/site-packages/orbax/checkpoint/_src/handlers/base.py"
  assert not f.filter(_record(logging.INFO, orbax))
  assert f.filter(_record(logging.WARNING, orbax))
  assert f.filter(_record(logging.INFO, "/repo/tokenflex_jax/training/loop.py"))
