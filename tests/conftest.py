"""Test set-up: 8 host CPU devices, absl flags parsed (grain reads them)."""

import atexit
import os
import shutil
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tests.xla_env import xla_flags  # pylint: disable=wrong-import-position  # No JAX.

os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# One persistent compilation cache for the session, inherited by every subprocess the tests
# start: a restarted or repeated run loads its programs instead of compiling them again.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="tokenflex-jax-cache-")
  atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], True)
# The binaries tests start cache every program, however small: a binary's eager
# operations are paid again by every process unless cached (docs/testing.md). This
# process keeps its own in memory and caches only the larger ones (below).
CHOSEN_MIN_COMPILE_TIME = os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # pylint: disable=wrong-import-position
from absl import flags  # pylint: disable=wrong-import-position

if CHOSEN_MIN_COMPILE_TIME is None:
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
flags.FLAGS.mark_as_parsed()
