"""Resuming from damaged checkpoints (with a killed save's leftovers), another model's
checkpoint and a non-finite loss: each ends in a named warning or a one-line error, never
in a silent fresh start or lost steps."""

import glob
import json
import logging as py_logging
import os
import re
import shutil
from unittest import mock

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from tests.tiny import losses, tiny_config
from tokenflex_jax import errors
from tokenflex_jax.train import train
from tokenflex_jax.training import checkpointing, integrity

ONE_BUCKET = dict(token_counts=(64,), token_probs=(1.0,), eval__token_counts=(64,),
                  checkpoint_every=2, keep_checkpoints=3)


@pytest.fixture(scope="module")
def saved_run(tmp_path_factory):
  """A run to step 6 (checkpoints 2, 4, 6) and a copy as if killed after step 4."""
  full = str(tmp_path_factory.mktemp("full"))
  train(tiny_config(total_steps=6, **ONE_BUCKET), full)
  stopped = str(tmp_path_factory.mktemp("stopped")) + "/run"
  shutil.copytree(full, stopped)
  shutil.rmtree(os.path.join(stopped, "checkpoints", "6"))
  return full, stopped


def _largest(pattern):
  return max(glob.glob(pattern), key=os.path.getsize)


DAMAGE = {
    "truncated": lambda step: open(_largest(f"{step}/params/ocdbt.process_0/d/*"), "r+b"
                                   ).truncate(100),
    "deleted": lambda step: shutil.rmtree(f"{step}/params"),
    "garbage": lambda step: open(_largest(f"{step}/opt_state/ocdbt.process_0/d/*"), "r+b"
                                 ).write(os.urandom(64)),
}
WARNING = {"truncated": r"100 bytes, \d+ when it was saved \(truncated\)",
           "deleted": "params: missing", "garbage": r"contents changed since it was saved"}


@pytest.mark.parametrize("kind", [
    "truncated",
    # The same path with another fault: in the full suite (launch/test.sh --all).
    pytest.param("deleted", marks=pytest.mark.slow),
    pytest.param("garbage", marks=pytest.mark.slow)])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(saved_run, tmp_path, kind,
                                                                caplog):
  full, stopped = saved_run
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped, workdir)
  DAMAGE[kind](os.path.join(workdir, "checkpoints", "4"))
  # And the temporary folder of a save killed before it committed step 6.
  leftover = os.path.join(workdir, "checkpoints", "6.orbax-checkpoint-tmp-1234")
  shutil.copytree(os.path.join(workdir, "checkpoints", "2"), leftover)
  with caplog.at_level(py_logging.WARNING):
    train(tiny_config(total_steps=6, **ONE_BUCKET), workdir)
  assert not os.path.exists(leftover)
  assert any("6.orbax-checkpoint-tmp-1234: the temporary directory of a save that did not "
             "finish" in r.getMessage() for r in caplog.records)
  warning = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert len(warning) == 1 and "checkpoints/4 is damaged" in warning[0], warning
  assert re.search(WARNING[kind], warning[0]), warning[0]
  # The damaged step is kept aside, not deleted; the run redid steps 3-4 from step 2.
  assert os.path.isdir(os.path.join(workdir, "damaged_checkpoints", "4"))
  assert checkpointing.latest_step(workdir) == 6
  got, want = losses(workdir), losses(full)
  assert [got[s] for s in range(1, 7)] == [want[s] for s in range(1, 7)]  # bit-identical


def test_no_usable_checkpoint_is_an_error_not_a_fresh_start(saved_run, tmp_path):
  _, stopped = saved_run
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped, workdir)
  for step in ("2", "4"):
    DAMAGE["deleted"](os.path.join(workdir, "checkpoints", step))
  with pytest.raises(errors.UserError, match=r"has checkpoints \[2, 4\] but none can be "
                                             r"restored \(step 4: .*params: missing"):
    train(tiny_config(total_steps=6, **ONE_BUCKET), workdir)
  assert sorted(os.listdir(os.path.join(workdir, "damaged_checkpoints"))) == ["2", "4"]


def test_another_models_checkpoint_lists_the_mismatched_parameters(saved_run, tmp_path):
  _, stopped = saved_run
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped, workdir)
  with pytest.raises(errors.CheckpointMismatchError) as e:
    train(tiny_config(total_steps=6, model__llm__mlp_dim=48, **ONE_BUCKET), workdir)
  message = str(e.value)
  assert "holds another model: 3 parameters differ" in message
  assert "llm/layers/mlp/up/kernel: saved (1, 32, 64), model (1, 32, 48)" in message
  assert "llm/layers/mlp/down/kernel: saved (1, 64, 32), model (1, 48, 32)" in message
  assert checkpointing.latest_step(workdir) == 4  # nothing was set aside or overwritten


def test_a_non_finite_loss_names_the_step_bucket_and_last_checkpoint(saved_run, tmp_path):
  _, stopped = saved_run
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped, workdir)
  with pytest.raises(errors.NonFiniteLossError,
                     match=r"step [56]: non-finite loss=.* at 64 visual tokens.*Last good "
                           r"checkpoint: step 4 \(.*checkpoints/4\)"):
    # Resumed at step 4 with a learning rate so large that the first update overflows.
    train(tiny_config(total_steps=6, optimizer__learning_rate=1e30, **ONE_BUCKET), workdir)


def test_the_checkpoint_before_a_non_finite_loss_gets_its_checksums(saved_run, tmp_path):
  """Saving every step from step 4 with a learning rate that overflows: the run stops on a
  non-finite loss after saving at least one more step, and every step it committed has
  the checksums a resume verifies."""
  _, stopped = saved_run
  workdir = str(tmp_path / "run")
  shutil.copytree(stopped, workdir)
  with pytest.raises(errors.NonFiniteLossError):
    train(tiny_config(total_steps=8, optimizer__learning_rate=1e30,
                      **{**ONE_BUCKET, "checkpoint_every": 1}), workdir)
  last = checkpointing.latest_step(workdir)
  assert last > 4
  for step in range(4, last + 1):
    assert integrity.has_checksums(os.path.join(checkpointing.checkpoint_dir(workdir),
                                                str(step)), 0), step


def test_checksums_skip_another_processes_write_in_progress(tmp_path):
  """Process 1 writes its checksum record through a temporary file while process 0 lists
  the step: that file, owned by no process by name, must not enter process 0's record
  (it is renamed away before process 0 can read it; CI once failed on exactly this)."""
  step = tmp_path / "6"
  (step / "params" / "ocdbt.process_0").mkdir(parents=True)
  (step / "params" / "ocdbt.process_0" / "d").write_bytes(b"weights")
  (step / "meta").mkdir()
  (step / "meta" / "metadata").write_text("{}")
  (step / ".tmp-ugkf8zvn.part").write_text("process 1's record, half written")
  integrity.write_checksums(str(step), 0)
  record = json.loads((step / integrity.CHECKSUMS.format(0)).read_text())
  assert sorted(record) == ["meta/metadata", "params/ocdbt.process_0/d"]
  os.remove(step / ".tmp-ugkf8zvn.part")  # The rename that raced the listing.
  assert integrity.problems(str(step), 0, ("params", "meta")) == []


def test_only_large_replicated_arrays_are_split_among_their_replicas(tmp_path):
  """Orbax writes a replicated array in parallel from its replicas, slicing it with one
  eager program per shape; below `MIN_REPLICA_SLICE_BYTES` per replica one replica writes
  it whole, so small arrays cost no such program. Both kinds restore exactly."""
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:4]).reshape(2, 2), ("data", "fsdp"))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, "fsdp"))
  rows = checkpointing.MIN_REPLICA_SLICE_BYTES // (4 * 64)  # float32 [rows, 128] / 2 shards
  tree = {"small": jax.device_put(np.arange(64 * 8, dtype=np.float32).reshape(8, 64), sharding),
          "large": jax.device_put(np.ones((2 * rows, 128), np.float32), sharding)}
  sliced = []
  real_slice = jax.lax.slice_in_dim

  def counting(operand, *args, **kwargs):
    sliced.append(operand.shape)
    return real_slice(operand, *args, **kwargs)

  with mock.patch.object(jax.lax, "slice_in_dim", counting):
    with checkpointing.make_manager(str(tmp_path), asynchronous=False) as manager:
      checkpointing.save_params(manager, 1, tree, {"step": 1})
  assert sliced and all(shape == (2 * rows, 64) for shape in sliced), sliced  # large only
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                          tree)
  with checkpointing.make_manager(str(tmp_path), read_only=True) as manager:
    restored = manager.restore(1, args=ocp.args.Composite(params=ocp.args.PyTreeRestore(
        abstract, checkpointing._restore_args(abstract))))  # pylint: disable=protected-access
  for name, array in tree.items():
    np.testing.assert_array_equal(restored["params"][name], array)
