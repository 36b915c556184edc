"""The persistent compilation cache of the binaries that compile a run's programs (train,
pretrain_vision, eval): a restarted run (a preemption, a crash, a later evaluation) loads
the programs it compiled before instead of compiling them again.

JAX keys each program by its HLO, the compile options, the devices and the jax / backend
versions, so a changed config, mesh or version compiles anew; process 0 writes, every
process reads, and a cache that cannot be read or written is a warning, never a failure.
Programs that compiled in under ``jax_persistent_cache_min_compile_time_secs`` (1 s)
are not kept. This sets process-wide JAX state, so only a binary's ``main`` calls it
(`cli.run`), never the library.
"""

from __future__ import annotations

import os

import jax
from absl import logging

from tokenflex_jax.app.config_schema import ConfigDict

# Where the cache lives under the workdir when ``config.compilation_cache_dir`` is "".
SUBDIR = "compilation_cache"


def directory(config: ConfigDict, workdir: str) -> str | None:
  """The cache directory ``config`` asks for: ``compilation_cache_dir``, by default the
  workdir's `SUBDIR` (local or ``gs://``); None when ``compilation_cache`` is off."""
  if not config.compilation_cache:
    return None
  return config.compilation_cache_dir or os.path.join(workdir, SUBDIR)


def enable(config: ConfigDict, workdir: str) -> str | None:
  """Points JAX's persistent compilation cache at `directory` (before anything compiles);
  returns it."""
  path = directory(config, workdir)
  if path is not None:
    jax.config.update("jax_compilation_cache_dir", path)
    logging.info("compilation cache: %s (config.compilation_cache_dir)", path)
  return path
