"""A TPU program's memory as libtpu counts it, read from libtpu's own log (`aot`).

PJRT's ``memory_analysis()`` of a TPU program gives as ``temp_size_in_bytes`` the heap of
its temporaries plus that heap's fragmentation, which the heap already holds: it counts
the fragmentation twice. libtpu logs, for each program it compiles, its HBM requirement
(global and scoped memory, the temporaries' heap with its fragmentation, code overlays),
and refuses a program whose heap exceeds the chip's available HBM; these are the figures
that decide whether a step fits. On the paper's 256-token step PJRT's count is 1.35 GiB
over libtpu's, and 3.95 GiB over with two accumulated microbatches
(docs/performance.md).

The log format is libtpu's, not an API: `requirements-tpu.txt` pins the version read
here. `LibtpuMemory` takes a program's figures only when libtpu logged exactly one
program since the last it read, else keeps PJRT's and says so.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Any

from absl import logging

from tokenflex_jax.benchmarking import compile_profile
from tokenflex_jax.training import compiled

_REQUIREMENT = re.compile(r"^Program hbm requirement (\S+):$")
_HEAP = re.compile(r"^\s+HLO temp\s+(\S+) \(.* fragmentation \((\S+)\)\)$")
_SIZE = re.compile(r"^(\d+(?:\.\d+)?)([BKMGT])$")
_UNIT = {"B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclasses.dataclass(frozen=True)
class ProgramHbm:
  """One compiled program's HBM beside its arguments, per device, as libtpu logs it:
  ``program_bytes`` all of it (global, scoped, the heap, overlays), ``heap_bytes`` the
  temporaries' heap, of which ``fragmentation_bytes`` hold no live buffer at the peak."""
  program_bytes: int
  heap_bytes: int
  fragmentation_bytes: int


def size_bytes(text: str) -> int:
  """libtpu's sizes ("11.81G", "112.00M", "4.0K", "140B"; binary units) in bytes."""
  m = _SIZE.match(text)
  if not m:
    raise ValueError(f"not a libtpu size: {text!r}")
  return round(float(m[1]) * _UNIT[m[2]])


def parse(lines: Sequence[str]) -> list[ProgramHbm]:
  """The HBM figures of every program a libtpu INFO log records, in the order compiled:
  each "Program hbm requirement" block (its indented lines) and the "HLO temp" line in
  it, if any (a program without temporaries has none)."""
  out, block = [], None
  for line in [*lines, ""]:
    if block is not None and line[:1].isspace():
      if m := _HEAP.match(line):
        block = ProgramHbm(block.program_bytes, size_bytes(m[1]), size_bytes(m[2]))
      continue
    if block is not None:
      out.append(block)
    m = _REQUIREMENT.match(line)
    block = ProgramHbm(size_bytes(m[1]), 0, 0) if m else None
  return out


def read(log_dir: str) -> list[ProgramHbm]:
  """`parse` of libtpu's INFO logs in ``log_dir`` (its ``TPU_LOG_DIR``)."""
  return parse(compile_profile.log_lines(log_dir))


class LibtpuMemory:
  """A `compiled.MemoryOf` for a TPU target whose libtpu logs unbuffered into
  ``log_dir`` (`compile_profile.environment`, set before libtpu loads): each program's
  PJRT figures with the temporaries replaced by libtpu's heap and the total by its
  requirement plus the arguments. Called once right after each compile."""

  def __init__(self, log_dir: str):
    self.log_dir = log_dir
    self.read_programs = len(read(log_dir))

  def __call__(self, executable: Any) -> compiled.Memory | None:
    memory = compiled.pjrt_memory(executable)
    programs = read(self.log_dir)
    new, self.read_programs = programs[self.read_programs:], len(programs)
    if memory is None or len(new) != 1:
      logging.warning("libtpu's log in %s records %d programs for one compile: PJRT's "
                      "memory figures kept (they count the heap's fragmentation twice)",
                      self.log_dir, len(new))
      return memory
    hbm = new[0]
    return dataclasses.replace(
        memory, temp_size_in_bytes=hbm.heap_bytes,
        total_in_bytes=max(memory.argument_size_in_bytes, memory.output_size_in_bytes)
        + hbm.program_bytes)
