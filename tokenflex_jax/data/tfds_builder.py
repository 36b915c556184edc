"""The scene suite as a TFDS dataset in array_record files (no TensorFlow needed).

Build:  python -m tokenflex_jax.data.tfds_builder --data_dir=DIR --num_train=N \
            --num_validation=M [--seed=S --image_size=32]
Read:   tfds_source(DIR, "train")[i] -> the same keys and types as
        `scenes.generate_example`, plus "index" (the generator index it came from).

Train example i is ``generate_example(seed, i)``; validation example i is
``generate_example(seed, VALIDATION_INDEX_OFFSET + i)``, so the splits never share an
example (nor does validation share one with a procedural train source of that seed).
TFDS stores examples in a shuffled order: use "index" to match them to the generator.
"""

from __future__ import annotations

import dataclasses
import io
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import flags
from PIL import Image

from tokenflex_jax import entry, paths
from tokenflex_jax.data import images, scenes, tfds_split

VALIDATION_INDEX_OFFSET = 1 << 40
_TEXT_KEYS = ("question", "answer", "family")


@dataclasses.dataclass(eq=False)  # tfds.core.BuilderConfig is neither frozen nor eq
class TokenflexScenesConfig(tfds.core.BuilderConfig):
  """What to generate; the config name encodes it, so each build gets its own folder."""
  seed: int = 0
  num_train: int = 1000
  num_validation: int = 100
  image_size: int = scenes.BASE_SIZE


def make_config(*, seed: int, num_train: int, num_validation: int,
                image_size: int = scenes.BASE_SIZE) -> TokenflexScenesConfig:
  """The build config for these settings, named e.g. "seed0_train1000_val100_px32"."""
  return TokenflexScenesConfig(
      name=f"seed{seed}_train{num_train}_val{num_validation}_px{image_size}",
      description="Procedural TokenFLEX VQA scenes, all question families, uniform.",
      seed=seed, num_train=num_train, num_validation=num_validation, image_size=image_size)


def _png(image: np.ndarray) -> bytes:
  """uint8 [H, W, 3] -> PNG bytes (lossless)."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format="PNG")
  return buf.getvalue()


class TokenflexScenes(tfds.core.GeneratorBasedBuilder):
  """Splits "train" and "validation" of `scenes.generate_example`, uniform over families."""

  name = "tokenflex_scenes"
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [make_config(seed=0, num_train=1000, num_validation=100)]

  def _info(self) -> tfds.core.DatasetInfo:
    size = self.builder_config.image_size
    # DatasetInfo directly, not dataset_info_from_configs: that one looks for package
    # metadata files and fails when this module runs as __main__.
    return tfds.core.DatasetInfo(
        builder=self,
        description="Procedural TokenFLEX VQA scenes (tokenflex_jax.data.scenes).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
            "question": tfds.features.Text(),
            "answer": tfds.features.Text(),
            "family": tfds.features.Text(),
            "color_map": tfds.features.Tensor(shape=(size, size), dtype=np.int32),
            "object_map": tfds.features.Tensor(shape=(size, size), dtype=np.int32),
            "index": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # nothing to download
    cfg = self.builder_config
    return {"train": self._generate_examples(0, cfg.num_train),
            "validation": self._generate_examples(VALIDATION_INDEX_OFFSET, cfg.num_validation)}

  def _generate_examples(self, offset: int, count: int) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config
    for i in range(offset, offset + count):
      ex = scenes.generate_example(cfg.seed, i, image_size=cfg.image_size)
      yield i, {**ex, "image": _png(ex["image"]), "index": i}


def build_tfds(data_dir: str, *, seed: int, num_train: int, num_validation: int,
               image_size: int = scenes.BASE_SIZE) -> None:
  """Generates both splits under data_dir/tokenflex_scenes/<config>/1.0.0 (skips if built
  locally; a gs:// data_dir gets a fresh build uploaded, `paths.build_into`)."""
  config = make_config(seed=seed, num_train=num_train, num_validation=num_validation,
                       image_size=image_size)
  paths.build_into(data_dir, lambda d: TokenflexScenes(config=config, data_dir=d)
                   .download_and_prepare(file_format="array_record"))


class TfdsSceneSource(tfds_split.TfdsSplit):
  """A grain RandomAccessDataSource over one split of a build, yielding generator-style dicts.

  Items: {"image": uint8 [H, W, 3], "question"/"answer"/"family": str, "color_map",
  "object_map": int32 [H, W], "index": int}. Picklable: the files are reopened lazily.

  Each record is checked (`convert`): a PNG that is not RGB of the build's size (the
  labels are per pixel: nothing is converted or resized), label ids outside the suite's,
  texts that are not UTF-8 or not the family's question and answers raise
  `MalformedRowError` naming the build, split and record.
  """

  decoders = {"image": tfds.decode.SkipDecoding()}  # decoded and checked in `convert`

  def __init__(self, data_dir: str, split: str):
    super().__init__(tfds_split.find_build(data_dir, TokenflexScenes.name), split)

  def convert(self, raw: dict[str, Any], index: int) -> dict[str, Any]:
    out: dict[str, Any] = self.texts(raw, _TEXT_KEYS, index)
    if out["family"] not in scenes.FAMILY_NAMES:
      raise self.bad(index, "unknown family", f"{out['family']!r:.80}")
    family = scenes.get_family(out["family"])
    if out["question"] not in family.questions or out["answer"] not in family.answers:
      raise self.bad(index, "unknown question or answer",
                     f"family {family.name}: {out['question']!r:.80} -> {out['answer']!r:.80}")
    h, w, _ = self._features["image"].shape
    for k, top in (("color_map", len(scenes.COLORS)), ("object_map", scenes.NUM_OBJECT_TYPES)):
      labels = np.asarray(raw.get(k))
      if labels.shape != (h, w) or labels.dtype != np.int32:
        raise self.bad(index, "wrong labels", f"{k!r} is {labels.dtype} {labels.shape}, "
                       f"expected int32 {(h, w)}")
      if labels.size and (labels.min() < 0 or labels.max() >= top):
        raise self.bad(index, "wrong labels", f"{k!r} holds ids outside [0, {top})")
      out[k] = labels
    try:
      out["image"] = images.decode_exact(raw.get("image"), h, w)
    except images.ImageError as e:
      raise self.bad(index, e.reason, str(e)) from None
    out["index"] = self.integer(raw, "index", index)
    return out


def tfds_source(data_dir: str, split: str) -> TfdsSceneSource:
  """Random access to ``split`` ("train" | "validation") of the build in ``data_dir``."""
  return TfdsSceneSource(data_dir, split)


def main(argv: list[str]) -> None:
  del argv
  f = flags.FLAGS
  build_tfds(f.data_dir, seed=f.seed, num_train=f.num_train,
             num_validation=f.num_validation, image_size=f.image_size)
  for split in ("train", "validation"):
    print(split, tfds_source(f.data_dir, split))


if __name__ == "__main__":
  # Flags are defined only when run as a script: importing this module must not clash
  # with the trainer's flags.
  flags.DEFINE_string("data_dir", None, "Where TFDS writes the build.", required=True)
  flags.DEFINE_integer("seed", 0, "Generator seed.")
  flags.DEFINE_integer("num_train", 10_000, "Train examples.")
  flags.DEFINE_integer("num_validation", 1_000, "Validation examples.")
  flags.DEFINE_integer("image_size", scenes.BASE_SIZE, "Image side in pixels.")
  entry.run(main)
