"""Random access to one split of an array_record TFDS build, for grain (no TensorFlow)."""

from __future__ import annotations

import glob
import os
from typing import Any

import tensorflow_datasets as tfds


def find_build(data_dir: str, name: str) -> str:
  """The one build of dataset ``name`` under ``data_dir`` (or ``data_dir`` itself if it is
  a build folder, i.e. holds dataset_info.json)."""
  if os.path.exists(os.path.join(data_dir, "dataset_info.json")):
    return data_dir
  found = sorted(os.path.dirname(p) for p in glob.glob(
      os.path.join(data_dir, name, "*", "*", "dataset_info.json")))
  if len(found) != 1:
    raise ValueError(f"expected one {name} build under {data_dir}, found {found or 'none'}; "
                     f"pass that build's folder instead")
  return found[0]


class TfdsSplit:
  """A grain RandomAccessDataSource over ``split`` of a build; subclasses turn the raw
  records into examples in `convert`. Picklable: the files are reopened lazily in each
  process."""

  def __init__(self, dataset_dir: str, split: str):
    self.dataset_dir = dataset_dir
    self.split = split
    self._source = None
    self._len = len(self._open())

  def _open(self):
    if self._source is None:
      builder = tfds.builder_from_directory(self.dataset_dir)
      self._source = builder.as_data_source(split=self.split)
    return self._source

  def __getstate__(self):
    return {**self.__dict__, "_source": None}

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, index: int) -> dict[str, Any]:
    return self.convert(self._open()[int(index)])

  def convert(self, raw: dict[str, Any]) -> dict[str, Any]:
    return raw

  def __repr__(self) -> str:
    return (f"{type(self).__name__}({self.dataset_dir!r}, split={self.split!r}, "
            f"len={self._len})")
