"""Random access to one split of an array_record TFDS build, for grain (no TensorFlow)."""

from __future__ import annotations

from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from tensorflow_datasets.core import decode as tfds_decode

from tokenflex_jax.data.rows import INVALID_UTF8, MalformedRowError
from tokenflex_jax.errors import InputError, MissingInputError


def find_build(data_dir: str, name: str) -> str:
  """The one build of dataset ``name`` under ``data_dir`` (or ``data_dir`` itself if it is
  a build folder, i.e. holds dataset_info.json); local or gs://."""
  if (epath.Path(data_dir) / "dataset_info.json").exists():
    return data_dir
  found = sorted(str(p.parent) for p in
                 (epath.Path(data_dir) / name).glob("*/*/dataset_info.json"))
  if not found:
    raise MissingInputError(f"{data_dir}: no {name} build here (no dataset_info.json in it "
                            f"or in {name}/<config>/<version>/ under it)")
  if len(found) > 1:
    raise InputError(f"{data_dir}: {len(found)} {name} builds under it ({', '.join(found)}); "
                     "pass one build's folder instead")
  return found[0]


class TfdsSplit:
  """A grain RandomAccessDataSource over ``split`` of a build; subclasses turn the raw
  records into examples in `convert`. Picklable: the files are reopened lazily in each
  process.

  A record that cannot be read, deserialized or converted raises `MalformedRowError`
  naming the build, the split and the record (its index in the split), e.g.
  "/data/tfds/x/1.0.0 (train split): record 17: undecodable record: ...".
  """

  # TFDS decoders for the features (e.g. {"image": tfds.decode.SkipDecoding()} for an
  # image that `convert` decodes and checks itself); None: TFDS decodes every feature.
  decoders: dict[str, Any] | None = None

  def __init__(self, dataset_dir: str, split: str):
    self.dataset_dir = dataset_dir
    self.split = split
    self.name = f"{dataset_dir} ({split} split)"
    self._source = self._features = None
    self._len = len(self._open())

  def _open(self):
    if self._source is None:
      builder = tfds.builder_from_directory(self.dataset_dir)
      self._features = builder.info.features
      self._source = builder.as_data_source(
          split=self.split, deserialize_method=tfds_decode.DeserializeMethod.RAW_BYTES)
    return self._source

  def __getstate__(self):
    return {**self.__dict__, "_source": None, "_features": None}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    index = int(index)
    source = self._open()
    if not 0 <= index < self._len:
      raise IndexError(f"record {index} out of range for {self._len} records of {self.name}")
    try:
      record = source[index]
    except Exception as e:  # pylint: disable=broad-except  # array_record's many types
      raise self.bad(index, "unreadable record", f"{type(e).__name__}: {e}") from None
    return self.decode(record, index)

  def decode(self, record: bytes, index: int) -> dict[str, Any]:
    """A stored record (its serialized bytes) -> the example (`convert`); a record that
    does not deserialize is `MalformedRowError` "undecodable record"."""
    self._open()
    try:
      raw = self._features.deserialize_example_np(record, decoders=self.decoders)
    except Exception as e:  # pylint: disable=broad-except  # protobuf and numpy types
      raise self.bad(index, "undecodable record", f"{type(e).__name__}: {e}"[:300]) from None
    return self.convert(raw, index)

  def bad(self, index: int, reason: str, detail: str = "") -> MalformedRowError:
    """The error for record ``index``: names the build, the split and the record."""
    return MalformedRowError(self.name, index, reason, detail, unit="record")

  def texts(self, raw: dict[str, Any], keys: tuple[str, ...], index: int) -> dict[str, str]:
    """{key: str} of record ``index``'s text fields (bytes decoded as UTF-8); raises `bad`
    for invalid UTF-8 or a field that is not text."""
    out = {}
    for key in keys:
      value = raw.get(key)
      try:
        out[key] = value.decode("utf-8") if isinstance(value, bytes) else value
      except UnicodeDecodeError as e:
        raise self.bad(index, INVALID_UTF8, f"{key!r}: {e}") from None
      if not isinstance(out[key], str):
        raise self.bad(index, "mistyped field", f"{key!r} is {type(value).__name__}")
    return out

  def integer(self, raw: dict[str, Any], key: str, index: int) -> int:
    """Record ``index``'s integer field ``key``; raises `bad` ("mistyped field") for a
    value that is not an integer."""
    value = raw.get(key)
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
      raise self.bad(index, "mistyped field", f"{key!r} is {value!r:.80}")
    return int(value)

  def convert(self, raw: dict[str, Any], index: int) -> dict[str, Any]:
    """A deserialized record -> the example; raises `bad` for one that is not usable."""
    del index
    return raw

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.dataset_dir!r}, split={self.split!r}, "
            f"len={self._len})")
