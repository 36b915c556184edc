"""Where a compiled step spends its time: a `jax.profiler` trace, summed per XLA op.

The trace is written as a Perfetto JSON file (``create_perfetto_trace=True``; open it in
ui.perfetto.dev or TensorBoard); the summary adds up the self time of every XLA op
event per call, and groups the ops by what XLA's CPU backend named them: matmuls
(YNNPACK fusions and Eigen dots), copies and transposes, and every other fusion. Names
are the backend's: on a GPU or TPU the groups are mostly "other".

It also says how the host's threads spent the step (`threads`): per thread that ran
ops, the time inside op events and the time inside thread-pool tasks (XLA's CPU runtime
marks each task it runs with a pair of ``ThreadpoolListener`` start/stop events; a task
is an op, or a share of another thread's op such as a YNNPACK matmul's parallel loop),
against the wall time of the traced calls.
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
  """{"calls", "groups_ms": {group: ms per call}, "sourced_ms": {group: ms per call of
  the ops whose JAX source is known}, "top_ops": [{"op", "group", "ms", "source"}]} from
  Perfetto trace events (complete events, microseconds)."""
  per_op: collections.Counter[str] = collections.Counter()
  for e in events:
    if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS):
      per_op[e["name"]] += e.get("dur", 0) / 1e3 / calls
  groups: collections.Counter[str] = collections.Counter()
  sourced: collections.Counter[str] = collections.Counter()
  for op, ms in per_op.items():
    groups[group(op)] += ms
    if sources.get(op):
      sourced[group(op)] += ms
  return {"calls": calls, "groups_ms": dict(groups.most_common()),
          "sourced_ms": dict(sourced.most_common()),
          "top_ops": [{"op": op, "group": group(op), "ms": ms, "source": sources.get(op, "")}
                      for op, ms in per_op.most_common(top)]}


_TASK_START, _TASK_STOP = "ThreadpoolListener::StartRegion", "ThreadpoolListener::StopRegion"


def _union_us(intervals: list[tuple[float, float]]) -> float:
  total, end = 0.0, float("-inf")
  for a, b in sorted(intervals):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def threads(events: list[dict[str, Any]], calls: int) -> dict[str, Any]:
  """{"wall_ms": wall time per call from the first op to the last, "per_thread": [{"ops_ms",
  "busy_ms"} per call, for each worker thread, busiest first], "op_parallelism": op
  time summed over threads / wall}: ``busy`` is the union of the thread's op events and
  of its thread-pool tasks."""
  ops = [e for e in events if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS)
         and e.get("dur", 0) > 0]
  if not ops:
    return {"wall_ms": 0.0, "per_thread": [], "op_parallelism": 0.0}
  start = min(e["ts"] for e in ops)
  stop = max(e["ts"] + e["dur"] for e in ops)
  wall = stop - start
  spans: dict[Any, list[tuple[float, float]]] = collections.defaultdict(list)
  for e in ops:
    spans[e["tid"]].append((e["ts"], e["ts"] + e["dur"]))
  # Time inside op events (a union: an op's events may nest) per thread.
  op_us = collections.Counter({t: _union_us(s) for t, s in spans.items()})
  opened: dict[Any, float] = {}
  for e in sorted((e for e in events if e.get("name") in (_TASK_START, _TASK_STOP)),
                  key=lambda e: e["ts"]):
    if e["name"] == _TASK_START:
      opened[e["tid"]] = e["ts"]
    elif e["tid"] in opened and e["tid"] in op_us:  # the task, within the traced calls
      a, b = max(opened.pop(e["tid"]), start), min(e["ts"], stop)
      if b > a:
        spans[e["tid"]].append((a, b))
  # The threads that ran ops for at least 1% of the wall time (the pool's workers; not the
  # client threads that only start the executable).
  per_thread = [{"ops_ms": us / 1e3 / calls, "busy_ms": _union_us(spans[t]) / 1e3 / calls}
                for t, us in op_us.most_common() if us >= 0.01 * wall]
  return {"wall_ms": wall / 1e3 / calls, "per_thread": per_thread,
          "op_parallelism": sum(op_us.values()) / wall}


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
  summary = summarize(events, calls, op_names(step.executable.as_text()))
  return {**summary, "threads": threads(events, calls)}, state


def markdown(summary: dict[str, Any], bucket: int) -> str:
  """The summary as markdown: time per group, then the slowest ops."""
  total = sum(summary["groups_ms"].values())
  lines = [f"profile of the {bucket}-token step (op self time summed over threads, "
           f"{total:.0f} ms per call):", ""]
  lines += [f"- {g}: {ms:.0f} ms ({100 * ms / total:.0f}%)"
            for g, ms in summary["groups_ms"].items()]
  t = summary["threads"]
  if t["per_thread"]:
    lines += ["", f"threads: {t['wall_ms']:.0f} ms of wall time per call; op time summed over "
              f"threads / wall = {t['op_parallelism']:.2f}; per thread, in op events / in "
              "thread-pool tasks (ops and shares of other threads' ops): "
              + ", ".join(f"{p['ops_ms']:.0f} / {p['busy_ms']:.0f} ms"
                          for p in t["per_thread"])]
  lines += ["", "| op | group | ms per call | from |", "|---|---|---|---|"]
  lines += [f"| {o['op']} | {o['group']} | {o['ms']:.1f} | {o['source'][-80:]} |"
            for o in summary["top_ops"]]
  return "\n".join(lines)
