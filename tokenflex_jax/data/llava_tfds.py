r"""LLaVA conversation JSON + an image folder -> a TFDS dataset in array_record files.

Build (no TensorFlow needed):

  python -m tokenflex_jax.data.llava_tfds --json=llava_v1_5_mix665k.json \
      --image_dir=/data/llava/images --data_dir=/data/tfds [--name=NAME] \
      [--skip_malformed]

A build records a fingerprint of its sources (`SOURCE_FILE`: the JSON file's SHA-256,
the size and modification time of every image its rows name, the image folder and
--skip_malformed). Building again with the sources unchanged reuses the build; with any
of them changed it rebuilds, with a warning naming what changed (a build without a
fingerprint, from before this rule, is rebuilt too).

Every row is validated first (`llava.read_llava`, then each image is decoded once): a
malformed row stops the build with an error naming the file and row, or, with
--skip_malformed, is left out and counted in the log. Text-only rows (no "image", such
as the 41k ShareGPT rows of LLaVA-1.5's mix665k) are kept, with no images. Each
example stores its image files' bytes as they are (decoded and resized by the input
pipeline), in the row's order, the conversation
as JSON text [[role, text], ...] and its row in the JSON file; TFDS stores the examples
in its own shuffled order.

Read: ``LlavaTfdsSource(data_dir, "train")`` is a grain data source; the pipeline reads
it when ``config.data.source = "llava"`` and ``config.data.tfds_dir`` names the build.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from absl import flags, logging
from etils import epath

from tokenflex_jax import entry, paths
from tokenflex_jax.data import images, llava, tfds_split
from tokenflex_jax.data.rows import INVALID_UTF8, MalformedRowError, bad_text, format_skipped
from tokenflex_jax.errors import InputError

NAME = "llava_conversations"
SOURCE_FILE = "source_fingerprint.json"  # in the build's version folder


@dataclasses.dataclass(eq=False)  # tfds.core.BuilderConfig is neither frozen nor eq
class LlavaConfig(tfds.core.BuilderConfig):
  json_path: str = ""
  image_dir: str = ""
  skip_malformed: bool = False


def _checked_image_bytes(conversation: llava.Conversation, image_path: str,
                         json_path: str) -> bytes:
  """An image file's bytes, after checking that they decode (`images.decode`: a corrupt,
  truncated or too large image, or an unsupported mode, is a malformed row)."""
  try:
    data = epath.Path(image_path).read_bytes()
    images.decode(data, None)
  except images.ImageError as e:
    raise MalformedRowError(json_path, conversation.row, e.reason,
                            f"{image_path}: {e}") from None
  except OSError as e:
    raise MalformedRowError(json_path, conversation.row, "unreadable image",
                            f"{image_path}: {e}") from None
  return data


class LlavaConversations(tfds.core.GeneratorBasedBuilder):
  """One split, "train": the usable rows of a LLaVA JSON file ("row" says which)."""

  name = NAME
  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {"1.0.0": "First release.",
                   "1.1.0": "Several images per row: 'images' replaces 'image'."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=f"LLaVA conversations from {self.builder_config.json_path}.",
        features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            # Encoded bytes per image, in the row's order.
            "images": tfds.features.Sequence(tfds.features.Tensor(shape=(), dtype=np.object_)),
            "conversations": tfds.features.Text(),  # JSON [[role, text], ...]
            "row": tfds.features.Scalar(dtype=np.int64),
        }),
        supervised_keys=None,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # local files only
    cfg = self.builder_config
    rows, skipped = llava.read_llava(cfg.json_path, cfg.image_dir, cfg.skip_malformed)
    if skipped:
      logging.warning("%s: %s", cfg.json_path, format_skipped(skipped))
    if not rows:
      raise InputError(f"{cfg.json_path}: no usable rows")
    return {"train": self._generate_examples(rows)}

  def _generate_examples(self, rows: list[llava.Conversation]
                         ) -> Iterator[tuple[int, dict[str, Any]]]:
    cfg = self.builder_config
    for conversation in rows:
      try:
        data = [_checked_image_bytes(conversation, path, cfg.json_path)
                for path in conversation.image_paths]
      except MalformedRowError as e:
        if not cfg.skip_malformed:
          raise
        logging.warning("skipped %s", e)
        continue
      yield conversation.row, {
          "id": conversation.id, "images": data, "row": conversation.row,
          "conversations": json.dumps([list(t) for t in conversation.turns])}


def source_fingerprint(config: LlavaConfig) -> dict[str, Any]:
  """What the build is made from: {"json", "json_sha256", "image_dir", "skip_malformed",
  "images": number of image files named, "images_sha256": over each one's name, size and
  modification time (local files; a gs:// image enters by its name only)}."""
  rows, _ = llava.read_llava(config.json_path, config.image_dir, skip_malformed=True)
  digest = hashlib.sha256()
  named = sorted({path for r in rows for path in r.image_paths})
  for path in named:
    stat = None if paths.is_remote(path) else os.stat(path)
    digest.update(json.dumps([path, stat and stat.st_size, stat and stat.st_mtime_ns]).encode())
  return {"json": config.json_path,
          "json_sha256": hashlib.sha256(epath.Path(config.json_path).read_bytes()).hexdigest(),
          "image_dir": config.image_dir, "skip_malformed": config.skip_malformed,
          "images": len(named), "images_sha256": digest.hexdigest()}


def source_changes(old: dict[str, Any] | None, new: dict[str, Any]) -> list[str]:
  """What differs between two `source_fingerprint`s, in words (empty: the same)."""
  if old is None:
    return ["it records no source fingerprint (built before builds recorded one)"]
  words = {("json",): "the JSON path", ("json_sha256",): "the JSON file's contents",
           ("image_dir",): "--image_dir", ("skip_malformed",): "--skip_malformed",
           ("images", "images_sha256"): "the image files its rows name"}
  return [f"{what} changed" for keys, what in words.items()
          if any(old.get(k) != new[k] for k in keys)]


def build(data_dir: str, json_path: str, image_dir: str, name: str = "",
          skip_malformed: bool = False) -> str:
  """Builds data_dir/llava_conversations/NAME/1.1.0, or reuses it if its sources have not
  changed since it was built (see `source_fingerprint`); returns that folder.

  NAME defaults to the JSON file's name without its extension.
  """
  name = name or re.sub(r"[^A-Za-z0-9_]", "_", os.path.splitext(os.path.basename(json_path))[0])
  config = LlavaConfig(name=name, json_path=paths.absolute(json_path),
                       image_dir=paths.absolute(image_dir), skip_malformed=skip_malformed)
  fingerprint = source_fingerprint(config)

  def prepared(directory: str) -> epath.Path:
    builder = LlavaConversations(config=config, data_dir=directory)
    builder.download_and_prepare(file_format="array_record")
    folder = epath.Path(builder.data_dir)
    paths.write_atomically(str(folder / SOURCE_FILE), json.dumps(fingerprint, indent=2).encode())
    return folder

  def build_in(directory: str) -> str:  # a local folder (`paths.build_into`)
    folder = epath.Path(LlavaConversations(config=config, data_dir=directory).data_dir)
    if not folder.exists():
      return str(prepared(directory))
    recorded = folder / SOURCE_FILE
    changes = source_changes(
        json.loads(recorded.read_text()) if recorded.exists() else None, fingerprint)
    if not changes:
      logging.info("reusing %s: its sources have not changed", folder)
      return str(folder)
    logging.warning("rebuilding %s: %s%s", folder, "; ".join(changes),
                    " since it was built" if recorded.exists() else "")
    # Built aside and swapped in: a rebuild that fails leaves the old build in place.
    with tempfile.TemporaryDirectory(dir=directory, prefix=".rebuild-") as aside:
      fresh = prepared(aside)
      folder.rmtree()
      os.replace(fresh, folder)
    return str(folder)
  return paths.build_into(data_dir, build_in)  # gs://: built locally, then uploaded


class LlavaTfdsSource(tfds_split.TfdsSplit):
  """Grain random-access source: {"images": a tuple of encoded bytes per image (none for
  a text-only row), "turns": ((role, text), ...),
  "id": str, "row": its row in the JSON file, "source": this build and split, "record":
  its index in the split} ("source" and "record" name it in the pipeline's errors).

  Each record is checked by the JSON reader's rules (`llava.check_turns`: roles in
  order, image markers in user turns matching the images, non-empty replies; texts valid
  UTF-8): a record that breaks them raises `MalformedRowError` naming the build, split
  and record. The images are decoded (and checked) by the pipeline. A 1.0.0 build (one
  "image" per record, b"" for none) reads the same. Picklable: the array_record files
  are reopened lazily in each process.
  """

  def __init__(self, data_dir: str, split: str = "train"):
    super().__init__(tfds_split.find_build(data_dir, NAME), split)

  def convert(self, raw: dict[str, Any], index: int) -> dict[str, Any]:
    texts = self.texts(raw, ("id", "conversations"), index)
    row_id = texts["id"]
    try:
      turns = llava.turns_from_json(texts["conversations"])
    except (ValueError, TypeError, RecursionError) as e:
      raise self.bad(index, "invalid JSON", f"id {row_id!r:.80}: 'conversations': "
                     f"{type(e).__name__}: {e}"[:300]) from None
    found = bad_text(turns, "'conversations'")
    if found:
      raise self.bad(index, INVALID_UTF8, f"id {row_id!r:.80}: {found}")
    data = raw["images"] if "images" in raw else [raw.get("image")]
    if not all(isinstance(image, bytes) for image in data):
      raise self.bad(index, "missing image", f"id {row_id!r:.80}: no image bytes")
    data = tuple(image for image in data if image)  # 1.0.0: b"" is no image
    turns = llava.check_turns(turns, row_id, lambda reason, detail: self.bad(index, reason,
                                                                             detail),
                              images=len(data))
    return {"images": data, "id": row_id, "turns": turns,
            "row": self.integer(raw, "row", index), "source": self.name, "record": index}


def main() -> None:
  json_path = flags.DEFINE_string("json", None, "LLaVA conversation JSON (or JSON lines).",
                                  required=True)
  image_dir = flags.DEFINE_string("image_dir", None, "Folder the rows' 'image' paths are "
                                  "relative to.", required=True)
  data_dir = flags.DEFINE_string("data_dir", None, "Where TFDS writes the build.", required=True)
  name = flags.DEFINE_string("name", "", "Build config name (one folder per name); default: "
                             "the JSON file's name.")
  skip = flags.DEFINE_bool("skip_malformed", False,
                           "Leave malformed rows out (counted in the log) instead of failing.")

  def run(argv: list[str]) -> None:
    del argv
    folder = build(data_dir.value, json_path.value, image_dir.value, name.value, skip.value)
    print(folder, LlavaTfdsSource(folder))

  entry.run(run)


if __name__ == "__main__":
  main()
