"""The TFDS array_record build reads back exactly what the generator makes."""

import pickle

import numpy as np
import pytest

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


def test_missing_build_raises(tmp_path):
  with pytest.raises(ValueError, match="tokenflex_scenes"):
    tfds_builder.tfds_source(str(tmp_path), "train")
