"""Paths of workdirs, data and checkpoints: local, or ``gs://`` (any `etils.epath` path).

Everything the binaries read or write outside Orbax goes through `etils.epath`, the path
library Orbax uses (``gs://`` through gcsfs; Orbax's arrays through tensorstore's GCS
driver). On GCS there are no directories, renames copy object by object (not atomic)
and files cannot be appended to; what that changes is said where it matters
(`training.integrity`, `training.metrics`).
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import Any

from etils import epath


def is_remote(path: str | os.PathLike) -> bool:
  """Whether ``path`` names a remote store (``gs://...``, any ``scheme://``)."""
  return "://" in os.fspath(path)


def absolute(path: str) -> str:
  """A local path made absolute; a remote one as it is."""
  return path if is_remote(path) else os.path.abspath(path)


def is_file(path: str) -> bool:
  """Whether ``path`` (local or remote) is a file; False for a name no store can hold
  (e.g. one with a NUL byte, as a malformed data row may give)."""
  try:
    return epath.Path(path).is_file()
  except (OSError, ValueError):
    return False


_PARTIAL_PREFIX, _PARTIAL_SUFFIX = ".tmp-", ".part"  # `write_atomically`'s temporary files


def is_partial_write(name: str) -> bool:
  """Whether a file name is `write_atomically`'s temporary file (another process's write
  in progress, or the leftover of a killed one): never content to list or checksum."""
  return name.startswith(_PARTIAL_PREFIX) and name.endswith(_PARTIAL_SUFFIX)


def write_atomically(path: str | os.PathLike, data: bytes) -> None:
  """Writes ``data`` to ``path`` so that a reader never sees half of it: locally through
  a temporary file renamed over it; on GCS a single upload is already all or nothing."""
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=_PARTIAL_PREFIX,
                              suffix=_PARTIAL_SUFFIX)  # one per writer
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def upload_tree(local_dir: str, remote_dir: str) -> None:
  """Copies every file under ``local_dir`` to the same relative path under
  ``remote_dir`` (e.g. a TFDS build made locally, since array_record cannot write GCS)."""
  for root, _, names in os.walk(local_dir):
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), local_dir)
      target = epath.Path(remote_dir) / rel
      with open(os.path.join(root, name), "rb") as src, target.open("wb") as dst:
        shutil.copyfileobj(src, dst)


def build_into(data_dir: str, build: Callable[[str], Any]) -> Any:
  """``build(data_dir)`` for a local ``data_dir``; for a remote one, ``build`` runs in a
  local temporary folder (array_record writes only local files), whose files are then
  uploaded to ``data_dir``. Returns what ``build`` returns, with the temporary folder
  replaced by ``data_dir`` if it is a path in it."""
  if not is_remote(data_dir):
    return build(data_dir)
  with tempfile.TemporaryDirectory() as local:
    out = build(local)
    upload_tree(local, data_dir)
  if isinstance(out, str) and out.startswith(local):
    out = data_dir.rstrip("/") + out[len(local):]
  return out


def write_json(path: str | os.PathLike, value: object) -> None:
  """``value`` as indented UTF-8 JSON, written with `write_atomically`."""
  write_atomically(path, json.dumps(value, indent=2, ensure_ascii=False).encode("utf-8"))
