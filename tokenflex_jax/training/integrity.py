"""Checksums of committed checkpoints, their verification, and leftovers of killed saves.

Orbax commits a step by renaming its temporary directory, so a step directory is never
half-written by a save; it can still be damaged later (a truncated copy, a deleted or
overwritten file). Once a step is committed, each process records the size and CRC-32 of
the files it owns in ``<step>/checksums.process_<i>.json``; `problems` compares them
with the disk, so a resume can tell a damaged step from a good one before reading it.

A process owns the files whose path names it (``ocdbt.process_<i>/...``,
``array_metadatas/process_<i>``, ``data/process_<i>-of-<n>.json``); process 0 also owns
the files that name no process (metadata, manifests, JSON items).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import zlib

from absl import logging

CHECKSUMS = "checksums.process_{}.json"
_PROCESS = re.compile(r"process_(\d+)")
_TEMPORARY = re.compile(r"\.orbax-checkpoint-tmp")


def _owner(relative_path: str) -> int:
  """The process that checksums a file of a step directory (see the module docstring)."""
  match = _PROCESS.search(relative_path)
  return int(match.group(1)) if match else 0


def _crc32(path: str) -> int:
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(step_dir: str) -> list[str]:
  """Paths relative to ``step_dir`` of every file in it but the checksum files."""
  out = []
  for root, _, names in os.walk(step_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), step_dir)
      if not (rel.startswith("checksums.process_") and rel.endswith(".json")):
        out.append(rel)
  return sorted(out)


def write_checksums(step_dir: str, process_index: int) -> None:
  """Records {file: [size, crc32]} of this process's files of a committed step."""
  entries = {rel: [os.path.getsize(os.path.join(step_dir, rel)),
                   _crc32(os.path.join(step_dir, rel))]
             for rel in _files(step_dir) if _owner(rel) == process_index}
  path = os.path.join(step_dir, CHECKSUMS.format(process_index))
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(entries, f, indent=0, sort_keys=True)
  os.replace(path + ".tmp", path)  # A kill mid-write leaves no half-written record.


def has_checksums(step_dir: str, process_index: int) -> bool:
  return os.path.exists(os.path.join(step_dir, CHECKSUMS.format(process_index)))


def problems(step_dir: str, process_index: int, items: tuple[str, ...]) -> list[str]:
  """What is wrong with this process's part of a step: one "FILE: what" per problem
  ([] for a good step). A step without this process's checksums (killed between the
  commit and the record) is checked for its ``items`` folders only."""
  if not os.path.isdir(step_dir):
    return [f"{step_dir}: missing"]
  found = [f"{os.path.join(step_dir, item)}: missing (the step has no {item!r} item)"
           for item in items if not os.path.isdir(os.path.join(step_dir, item))]
  record = os.path.join(step_dir, CHECKSUMS.format(process_index))
  if not os.path.exists(record):
    return found
  try:
    with open(record, encoding="utf-8") as f:
      expected = json.load(f)
  except (OSError, ValueError) as e:
    return found + [f"{record}: unreadable ({e})"]
  for rel, (size, crc) in sorted(expected.items()):
    path = os.path.join(step_dir, rel)
    if not os.path.exists(path):
      found.append(f"{path}: missing")
    elif os.path.getsize(path) != size:
      found.append(f"{path}: {os.path.getsize(path)} bytes, {size} when it was saved "
                   f"({'truncated' if os.path.getsize(path) < size else 'grown'})")
    elif _crc32(path) != crc:
      found.append(f"{path}: contents changed since it was saved (CRC-32 mismatch)")
  return found


def temporary_dirs(checkpoint_dir: str) -> list[str]:
  """The temporary directories of saves in progress or never committed (Orbax writes a
  step into ``<step>.orbax-checkpoint-tmp...`` and renames it when complete)."""
  if not os.path.isdir(checkpoint_dir):
    return []
  paths = [os.path.join(checkpoint_dir, n) for n in sorted(os.listdir(checkpoint_dir))
           if _TEMPORARY.search(n)]
  return [p for p in paths if os.path.isdir(p)]


def remove_temporary(checkpoint_dir: str) -> list[str]:
  """Deletes the temporary directories of saves that never committed (a process killed
  mid-save) and returns their paths; each is logged as a warning."""
  removed = temporary_dirs(checkpoint_dir)
  for path in removed:
    shutil.rmtree(path, ignore_errors=True)
    logging.warning("removed %s: the temporary directory of a save that did not finish "
                    "(the process was killed while writing it); its step was never "
                    "committed", path)
  return removed
