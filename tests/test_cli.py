"""The binaries' shared command line: Orbax's INFO chatter is filtered, warnings are not;
a user's mistake is one line and exit 2, a bug keeps its traceback."""

import fnmatch
import logging
import os
import subprocess
import sys

import pytest

from tests.xla_env import REPO
from tokenflex_jax import entry
from tokenflex_jax.app import cli, compilation_cache, config_schema
from tokenflex_jax.entry import QuietLibraryInfo


def _record(level, path):
  return logging.LogRecord("absl", level, path, 1, "message", None, None)


def test_orbax_info_is_dropped_but_warnings_and_our_lines_stay():
  f = QuietLibraryInfo()
  orbax = "/venv/site-packages/orbax/checkpoint/_src/handlers/base.py"
  assert not f.filter(_record(logging.INFO, orbax))
  assert f.filter(_record(logging.WARNING, orbax))
  assert f.filter(_record(logging.INFO, "/repo/tokenflex_jax/training/loop.py"))


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(capsys):
  from tokenflex_jax import errors  # pylint: disable=import-outside-toplevel

  def wrong_input(argv):
    raise errors.ConfigError("config.batch_size=7: not divisible by 8 devices")

  with pytest.raises(SystemExit) as exit_info:
    entry.handle_errors(wrong_input)(["prog"])
  assert exit_info.value.code == errors.USAGE_EXIT_CODE
  assert capsys.readouterr().err == "error: config.batch_size=7: not divisible by 8 devices\n"

  def preempted(argv):
    raise errors.Preempted("stopped at step 5")

  with pytest.raises(SystemExit) as exit_info:
    entry.handle_errors(preempted)(["prog"])
  assert exit_info.value.code == errors.PREEMPTED_EXIT_CODE

  def bug(argv):
    raise ZeroDivisionError("a bug")

  with pytest.raises(ZeroDivisionError):  # Not turned into a one-liner.
    entry.handle_errors(bug)(["prog"])


@pytest.mark.parametrize("binary,args,message", [
    ("train", ("--config=configs/demo.py", "--config.nonexistent=1"),
     "error: --config.nonexistent=1: the config has no key 'nonexistent'"),
    ("train", ("--config=configs/nope.py",), "No such file or directory: 'configs/nope.py'"),
    ("train", ("--config=configs/demo.py:stage=5",),
     "error: configs/demo.py: stage must be 0, 1 or 2, got '5'; use stage=0|1|2,rules="),
    ("aot", ("--config=configs/paper.py:pack=2",), "error: configs/paper.py: pack must be 0 or 1"),
    ("aot", ("--config=configs/nope.py",), "No such file or directory: 'configs/nope.py'"),
    ("predict", ("--config=configs/nope.py", "--image=x.png", "--question=q"),
     "No such file or directory: 'configs/nope.py'"),
    ("convert", ("--config=configs/nope.py", "--vision=/x"),
     "No such file or directory: 'configs/nope.py'"),
    ("eval", ("--config=configs/demo.py", "--config.eval.batch_size=8"),  # a wrong --workdir
     "error: no checkpoints in workdir '"),
    # No --config: the workdir's own config.json, which a new workdir does not have.
    ("train", (), "has no config.json (no run was trained there): pass --config=FILE"),
    ("eval", ("--config.eval.suite=vqa",), "has no config.json (no run was trained there)"),
])
def test_a_bad_command_line_is_one_line_and_exit_2(tmp_path, binary, args, message):
  result = subprocess.run([sys.executable, "-m", f"tokenflex_jax.{binary}", *args,
                           f"--workdir={tmp_path}"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu"), timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  lines = [l for l in result.stderr.splitlines() if l.strip()]
  assert message in lines[-1], result.stderr[-2000:]


def test_without_config_the_workdirs_own_config_is_read_with_overrides(tmp_path):
  """`with_workdir_config` puts the saved-config loader first (overrides must follow
  --config); the loader returns the workdir's config.json through the schema."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from tests.tiny import tiny_config  # pylint: disable=import-outside-toplevel
  from tokenflex_jax.app import config_schema, workdir  # pylint: disable=import-outside-toplevel
  config = tiny_config()
  config.eval.batch_size = 24
  workdir.prepare(str(tmp_path), config_schema.to_spec(config))
  argv = ["eval", f"--workdir={tmp_path}", "--config.eval.suite=vqa"]
  given = cli.with_workdir_config(argv)
  assert given == ["eval", f"--config={cli.SAVED_CONFIG_FILE}:{tmp_path}", *argv[1:]]
  for given_config in (["--config=configs/demo.py"], ["-config", "configs/demo.py"]):
    given_argv = ["eval", *given_config, *argv[1:]]  # a --config given is the config
    assert cli.with_workdir_config(given_argv) == given_argv
  flagfile = tmp_path / "flags"
  flagfile.write_text("--config=configs/demo.py\n")  # ... also from a flag file
  assert cli.with_workdir_config(["eval", f"--flagfile={flagfile}", *argv[1:]])[1] == (
      f"--flagfile={flagfile}")
  assert cli.with_workdir_config(["eval", "-workdir", str(tmp_path)])[1].endswith(
      f"saved_config.py:{tmp_path}")
  values = flags.FlagValues()
  loaded, _ = cli.define_flags(flag_values=values, sys_argv=given)
  values(given)
  assert loaded.value.eval.suite == "vqa" and loaded.value.eval.batch_size == 24
  assert loaded.value.model.to_dict() == config.model.to_dict()


def test_a_host_without_a_tpu_does_not_start_libtpu():
  files = lambda present: (lambda pattern: fnmatch.filter(present, pattern))  # as glob.glob
  modules = lambda *names: (lambda name: name in names)
  tpu_kit = modules("libtpu")
  assert entry.host_platforms({}, files([]), tpu_kit) == "cpu"
  assert entry.host_platforms({}, files(["/dev/nvidia0"]), tpu_kit) == "cpu"  # no CUDA plugin
  assert entry.host_platforms({}, files(["/dev/nvidia0"]),
                            modules("libtpu", "jax_cuda12_plugin")) == "cuda,cpu"
  assert entry.host_platforms({}, files(["/dev/accel0"]), tpu_kit) is None   # TPU v4 / v5e
  assert entry.host_platforms({}, files(["/dev/vfio/0"]), tpu_kit) is None   # TPU v5p / v6e
  assert entry.host_platforms({"JAX_PLATFORMS": "tpu"}, files([]), tpu_kit) is None
  assert entry.host_platforms({}, files([]), modules()) is None  # no libtpu: JAX's choice
  # A binary on this host (libtpu installed by the test requirements), JAX_PLATFORMS unset:
  # no line from libtpu's probe for chips and cloud metadata.
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env["PYTHONPATH"] = REPO
  result = subprocess.run([sys.executable, "-m", "tokenflex_jax.train",
                           "--config=configs/demo.py", "--config.optimizer.learning_rate=-1",
                           "--workdir=/nonexistent/run"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  assert "host bounds" not in result.stderr and "TPU_WORKER" not in result.stderr, result.stderr


def test_the_compilation_cache_is_the_workdirs_unless_moved_or_turned_off():
  config = config_schema.base_config()
  assert compilation_cache.directory(config, "gs://b/run") == "gs://b/run/compilation_cache"
  config.compilation_cache_dir = "/shared/jax_cache"
  assert compilation_cache.directory(config, "gs://b/run") == "/shared/jax_cache"
  config.compilation_cache = False
  assert compilation_cache.directory(config, "gs://b/run") is None
