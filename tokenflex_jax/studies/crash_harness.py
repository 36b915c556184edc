"""Proves that SIGKILL at any moment loses nothing: the crash harness.

`run` trains a config twice from scratch: once uninterrupted (``DIR/reference``), once
(``DIR/killed``) killed with SIGKILL ``kills`` times and restarted after each kill.
Each kill waits for a random step a few steps past the restart; every other kill then
waits on for an asynchronous save: the harness watches the checkpoint folder and kills
the moment Orbax's temporary directory of a save appears, so the process dies while the
save is being written. A kill counts as "during a save" when that temporary directory is
still there after the process died. It then compares:

- the final parameters and optimizer state, array by array, byte for byte;
- the whole loss history (``metrics.jsonl``, the last record of each step: a step redone
  after a kill must log the same loss as before);
- that each restart resumed from the newest step committed when it was killed (no
  committed step lost) and that no restart started from scratch after a save.

The trainer runs as ``python -m tokenflex_jax.train`` subprocesses with this process's
environment; this process only reads their files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

import jax
import numpy as np
import orbax.checkpoint as ocp

from tokenflex_jax.training import checkpointing, integrity, metrics

_RESUMED = re.compile(r"resumed from .* at step (\d+)")


@dataclasses.dataclass(frozen=True)
class Kill:
  """One kill: when it fell and what was on disk then."""
  at_step: int            # steps logged when the kill was sent
  during_save: bool       # a save's temporary directory existed at the kill
  committed: int | None   # the newest committed step right after the kill
  resumed_at: int | None  # where the restart after it resumed (None: from scratch)


@dataclasses.dataclass(frozen=True)
class Result:
  kills: tuple[Kill, ...]
  identical_params: bool
  identical_opt_state: bool
  identical_losses: bool
  steps_lost: tuple[str, ...]   # restarts that did not resume from the newest commit

  @property
  def bit_identical(self) -> bool:
    return (self.identical_params and self.identical_opt_state and self.identical_losses
            and not self.steps_lost)

  def summary(self) -> str:
    """The harness's last line: ``N kills (M during a save): bit-identical=true|false``."""
    during = sum(k.during_save for k in self.kills)
    return (f"{len(self.kills)} kills ({during} during a save): "
            f"bit-identical={str(self.bit_identical).lower()}")


def _committed_steps(workdir: str) -> list[int]:
  folder = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(folder):
    return []
  return sorted(int(n) for n in os.listdir(folder) if n.isdigit())


def _saving(workdir: str) -> bool:
  return bool(integrity.temporary_dirs(os.path.join(workdir, "checkpoints")))


def _steps_logged(workdir: str) -> int:
  """The highest step in metrics.jsonl (0 before the first)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return 0
  with open(path, encoding="utf-8") as f:
    steps = [json.loads(line).get("step", 0) for line in f if line.endswith("\n")]
  return max(steps, default=0)


def loss_history(workdir: str) -> dict[int, float]:
  """{step: train/loss}, the last record of each step winning (redone steps)."""
  return {step: record["train/loss"] for step, record in metrics.last_records(
      os.path.join(workdir, "metrics.jsonl"), "train/loss").items()}


def _final_arrays(workdir: str, item: str) -> dict[str, np.ndarray]:
  """{path: array} of one item of the workdir's newest checkpoint, read as numpy."""
  step = _committed_steps(workdir)[-1]
  path = os.path.join(workdir, "checkpoints", str(step), item)
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                              checkpointing.item_metadata(path))
  restored = ocp.PyTreeCheckpointer().restore(
      path, args=ocp.args.PyTreeRestore(restore_args=restore_args))
  return {jax.tree_util.keystr(p): np.asarray(a)
          for p, a in jax.tree_util.tree_flatten_with_path(restored)[0]}


def _identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
  return a.keys() == b.keys() and all(
      a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and a[k].tobytes() == b[k].tobytes()
      for k in a)


def _start(command: Sequence[str], log_path: str) -> subprocess.Popen:
  log = open(log_path, "ab")  # pylint: disable=consider-using-with  # closed by the caller
  return subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT)


def _wait_for(proc: subprocess.Popen, ready, timeout_s: float, poll_s: float) -> bool:
  """Polls ``ready()`` until true (True) or the process ends or time runs out (False)."""
  deadline = time.monotonic() + timeout_s
  while time.monotonic() < deadline:
    if proc.poll() is not None:
      return False
    if ready():
      return True
    time.sleep(poll_s)
  return False


def run(train_command: Sequence[str], workdir: str, kills: int, total_steps: int,
        seed: int = 0, timeout_s: float = 1800.0, log=print) -> Result:
  """Runs the reference and the killed run (see the module docstring).

  ``train_command`` is the train binary's command line without ``--workdir``; the
  harness appends ``--workdir=DIR/reference`` / ``DIR/killed``. ``total_steps`` must be
  what the command trains to (the kills fall before it).
  """
  rng = random.Random(seed)
  reference, killed = os.path.join(workdir, "reference"), os.path.join(workdir, "killed")
  for d in (reference, killed):
    if os.path.exists(d):
      raise FileExistsError(f"{d} exists: the harness needs an empty --workdir")
    os.makedirs(d)
  log(f"reference run -> {reference}")
  ref = subprocess.run([*train_command, f"--workdir={reference}"], capture_output=True,
                       timeout=timeout_s, check=False)
  if ref.returncode != 0:
    raise RuntimeError(f"the reference run failed:\n{ref.stdout.decode()[-3000:]}"
                       f"{ref.stderr.decode()[-3000:]}")
  command = [*train_command, f"--workdir={killed}"]
  log_path = os.path.join(workdir, "killed.log")
  records: list[Kill] = []
  for i in range(kills):
    aim_at_save = i % 2 == 0
    start_offset = os.path.getsize(log_path) if os.path.exists(log_path) else 0
    proc = _start(command, log_path)
    # A random step a little past where the run resumes; an aimed kill then waits for
    # the next save to start writing.
    target = min(_steps_logged(killed) + rng.randint(1, 6), total_steps - 1)
    hit = _wait_for(proc, lambda t=target: _steps_logged(killed) >= t, timeout_s, 0.01)
    if hit and aim_at_save:
      hit = _wait_for(proc, lambda: _saving(killed), timeout_s, 0.002)
    if not hit or proc.poll() is not None:
      proc.kill()
      proc.wait()
      raise RuntimeError(f"kill {i + 1}: the run ended (exit {proc.returncode}) or stalled "
                         f"before the kill; see {log_path}; raise total_steps for {kills} "
                         f"kills")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # The process is dead: a temporary directory left now is a save it did not finish.
    during_save = _saving(killed)
    at_step = _steps_logged(killed)
    committed = (_committed_steps(killed) or [None])[-1]
    records.append(Kill(at_step, during_save, committed, None))
    log(f"kill {i + 1}/{kills} at step {at_step} "
        f"({'during a save' if during_save else 'between saves'}); newest committed "
        f"checkpoint: {committed}")
    if records[:-1]:
      records[-2] = dataclasses.replace(records[-2], resumed_at=_resumed_at(log_path,
                                                                           start_offset))
  start_offset = os.path.getsize(log_path)
  proc = _start(command, log_path)
  if proc.wait(timeout=timeout_s) != 0:
    raise RuntimeError(f"the final restart failed (exit {proc.returncode}); see {log_path}")
  if records:
    records[-1] = dataclasses.replace(records[-1], resumed_at=_resumed_at(log_path,
                                                                         start_offset))
  lost = tuple(f"kill {i + 1}: newest commit {k.committed}, resumed at {k.resumed_at}"
               for i, k in enumerate(records) if k.resumed_at != k.committed)
  ref_losses, got_losses = loss_history(reference), loss_history(killed)
  result = Result(
      kills=tuple(records),
      identical_params=_identical(_final_arrays(reference, "params"),
                                  _final_arrays(killed, "params")),
      identical_opt_state=_identical(_final_arrays(reference, "opt_state"),
                                     _final_arrays(killed, "opt_state")),
      identical_losses=(ref_losses == got_losses and sorted(got_losses)
                        == list(range(1, total_steps + 1))),
      steps_lost=lost)
  log(f"params identical: {result.identical_params}; optimizer state identical: "
      f"{result.identical_opt_state}; loss history identical ({len(got_losses)} steps): "
      f"{result.identical_losses}; restarts that lost committed steps: {list(lost) or 'none'}")
  return result


def _resumed_at(log_path: str, offset: int) -> int | None:
  """The step the run started at ``offset`` of the log resumed from (None: fresh)."""
  with open(log_path, "rb") as f:
    f.seek(offset)
    text = f.read().decode("utf-8", "replace")
  match = _RESUMED.search(text)
  return int(match.group(1)) if match else None


def default_command(config: str, flags: Sequence[str]) -> list[str]:
  return [sys.executable, "-m", "tokenflex_jax.train", f"--config={config}", *flags]
