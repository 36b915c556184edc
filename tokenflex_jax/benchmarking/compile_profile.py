"""Where the TPU compiler's time goes, read from libtpu's own log (`aot --compile_profile`).

libtpu compiles a program's fusions ("kernels") on a pool of threads, one per core, after
its HLO passes; with ``TPU_VMODULE=deepsea_compiler_backend=1`` its INFO log names each
kernel as a thread starts it, and gives each stage's duration. A kernel's time is from
its start to the next start on the same thread (or the thread's last line). The backend's
work is the kernels' total, at most its duration times this host's cores (libtpu may run
more threads than cores). From the work and the longest kernel follows the time on a host
with more cores, if the kernels spread evenly: the compile's seconds other than the
backend's as measured, plus max(longest, work / cores). That is a projection, not a
measurement.

The log format is libtpu's, not an API: `requirements-tpu.txt` pins the version read here.
"""

from __future__ import annotations

import collections
import dataclasses
import glob
import os
import re
from collections.abc import Mapping, Sequence

# Set before libtpu loads (the directory is added by `environment`).
VMODULE = "deepsea_compiler_backend=1"
# The parts of the model an instruction belongs to, by a component of its op_name.
PARTS = ("vit", "projector", "llm")

_LINE = re.compile(r"^[IWEF]\d{4} (\d\d):(\d\d):(\d\d\.\d+)\s+(\d+) (\S+?):\d+\] (.*)$")
_KERNEL = re.compile(r"^\[(\S+)\] LLO optimizing ([\d,]+) instructions")
_STAGE = re.compile(r"^(HLO_PASSES|BACKEND_PASSES|CODE_GENERATION|END_TO_END) stage "
                    r"duration: (.+)$")
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)")
_UNIT = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6}


@dataclasses.dataclass(frozen=True)
class Compile:
  """One program compiled by libtpu: its kernels' seconds {name: s}, the threads that
  compiled them, its stages' seconds {"HLO_PASSES", "BACKEND_PASSES",
  "CODE_GENERATION", "END_TO_END"}, and the machine instructions libtpu optimized for
  each kernel {name: count} (every attempt: libtpu compiles some kernels again after a
  first attempt fails). The seconds depend on the host and its load; the instructions
  are the same on every run of the same program, the measure of the compiler's work
  that two revisions can be compared by on a noisy host."""
  kernels: Mapping[str, float]
  threads: int
  stages: Mapping[str, float]
  instructions: Mapping[str, int] = dataclasses.field(default_factory=dict)


def environment(log_dir: str, libtpu_args: str = "") -> dict[str, str]:
  """The environment under which libtpu logs what `read` needs into ``log_dir`` as it
  goes (unbuffered, so this process can read it), ``libtpu_args`` (the user's
  ``LIBTPU_INIT_ARGS``) kept."""
  return {"TPU_LOG_DIR": log_dir, "TPU_VMODULE": VMODULE, "TPU_MIN_LOG_LEVEL": "0",
          "LIBTPU_INIT_ARGS": f"{libtpu_args} --logbuflevel=-1".strip()}


def seconds(text: str) -> float:
  """libtpu's durations ("1m55.37s", "3.24s", "605ms") in seconds."""
  return sum(float(v) * _UNIT[u] for v, u in _DURATION.findall(text))


def parse(lines: Sequence[str]) -> list[Compile]:
  """The programs a libtpu INFO log records, in the order they finished compiling."""
  out, starts, last = [], collections.defaultdict(list), {}
  stages: dict[str, float] = {}
  instructions: dict[str, int] = collections.defaultdict(int)
  for line in lines:
    m = _LINE.match(line)
    if not m:
      continue
    t = int(m[1]) * 3600 + int(m[2]) * 60 + float(m[3])
    thread, message = int(m[4]), m[6]
    if (k := _KERNEL.match(message)) and m[5] == "deepsea_compiler_backend.cc":
      starts[thread].append((t, k[1]))
      instructions[k[1]] += int(k[2].replace(",", ""))
      last[thread] = t
    elif thread in last:
      last[thread] = t
    if s := _STAGE.match(message):
      stages[s[1]] = seconds(s[2])
      if s[1] == "END_TO_END":
        kernels = {}
        for th, seq in starts.items():
          for i, (t0, name) in enumerate(seq):
            end = seq[i + 1][0] if i + 1 < len(seq) else last[th]
            kernels[name] = kernels.get(name, 0.0) + max(end - t0, 0.0)
        out.append(Compile(kernels, len(starts), dict(stages), dict(instructions)))
        starts, last, stages = collections.defaultdict(list), {}, {}
        instructions = collections.defaultdict(int)
  return out


def log_lines(log_dir: str) -> list[str]:
  """The lines of libtpu's INFO logs in ``log_dir`` (one per process), oldest first."""
  lines: list[str] = []
  for path in sorted(glob.glob(os.path.join(log_dir, "*.log.INFO.*"))):
    with open(path, encoding="utf-8", errors="replace") as f:
      lines += f.read().splitlines()
  return lines


def read(log_dir: str) -> list[Compile]:
  """`parse` of libtpu's INFO logs in ``log_dir``."""
  return parse(log_lines(log_dir))


def owners(hlo_text: str) -> dict[str, str]:
  """{instruction: part}: the `PARTS` component of each instruction's op_name in a
  compiled program's text ("optimizer, loss" for other named ops, "unnamed" for ops
  the compiler added, e.g. collectives)."""
  out = {}
  for m in re.finditer(r"^\s*(?:ROOT )?%(\S+) = .*$", hlo_text, re.M):
    name = re.search(r'op_name="([^"]*)"', m[0])
    parts = re.split(r"[/.]", name[1]) if name else []
    out[m[1]] = next((p for p in PARTS if p in parts), "optimizer, loss" if name else "unnamed")
  return out


def summary(compile_: Compile, hlo_text: str, compile_seconds: float, host_cores: int,
            cores: Sequence[int] = (8, 16, 32)) -> dict[str, object]:
  """The figures `aot --compile_profile` prints and writes for one program: kernels,
  their total and longest seconds, their machine instructions, the threads, the stages,
  the seconds by part of the model (backward passes apart), and the compile's seconds
  (``compile_seconds``, tracing and lowering included, on ``host_cores`` cores)
  projected for hosts of ``cores``."""
  total = sum(compile_.kernels.values())
  longest = max(compile_.kernels.items(), key=lambda kv: kv[1], default=("-", 0.0))
  backend = compile_.stages.get("BACKEND_PASSES", 0.0)
  work, rest = min(total, backend * host_cores), compile_seconds - backend
  by_part: dict[str, float] = collections.defaultdict(float)
  part_of, backward = owners(hlo_text), _backward(hlo_text)
  for name, s in compile_.kernels.items():
    part = part_of.get(name, "unnamed")
    by_part[part + (" backward" if name in backward else "")] += s
  return {"kernels": len(compile_.kernels), "kernel_s": total, "longest_kernel": longest[0],
          "longest_kernel_s": longest[1],
          "instructions": sum(compile_.instructions.values()), "threads": compile_.threads,
          "host_cores": host_cores,
          "stages_s": dict(compile_.stages),
          "by_part_s": dict(sorted(by_part.items(), key=lambda kv: -kv[1])),
          "projected_s": {str(n): rest + max(longest[1], work / n) for n in cores}}


def _backward(hlo_text: str) -> set[str]:
  """The instructions of a backward pass (a transposed op_name)."""
  return {m[1] for m in re.finditer(r'^\s*(?:ROOT )?%(\S+) = .*op_name="[^"]*transpose\(',
                                    hlo_text, re.M)}
