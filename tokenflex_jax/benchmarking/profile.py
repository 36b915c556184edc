"""Where a compiled step spends its time: a `jax.profiler` trace, summed per XLA op.

The trace is written as a Perfetto JSON file (``create_perfetto_trace=True``; open it in
ui.perfetto.dev or TensorBoard); the summary adds up the self time of every XLA op
event per call, and groups the ops by what XLA's CPU backend named them: matmuls
(YNNPACK fusions and Eigen dots), copies and transposes, and every other fusion. Names
are the backend's: on a GPU or TPU the groups are mostly "other".
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
from typing import Any

import jax

from tokenflex_jax.benchmarking import timing

# Trace events that are not XLA ops: Python frames, the executor, thread-pool waits.
_NOT_OPS = ("$", "ThunkExecutor", "SlinkyThreadPool", "PjitFunction", "PjRt",
            "CommonPjRtLoadedExecutable")


def group(op: str) -> str:
  """The group of an XLA CPU op name: "matmul", "copy/transpose" or "other"."""
  if op.startswith(("ynn_fusion", "dot", "xnn_fusion", "onednn")):
    return "matmul"
  if "copy" in op or "transpose" in op:
    return "copy/transpose"
  return "other"


def op_names(hlo_text: str) -> dict[str, str]:
  """{HLO instruction name: the JAX source op it came from (its op_name metadata)}."""
  found = re.finditer(r"^\s*%?([\w.\-]+) = [^\n]*?op_name=\"([^\"]*)\"", hlo_text, re.M)
  return {m.group(1): m.group(2) for m in found}


def summarize(events: list[dict[str, Any]], calls: int, sources: dict[str, str],
              top: int = 15) -> dict[str, Any]:
  """{"calls", "groups_ms": {group: ms per call}, "top_ops": [{"op", "group", "ms",
  "source"}]} from Perfetto trace events (complete events, microseconds)."""
  per_op: collections.Counter[str] = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS):
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / calls
  groups: collections.Counter[str] = collections.Counter()
  for op, ms in per_op.items():
    groups[group(op)] += ms
  return {"calls": calls, "groups_ms": dict(groups.most_common()),
          "top_ops": [{"op": op, "group": group(op), "ms": ms, "source": sources.get(op, "")}
                      for op, ms in per_op.most_common(top)]}


def profile_step(step: Any, state: Any, batch: Any, calls: int, trace_dir: str
                 ) -> tuple[dict[str, Any], Any]:
  """Traces ``calls`` calls of a compiled step (`training.compiled.CompiledStep`) into
  ``trace_dir``; returns (`summarize`'s summary, the state after the calls)."""
  with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
    _, state = timing.time_steps(step, state, batch, calls)
  files = glob.glob(os.path.join(trace_dir, "**", "*perfetto_trace.json.gz"), recursive=True)
  if not files:
    raise FileNotFoundError(f"jax.profiler wrote no Perfetto trace under {trace_dir}")
  with gzip.open(max(files, key=os.path.getmtime), "rt", encoding="utf-8") as f:
    trace = json.load(f)
  events = trace["traceEvents"] if isinstance(trace, dict) else trace
  return summarize(events, calls, op_names(step.executable.as_text())), state


def markdown(summary: dict[str, Any], bucket: int) -> str:
  """The summary as markdown: time per group, then the slowest ops."""
  total = sum(summary["groups_ms"].values())
  lines = [f"profile of the {bucket}-token step (op self time summed over threads, "
           f"{total:.0f} ms per call):", ""]
  lines += [f"- {g}: {ms:.0f} ms ({100 * ms / total:.0f}%)"
            for g, ms in summary["groups_ms"].items()]
  lines += ["", "| op | group | ms per call | from |", "|---|---|---|---|"]
  lines += [f"| {o['op']} | {o['group']} | {o['ms']:.1f} | {o['source'][-80:]} |"
            for o in summary["top_ops"]]
  return "\n".join(lines)
