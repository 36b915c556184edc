"""Checksums of committed checkpoints, their verification, and leftovers of killed saves.

Locally Orbax commits a step by renaming its temporary directory; on GCS (no renames) it
writes the step in place and commits it by writing ``commit_success.txt`` last. Either
way a step Orbax lists is never half-written by a save; it can still be damaged later
(a truncated copy, a deleted or overwritten file). Once a step is committed, each
process records the size and CRC-32 of the files it owns in
``<step>/checksums.process_<i>.json``; `problems` compares them with the store, so a
resume can tell a damaged step from a good one before reading it. Paths are local or
``gs://`` (`etils.epath`).

A process owns the files whose path names it (``ocdbt.process_<i>/...``,
``array_metadatas/process_<i>``, ``data/process_<i>-of-<n>.json``); process 0 also owns
the files that name no process (metadata, manifests, JSON items).
"""

from __future__ import annotations

import json
import re
import zlib

from absl import logging
from etils import epath

from tokenflex_jax import paths

CHECKSUMS = "checksums.process_{}.json"
COMMIT_MARKER = "commit_success.txt"  # Orbax's last write of a step on GCS
_PROCESS = re.compile(r"process_(\d+)")
_TEMPORARY = re.compile(r"\.orbax-checkpoint-tmp")


def _owner(relative_path: str) -> int:
  """The process that checksums a file of a step directory (see the module docstring)."""
  match = _PROCESS.search(relative_path)
  return int(match.group(1)) if match else 0


def _crc32(path: epath.Path) -> int:
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(1 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def _files(step_dir: epath.Path, prefix: str = "") -> list[str]:
  """Paths relative to ``step_dir`` of every file in it but the checksum files and the
  temporary files of writes in progress (another process writing its checksums renames
  its temporary file away while this one lists the directory)."""
  out = []
  for child in step_dir.iterdir():
    rel = f"{prefix}{child.name}"
    if paths.is_partial_write(child.name):
      continue
    if child.is_dir():
      out.extend(_files(child, rel + "/"))
    elif not (rel.startswith("checksums.process_") and rel.endswith(".json")):
      out.append(rel)
  return sorted(out)


def write_checksums(step_dir: str, process_index: int) -> None:
  """Records {file: [size, crc32]} of this process's files of a committed step."""
  root = epath.Path(step_dir)
  entries = {rel: [(root / rel).stat().length, _crc32(root / rel)]
             for rel in _files(root) if _owner(rel) == process_index}
  # A kill mid-write leaves no half-written record.
  paths.write_atomically(root / CHECKSUMS.format(process_index),
                         json.dumps(entries, indent=0, sort_keys=True).encode("utf-8"))


def has_checksums(step_dir: str, process_index: int) -> bool:
  return (epath.Path(step_dir) / CHECKSUMS.format(process_index)).exists()


def problems(step_dir: str, process_index: int, items: tuple[str, ...]) -> list[str]:
  """What is wrong with this process's part of a step: one "FILE: what" per problem
  ([] for a good step). A step without this process's checksums (killed between the
  commit and the record) is checked for its ``items`` folders only."""
  root = epath.Path(step_dir)
  if not root.is_dir():
    return [f"{step_dir}: missing"]
  found = [f"{root / item}: missing (the step has no {item!r} item)"
           for item in items if not (root / item).is_dir()]
  record = root / CHECKSUMS.format(process_index)
  if not record.exists():
    return found
  try:
    expected = json.loads(record.read_text())
  except (OSError, ValueError) as e:
    return found + [f"{record}: unreadable ({e})"]
  for rel, (size, crc) in sorted(expected.items()):
    path = root / rel
    if not path.exists():
      found.append(f"{path}: missing")
      continue
    length = path.stat().length
    if length != size:
      found.append(f"{path}: {length} bytes, {size} when it was saved "
                   f"({'truncated' if length < size else 'grown'})")
    elif _crc32(path) != crc:
      found.append(f"{path}: contents changed since it was saved (CRC-32 mismatch)")
  return found


def temporary_dirs(checkpoint_dir: str) -> list[str]:
  """The directories of saves in progress or never committed: locally Orbax's
  ``<step>.orbax-checkpoint-tmp...`` (renamed when complete), on GCS a step directory
  without its ``commit_success.txt``."""
  root = epath.Path(checkpoint_dir)
  if not root.is_dir():
    return []
  remote = paths.is_remote(checkpoint_dir)
  out = []
  for child in sorted(root.iterdir(), key=lambda p: p.name):
    if _TEMPORARY.search(child.name) or (
        remote and child.name.isdigit() and not (child / COMMIT_MARKER).exists()):
      if child.is_dir():
        out.append(str(child))
  return out


def remove_temporary(checkpoint_dir: str) -> list[str]:
  """Deletes the temporary directories of saves that never committed (a process killed
  mid-save) and returns their paths; each is logged as a warning."""
  removed = temporary_dirs(checkpoint_dir)
  for path in removed:
    try:
      epath.Path(path).rmtree()
    except OSError:
      pass
    logging.warning("removed %s: the temporary directory of a save that did not finish "
                    "(the process was killed while writing it); its step was never "
                    "committed", path)
  return removed
