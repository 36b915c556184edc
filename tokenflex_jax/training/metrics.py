"""Metric sinks: TensorBoard event files, a JSON-lines file, and the console log.

Only process 0 writes. Scalars arrive as Python floats (already fetched). In a ``gs://``
workdir tensorboardX uploads its event file itself; the JSON-lines file cannot be
appended to there, so it is rewritten whole (what it held before, plus this run's lines)
at most every `REMOTE_FLUSH_SECONDS` and when the writer closes.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Mapping

import jax
from absl import logging
from etils import epath

from tokenflex_jax import paths

REMOTE_FLUSH_SECONDS = 30.0


def _summary_writer_class() -> type:
  """tensorboardX's SummaryWriter, imported without torch: tensorboardX imports torch
  when it is installed, only to accept torch tensors (1.6 s of every process's start-up
  with the test requirements installed); scalars never need it."""
  if "torch" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules["torch"] = None  # `import torch` raises ImportError: tensorboardX skips it.
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    del sys.modules["torch"]
  return SummaryWriter


class _RemoteLines:
  """A JSON-lines file on a store without appends: kept in memory, rewritten whole by
  `write` at most every `REMOTE_FLUSH_SECONDS`, and by `flush` / `close` at once."""

  def __init__(self, path: epath.Path):
    self._path = path
    self._lines = [path.read_text()] if path.exists() else []
    self._flushed = time.monotonic()

  def write(self, line: str) -> None:
    self._lines.append(line)
    if time.monotonic() - self._flushed >= REMOTE_FLUSH_SECONDS:
      self.flush()

  def flush(self) -> None:
    self._path.write_text("".join(self._lines))
    self._flushed = time.monotonic()

  def close(self) -> None:
    self.flush()


class MetricWriter:
  """Writes ``{name: float}`` per step under ``WORKDIR/{tensorboard,metrics.jsonl}``."""

  def __init__(self, workdir: str):
    self._enabled = jax.process_index() == 0
    self._tb = None
    self._jsonl = None
    if self._enabled:
      self._tb = _summary_writer_class()(os.path.join(workdir, "tensorboard"), flush_secs=10)
      path = epath.Path(workdir) / "metrics.jsonl"
      self._jsonl = (_RemoteLines(path) if paths.is_remote(workdir) else  # line-buffered:
                     open(path, "a", encoding="utf-8", buffering=1))  # each line on disk

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self._enabled:
      return
    for name, value in scalars.items():
      self._tb.add_scalar(name, value, step)
    self._jsonl.write(json.dumps({"step": step, **{k: float(v) for k, v in scalars.items()}})
                      + "\n")

  def flush(self) -> None:
    """Stores everything written so far (on GCS: uploads it now)."""
    if self._enabled:
      self._tb.flush()
      self._jsonl.flush()

  def close(self) -> None:
    if self._enabled:
      self._tb.close()
      self._jsonl.close()


def last_records(path: str, key: str) -> dict[int, dict[str, float]]:
  """{step: record} of the records of a local metrics.jsonl (`MetricWriter`) that hold
  ``key``, in step order; a step written again after a restart by its last record."""
  out: dict[int, dict[str, float]] = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      if key in record:
        out[record["step"]] = record
  return dict(sorted(out.items()))


def format_line(step: int, total: int, scalars: Mapping[str, float]) -> str:
  """A compact console line: ``[  250/900  28%] loss=0.41 ...``."""
  keys = ("num_tokens", "loss", "token_accuracy", "grad_norm", "learning_rate", "step_time_s",
          "examples_per_s", "tokens_per_s_per_device", "useful_share", "tflops_per_device",
          "device_peak_gib", "host_rss_mib")
  parts = [f"[{step:>6}/{total} {100 * step / max(total, 1):3.0f}%]"]
  for k in keys:
    if k in scalars:
      v = scalars[k]
      parts.append(f"{k}={v:g}" if k == "num_tokens" else f"{k}={v:.4g}")
  return " ".join(parts)


def log_line(step: int, total: int, scalars: Mapping[str, float]) -> None:
  logging.info("%s", format_line(step, total, scalars))
