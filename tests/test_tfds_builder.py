"""The TFDS array_record build reads back exactly what the generator makes."""

import os
import pickle
import re
import shutil

import numpy as np
import pytest

from tokenflex_jax import errors
from tokenflex_jax.data import scenes
from tokenflex_jax.data import tfds_builder

SEED, NUM_TRAIN, NUM_VAL = 4, 20, 6


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  d = str(tmp_path_factory.mktemp("tfds"))
  tfds_builder.build_tfds(d, seed=SEED, num_train=NUM_TRAIN, num_validation=NUM_VAL)
  return d


@pytest.mark.parametrize("split,offset,n", [
    ("train", 0, NUM_TRAIN), ("validation", tfds_builder.VALIDATION_INDEX_OFFSET, NUM_VAL)])
def test_build_reads_back_as_generated(data_dir, split, offset, n):
  src = tfds_builder.tfds_source(data_dir, split)
  assert len(src) == n
  seen = []
  for j in range(len(src)):
    item = src[j]
    want = scenes.generate_example(SEED, item["index"])
    assert set(item) == set(want) | {"index"}
    for key in ("question", "answer", "family"):
      assert isinstance(item[key], str) and item[key] == want[key]
    for key in ("image", "color_map", "object_map"):
      assert item[key].dtype == want[key].dtype
      np.testing.assert_array_equal(item[key], want[key])
    seen.append(item["index"])
  assert sorted(seen) == list(range(offset, offset + n))


def test_source_pickles_and_the_build_is_found(data_dir):
  src = tfds_builder.tfds_source(data_dir, "train")
  clone = pickle.loads(pickle.dumps(src))
  assert clone[3]["index"] == src[3]["index"]
  assert tfds_builder.tfds_source(src.dataset_dir, "train")[0]["index"] == src[0]["index"]


def test_a_missing_or_ambiguous_build_is_one_line_naming_the_folder(tmp_path, data_dir):
  with pytest.raises(errors.MissingInputError,
                     match=rf"^{re.escape(str(tmp_path))}: no tokenflex_scenes build here"):
    tfds_builder.tfds_source(str(tmp_path), "train")
  build = tfds_builder.tfds_source(data_dir, "train").dataset_dir
  twin = os.path.join(os.path.dirname(os.path.dirname(build)), "other", "1.0.0")
  shutil.copytree(build, twin)
  try:
    with pytest.raises(errors.InputError, match=r": 2 tokenflex_scenes builds under it"):
      tfds_builder.tfds_source(data_dir, "train")
  finally:
    shutil.rmtree(os.path.dirname(twin))
