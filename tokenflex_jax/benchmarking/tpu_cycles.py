"""The TPU compiler's own estimate of a compiled program's run time, read from its HLO.

libtpu annotates each kernel it generates (a fusion, a copy, a pad...) in the optimized
HLO (`jax.stages.Compiled.as_text`) with ``"estimated_cycles"``: its machine code's
length in cycles on one chip. A loop body's kernels run once per iteration, so the
program's estimate is each annotated instruction's cycles times the number of times its
computation runs: 1 for the entry, times the trip count for a while loop's body (read
from ``known_trip_count`` or, for a counted loop as `jax.lax.scan` writes it, the one
integer constant its condition compares against), and likewise down the call graph.
A fusion's own computation is the kernel's insides and is not counted again.

What it leaves out: Mosaic kernels (Pallas, e.g. splash attention) and collectives carry
no estimate, and nothing here models their overlap with the kernels. It is the
compiler's model of its kernels, not a measurement; docs/performance.md compares it
with the FLOPs it implies.
"""

from __future__ import annotations

import collections
import re

_COMPUTATION = re.compile(r"^(ENTRY )?%(\S+) .*\{$")
_INSTRUCTION = re.compile(r"^\s+(?:ROOT )?%(\S+) = ")
_CYCLES = re.compile(r'"estimated_cycles":"(\d+)"')
_TRIP = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_CALLEES = re.compile(r"\b(body|condition|to_apply|calls|true_computation|"
                      r"false_computation|branch_computations)=\{?([^,}]+(?:, %[^,}]+)*)")
_CONSTANT = re.compile(r"\bconstant\((-?\d+)\)")


def _computations(text: str) -> tuple[str, dict[str, list[str]]]:
  """(the entry computation's name, {computation: its instruction lines})."""
  comps: dict[str, list[str]] = {}
  entry, current = None, None
  for line in text.splitlines():
    m = _COMPUTATION.match(line)
    if m:
      current = m[2]
      comps[current] = []
      entry = current if m[1] else entry
    elif current is not None and _INSTRUCTION.match(line):
      comps[current].append(line)
  if entry is None:
    raise ValueError("no ENTRY computation in the HLO text")
  return entry, comps


def _trip_count(line: str, comps: dict[str, list[str]], condition: str) -> int | None:
  m = _TRIP.search(line)
  if m:
    return int(m[1])
  constants = {int(c) for l in comps.get(condition, ()) for c in _CONSTANT.findall(l)}
  return constants.pop() if len(constants) == 1 else None


def estimated_cycles(text: str) -> int | None:
  """The cycles libtpu estimates one run of the program in ``text`` (an optimized TPU
  HLO module's text) takes on one chip, its loops unrolled by their trip counts; None
  where the text has no estimates (not a TPU program) or a loop's trip count cannot be
  read."""
  entry, comps = _computations(text)
  runs: dict[str, int] = collections.defaultdict(int)
  runs[entry] = 1
  # The text prints a computation after every computation it calls, so in reverse its
  # callers come first and each count is whole before it is passed down.
  for name in reversed(comps):
    if not runs[name]:
      continue
    for line in comps[name]:
      if " fusion(" in line:
        continue  # a kernel: its computation is not run on its own
      trips = 1
      if " while(" in line:
        trips = _trip_count(line, comps, re.search(r"condition=%([^,\s]+)", line)[1])
        if trips is None:
          return None
      for key, callees in _CALLEES.findall(line):
        for callee in re.findall(r"%([^,\s}]+)", callees):
          if callee in comps:
            runs[callee] += runs[name] * (trips if key in ("body", "condition") else 1)
  total, annotated = 0, False
  for name, count in runs.items():
    for line in comps[name]:
      m = _CYCLES.search(line)
      if m:
        annotated = True
        total += int(m[1]) * count
  return total if annotated else None
