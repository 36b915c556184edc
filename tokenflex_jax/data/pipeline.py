"""The grain input pipeline: source -> shuffle -> per-host shard -> preprocess -> batch.

Global batch i is the shuffled source's examples [i*B, (i+1)*B); host p reads and
preprocesses only its rows [p*B/P, (p+1)*B/P) of it (`HostRows`), so a run sees the
same batches whatever its number of processes. `to_global_batch` assembles the host
batches into global arrays sharded over the mesh's batch axes.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from absl import logging

from tokenflex_jax import sharding
from tokenflex_jax.data import conversation, images, pack, packed_rows, scenes
from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.data.conversation import ConversationError
from tokenflex_jax.data.rows import MAX_BAD_IN_A_ROW, MalformedRowError, too_many_bad
from tokenflex_jax.errors import ConfigError, InputError
from tokenflex_jax.specs import DataSpec

TOO_LONG = "too long"


SOURCES = ("procedural", "tfds", "llava")


def check_data_config(data_config: DataSpec, reads_data: bool = True) -> None:
  """``config.data``, validated before anything is written: `ConfigError` naming the
  first field that cannot work. ``reads_data``: the job reads training records, so a
  "tfds" or "llava" source needs its ``tfds_dir`` (aot and eval read none).

  A known ``source``; ``on_bad_record`` one of `BAD_RECORD_POLICIES`; ``num_workers``
  >= 0; ``max_text_length`` >= 2 (the placeholder and one answer token); an
  ``image_size`` of at least 1 (procedural: at least `scenes.BASE_SIZE`); procedural: a
  positive ``num_examples`` and known ``families`` with one weight >= 0 each, summing
  to more than 0; ``image_slots`` >= 1 and ``max_text_length`` > ``image_slots``."""
  d = data_config
  if d.mixture:
    _check_mixture(d, reads_data)
  elif d.source not in SOURCES:
    raise ConfigError(f"config.data.source must be one of {SOURCES}, got {d.source!r}")
  if reads_data and not d.mixture and d.source != "procedural" and not d.tfds_dir:
    build = ("python -m tokenflex_jax.data.llava_tfds" if d.source == "llava"
             else "a TFDS array_record build")
    raise ConfigError(f"config.data.tfds_dir is empty: config.data.source={d.source!r} "
                      f"reads a build of {build} from it")
  check_bad_record_policy(d.on_bad_record)
  for field, value, least in (("num_workers", d.num_workers, 0),
                              ("image_slots", d.image_slots, 1),
                              ("max_text_length", d.max_text_length, d.image_slots + 1),
                              ("image_size", d.image_size, 1)):
    if value < least:  # an int: `config_schema.to_spec` checked the type
      raise ConfigError(f"config.data.{field}={value!r} must be an integer >= {least}" + (
          " (config.data.image_slots placeholders and one answer token)"
          if field == "max_text_length" else ""))
  if d.source == "procedural" or any(m[0] == "procedural" for m in d.mixture):
    if d.image_size < scenes.BASE_SIZE:
      raise ConfigError(f"config.data.image_size={d.image_size}: the procedural scenes "
                        f"are drawn at {scenes.BASE_SIZE} px or more")
    if d.num_examples <= 0:
      raise ConfigError(f"config.data.num_examples={d.num_examples} must be positive "
                        "(the size of the procedural train split)")
    try:
      scenes.family_probs(tuple(d.families), tuple(d.family_weights))
    except ValueError as e:
      raise ConfigError(f"config.data.families / family_weights: {e}") from None


def _check_mixture(d: DataSpec, reads_data: bool) -> None:
  for i, entry in enumerate(d.mixture):
    field = f"config.data.mixture[{i}]"
    if (len(entry) != 3 or not isinstance(entry[1], str)
        or not isinstance(entry[2], (int, float)) or isinstance(entry[2], bool)):
      raise ConfigError(f"{field}={entry!r} must be (source, tfds_dir, weight)")
    if entry[0] not in SOURCES:
      raise ConfigError(f"{field}: the source must be one of {SOURCES}, got {entry[0]!r}")
    if reads_data and entry[0] != "procedural" and not entry[1]:
      raise ConfigError(f"{field}: source {entry[0]!r} needs its tfds_dir")
    if not (math.isfinite(entry[2]) and entry[2] > 0):
      raise ConfigError(f"{field}: the weight must be a finite number > 0, got {entry[2]} "
                        "(leave a source out to not draw from it)")


def components(data_config: DataSpec) -> list[tuple[str, DataSpec, float]]:
  """(name, the config.data of one source, weight) per source of ``config.data.mixture``
  ("<i>_<source>"), or the one of ``config.data.source`` (weight 1)."""
  if not data_config.mixture:
    return [(data_config.source, data_config, 1.0)]
  return [(f"{i}_{source}", dataclasses.replace(data_config, source=source, tfds_dir=tfds_dir,
                                                mixture=()), float(weight))
          for i, (source, tfds_dir, weight) in enumerate(data_config.mixture)]


def training_source(data_config: DataSpec, load_tokenizer: Callable[[], ChatTokenizer]
                    ) -> tuple[Any, grain.transforms.Map]:
  """(source, transform) of the training examples: ``config.data.source``'s, or a
  `MixedSource` of ``config.data.mixture`` with `IDENTITY`; with ``config.data.pack``, a
  `packed_rows.PackedRows` over either's shuffled stream, with `IDENTITY` (its lengths
  are measured here: one pass over the data without its images)."""
  if not data_config.mixture:
    source, transform = make_source(data_config), make_transform(data_config, load_tokenizer)
  else:
    source, transform = MixedSource(
        [(name, make_source(d), make_transform(d, load_tokenizer), weight)
         for name, d, weight in components(data_config)], data_config.seed), IDENTITY
  if not data_config.pack:
    return source, transform
  stream, preprocess = _packing_stream(data_config, source, transform)
  return packed_rows.PackedRows(
      stream, preprocess, row_shape(data_config), data_config.image_size,
      load_tokenizer().pad_id, skip=data_config.on_bad_record == "skip",
      num_workers=data_config.num_workers, names=getattr(source, "names", ()),
      source_key=_SOURCE_KEY, reason_key=_REASON_KEY, encode_reason=_encode_reason), IDENTITY


def _packing_stream(data_config: DataSpec, source: Any, transform: Any) -> tuple[Any, Any]:
  """(the conversations in packing order, their preprocessing): a mixture's stream, or
  the source shuffled with ``config.data.seed`` + 1."""
  if isinstance(source, MixedSource):
    return source.stream, packed_rows.PerSource(source.transforms, _SOURCE_KEY)
  return grain.MapDataset.source(source).seed(data_config.seed + 1).shuffle(), transform


def measured_lengths(data_config: DataSpec, load_tokenizer: Callable[[], ChatTokenizer]
                     ) -> list[pack.Lengths]:
  """Every conversation of one pass over the training data (source or mixture), in
  packing order, measured uncut in the chat template (images counted, not decoded); one
  that cannot be measured stops it, or under ``on_bad_record="skip"`` is left out."""
  uncut = dataclasses.replace(data_config, max_text_length=2**30, image_slots=2**10,
                              pack=False)
  source, transform = training_source(uncut, load_tokenizer)
  stream, preprocess = _packing_stream(uncut, source, transform)
  lengths, _ = packed_rows.measure(stream, preprocess, data_config.on_bad_record == "skip",
                                   data_config.num_workers)
  return [pack.Lengths(int(t), int(i)) for t, i in lengths if t >= 0]


def make_source(data_config: DataSpec, split: str = "train") -> Any:
  """The random-access source named by ``config.data.source`` (`check_data_config` has
  checked it, at start-up)."""
  if data_config.source == "procedural":
    return scenes.SceneSource(seed=data_config.seed, num_examples=data_config.num_examples,
                              image_size=data_config.image_size,
                              families=tuple(data_config.families),
                              family_weights=tuple(data_config.family_weights))
  if data_config.source == "llava":
    from tokenflex_jax.data import llava_tfds  # pylint: disable=import-outside-toplevel
    return llava_tfds.LlavaTfdsSource(data_config.tfds_dir, split)
  from tokenflex_jax.data import tfds_builder  # pylint: disable=import-outside-toplevel
  return tfds_builder.tfds_source(data_config.tfds_dir, split)


def normalize_image(image: np.ndarray) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [H, W, 3] in [-1, 1]."""
  return image.astype(np.float32) / 127.5 - 1.0


def pad_to_length(ids: Sequence[int], mask: Sequence[bool], length: int, pad_id: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """ids [n] and mask [n] (n <= length) -> (tokens int32 [length] right-padded with
  ``pad_id``, loss_mask float32 [length]: 1.0 where ``mask`` is True, 0.0 on the padding)."""
  tokens = np.full((length,), pad_id, np.int32)
  tokens[:len(ids)] = ids
  loss_mask = np.zeros((length,), np.float32)
  loss_mask[:len(mask)] = mask
  return tokens, loss_mask


@dataclasses.dataclass(frozen=True)
class Piece:
  """One conversation, unpadded: tokens [L] int32 (one image placeholder per image),
  loss_mask [L] float32 (1.0 on answer tokens) and images [n, S, S, 3] float32 in
  [-1, 1], the k-th for the k-th placeholder."""
  tokens: np.ndarray
  loss_mask: np.ndarray
  images: np.ndarray


def row_shape(data_config: DataSpec) -> pack.RowShape:
  """The text capacity and image slots of a training row: ``max_text_length`` token slots
  of which ``image_slots`` hold image placeholders (one slot: `pack.padded_shape`)."""
  return pack.RowShape(data_config.max_text_length - data_config.image_slots,
                       data_config.image_slots)


def _row_fields(shape: pack.RowShape) -> str:
  return (f"config.data.max_text_length={shape.text_capacity + shape.image_slots}, of which "
          f"config.data.image_slots={shape.image_slots} hold images")


def fit_ids(ids: Sequence[int], mask: Sequence[bool], image_id: int, shape: pack.RowShape,
            truncate: bool, name: str) -> tuple[list[int], list[bool]]:
  """A conversation's ids and mask, checked to fit an empty row of ``shape`` (at most C
  text tokens and K images), or with ``truncate`` cut to fit; cutting an image
  placeholder off, or a conversation that does not fit without ``truncate``, raises
  `ConversationError` "too long" naming ``name``."""
  is_image = np.asarray(ids, np.int64) == image_id
  images = int(is_image.sum())
  text = len(ids) - images
  if text <= shape.text_capacity and images <= shape.image_slots:
    return list(ids), list(mask)
  keep = int(np.searchsorted(np.cumsum(~is_image), shape.text_capacity, side="right"))
  cut_image = images > shape.image_slots or bool(is_image[keep:].any())
  if not truncate or cut_image:
    raise ConversationError(TOO_LONG, f"{name}: needs {text} text tokens and {images} "
                            f"image(s) but a row holds {shape.text_capacity} and "
                            f"{shape.image_slots} ({_row_fields(shape)})" + (
                                "" if not truncate else
                                " and truncation would cut an image placeholder"))
  if any(mask) and not any(mask[:keep]):
    raise ConversationError(TOO_LONG, f"{name}: truncated to the row's "
                            f"{shape.text_capacity} text tokens it keeps no answer token "
                            f"({_row_fields(shape)})")
  return list(ids[:keep]), list(mask[:keep])


class ExampleError(ConversationError):
  """A question and answer that cannot be trained on; ``reason`` is what a skipped one is
  counted as (`SkippedRecords`)."""


def encode_training_text(tokenizer: ChatTokenizer, question: str, answer: str, max_length: int,
                         image_first: bool, limit: str) -> tuple[list[int], list[bool]]:
  """Chat-formatted prompt + answer: (ids, mask) with the mask on answer tokens
  (including the end-of-sequence token); at most ``max_length`` ids (``limit`` says
  where that comes from in the error)."""
  prompt = tokenizer.prompt_ids(question, image_first)
  answer_ids = tokenizer.answer_ids(answer)
  if len(answer_ids) < 2:
    raise ExampleError("empty answer", f"empty answer for question {question!r}")
  ids = prompt + answer_ids
  if len(ids) > max_length:
    raise ExampleError("too long", f"example needs {len(ids)} tokens but {limit}: "
                       f"{question!r} -> {answer!r}")
  return ids, [False] * len(prompt) + [True] * len(answer_ids)


def pad_piece(piece: Piece, shape: pack.RowShape, pad_id: int, image_size: int
              ) -> dict[str, np.ndarray]:
  """One conversation in a row of its own (the unpacked layout): {"tokens": i32 [T],
  "loss_mask": f32 [T], "image": f32 [S, S, 3] with one image slot (zeros for a text-only
  row, whose tokens hold no placeholder), else [K, S, S, 3] (unused slots zero)}, T = C + K."""
  tokens, loss_mask = pad_to_length(piece.tokens, piece.loss_mask,
                                    shape.text_capacity + shape.image_slots, pad_id)
  image = np.zeros((shape.image_slots, image_size, image_size, 3), np.float32)
  image[:len(piece.images)] = piece.images
  return {"image": image[0] if shape.image_slots == 1 else image, "tokens": tokens,
          "loss_mask": loss_mask}


def decode_image(data: bytes, size: int) -> np.ndarray:
  """Encoded image bytes -> uint8 [size, size, 3], bicubic resize (`images.decode`: any
  mode converted to RGB; corrupt, truncated or too large images raise `ImageError`)."""
  return images.decode(data, size)


class TokenizingPreprocess(grain.transforms.Map):
  """A transform that tokenizes: ``load_tokenizer`` is a picklable zero-argument callable
  (e.g. a functools.partial of `chat.load_tokenizer`). grain pickles transforms into its
  worker processes without the tokenizer; each process loads it once, on first use.

  Subclasses make a `Piece` of an element (`piece`) and measure it without its images
  (`lengths`, for packing); `map` lays the piece out in a row of its own (`pad_piece`)."""

  def __init__(self, load_tokenizer: Callable[[], ChatTokenizer], shape: pack.RowShape,
               image_size: int):
    self._load = load_tokenizer
    self._tokenizer: ChatTokenizer | None = None
    self.shape, self.image_size = shape, image_size

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_tokenizer": None}

  @property
  def tokenizer(self) -> ChatTokenizer:
    if self._tokenizer is None:
      self._tokenizer = self._load()
    return self._tokenizer

  def piece(self, element: Mapping[str, Any]) -> Piece:
    raise NotImplementedError

  def lengths(self, element: Mapping[str, Any]) -> pack.Lengths:
    raise NotImplementedError

  def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
    return pad_piece(self.piece(element), self.shape, self.tokenizer.pad_id, self.image_size)


class QAPreprocess(TokenizingPreprocess):
  """One question and one answer about one image (the scene suite's examples); the loss
  is on the answer."""

  def __init__(self, load_tokenizer: Callable[[], ChatTokenizer], max_text_length: int,
               image_first: bool = True, image_slots: int = 1,
               image_size: int = scenes.BASE_SIZE):
    super().__init__(load_tokenizer, pack.RowShape(max_text_length - image_slots, image_slots),
                     image_size)
    self._image_first = image_first
    # The row's C text tokens and the image's placeholder.
    self._limit = f"config.data.max_text_length is {max_text_length}" + (
        f" (a row of {image_slots} image slots holds {max_text_length - image_slots + 1} "
        "with one image)" if image_slots > 1 else "")

  def _ids(self, element: Mapping[str, Any]) -> tuple[list[int], list[bool]]:
    return encode_training_text(self.tokenizer, element["question"], element["answer"],
                                self.shape.text_capacity + 1, self._image_first, self._limit)

  def piece(self, element: Mapping[str, Any]) -> Piece:
    ids, mask = self._ids(element)
    return Piece(np.asarray(ids, np.int32), np.asarray(mask, np.float32),
                 normalize_image(element["image"])[None])

  def lengths(self, element: Mapping[str, Any]) -> pack.Lengths:
    return pack.Lengths(len(self._ids(element)[0]) - 1, 1)


class ConversationPreprocess(TokenizingPreprocess):
  """A LLaVA source item (`llava_tfds.LlavaTfdsSource`'s: "images", "turns") -> a `Piece`;
  the loss is on every assistant reply. Its images are decoded and resized to
  ``image_size``, in the order its markers show them (`conversation.image_order`)."""

  def __init__(self, load_tokenizer: Callable[[], ChatTokenizer], image_size: int,
               max_text_length: int, truncate: bool = False, image_slots: int = 1):
    super().__init__(load_tokenizer, pack.RowShape(max_text_length - image_slots, image_slots),
                     image_size)
    self._truncate = truncate

  def _bad(self, element: Mapping[str, Any], e: Exception) -> MalformedRowError:
    name = f"row {element.get('row', '?')} (id {element.get('id', '?')!r})"
    source, record = element.get("source", "LLaVA conversations"), element.get("record", "?")
    return MalformedRowError(source, record, getattr(e, "reason", "bad record"),
                             f"{name}: {e}" if isinstance(e, images.ImageError) else str(e),
                             unit="record")

  def _ids(self, element: Mapping[str, Any]) -> tuple[list[int], list[bool], tuple[int, ...]]:
    name = f"row {element.get('row', '?')} (id {element.get('id', '?')!r})"
    turns = element["turns"]
    ids, mask = self.tokenizer.conversation_ids(turns)
    ids, mask = fit_ids(ids, mask, self.tokenizer.image_id, self.shape, self._truncate, name)
    order = conversation.image_order(conversation.parse_conversation(turns),
                                     len(element["images"]))
    return ids, mask, order

  def piece(self, element: Mapping[str, Any]) -> Piece:
    """A bad conversation (too long, the image token in a text) or image (corrupt,
    truncated, too large) raises `MalformedRowError` naming the element's "source" and
    "record"."""
    try:
      ids, mask, order = self._ids(element)
      decoded = []
      for n, k in enumerate(order):
        try:
          decoded.append(decode_image(element["images"][k], self.image_size))
        except images.ImageError as e:
          if len(order) == 1:
            raise
          raise images.ImageError(e.reason, f"image {n + 1} of {len(order)}: {e}") from None
    except MalformedRowError:
      raise
    except (InputError, images.ImageError) as e:
      raise self._bad(element, e) from None
    pixels = np.stack([normalize_image(d) for d in decoded]) if decoded else np.zeros(
        (0, self.image_size, self.image_size, 3), np.float32)
    return Piece(np.asarray(ids, np.int32), np.asarray(mask, np.float32), pixels)

  def lengths(self, element: Mapping[str, Any]) -> pack.Lengths:
    try:
      ids, _, order = self._ids(element)
    except MalformedRowError:
      raise
    except InputError as e:
      raise self._bad(element, e) from None
    return pack.Lengths(len(ids) - len(order), len(order))


def make_transform(data_config: Any, load_tokenizer: Callable[[], ChatTokenizer]
                   ) -> TokenizingPreprocess:
  """The preprocessing for ``config.data.source``: conversations for "llava", else the
  scene suite's single question and answer."""
  if data_config.source == "llava":
    return ConversationPreprocess(load_tokenizer, data_config.image_size,
                                  data_config.max_text_length, data_config.truncate,
                                  data_config.image_slots)
  return QAPreprocess(load_tokenizer, data_config.max_text_length, data_config.image_first,
                      data_config.image_slots, data_config.image_size)


class PatchLabelPreprocess(grain.transforms.Map):
  """Example dict -> {"image", "patch_color": i32 [g, g], "patch_object": i32 [g, g]}."""

  def __init__(self, patch_size: int):
    self._patch_size = patch_size

  def map(self, element: Mapping[str, Any]) -> dict[str, np.ndarray]:
    color, obj = scenes.patch_labels(element["color_map"], element["object_map"],
                                     self._patch_size)
    return {"image": normalize_image(element["image"]),
            "patch_color": color.astype(np.int32), "patch_object": obj.astype(np.int32)}


_SOURCE_KEY = "_source"  # int32 per example of a `MixedSource`: which source it came from


class _Tag(grain.transforms.Map):
  def __init__(self, index: int):
    self._index = index

  def map(self, element: Mapping[str, Any]) -> dict[str, Any]:
    return {**element, _SOURCE_KEY: np.int32(self._index)}


class _Identity(grain.transforms.Map):
  def map(self, element: Mapping[str, Any]) -> Mapping[str, Any]:
    return element


IDENTITY = _Identity()  # the transform of a `MixedSource`, whose examples are made already


class MixedSource:
  """Random access over a weighted mixture of sources (``config.data.mixture``): parts
  are (name, source, transform, weight); each source is shuffled (with ``seed`` + its
  index), transformed, tagged with its index and repeated, then drawn by weight
  (`grain.MapDataset.mix`: position k is a pure function of k, so a resumed run or one
  on another number of processes sees the same examples). Its length, one "epoch", is
  the positions by which every source has been drawn at least its size
  (`covering_length`: no example left out, whatever the weights); `make_iterator`
  shuffles and repeats it as any source, with `IDENTITY` as the transform, and counts
  each batch's examples per source."""

  def __init__(self, parts: Sequence[tuple[str, Any, grain.transforms.Map, float]], seed: int):
    self.names = tuple(name for name, *_ in parts)
    self.transforms = tuple(transform for _, _, transform, _ in parts)
    weights = [float(w) for *_, w in parts]
    for name, source, _, _ in parts:
      if not len(source):
        raise InputError(f"config.data.mixture: source {name} has no examples")
    self._length = covering_length([len(source) for _, source, _, _ in parts], weights)
    datasets = [grain.MapDataset.source(source).seed(seed + i).shuffle().map(_Tag(i))
                .repeat(None) for i, (_, source, _, _) in enumerate(parts)]
    # The untransformed examples, each tagged with its source (what packing measures).
    self.stream = grain.MapDataset.mix(datasets, weights)[:self._length]

  def __len__(self) -> int:
    return self._length

  def __getitem__(self, k: int) -> dict[str, Any]:
    element = self.stream[k]
    tag = element[_SOURCE_KEY]
    return {**self.transforms[int(tag)].map(element), _SOURCE_KEY: tag}


class _Key(grain.transforms.Map):
  def __init__(self, index: int):
    self._index = index

  def map(self, element: int) -> tuple[int, int]:
    return self._index, int(element)


def covering_length(lengths: Sequence[int], weights: Sequence[float]) -> int:
  """The fewest positions of `grain.MapDataset.mix` over sources of ``lengths`` (each
  >= 1) repeated, with ``weights`` (all > 0), in which each source is drawn at least its
  length times: one past the last of the sources' length-th draws."""
  total = sum(weights)
  draws = grain.MapDataset.mix([grain.MapDataset.range(sys.maxsize).map(_Key(i))
                                for i in range(len(lengths))], list(weights))
  end = 0
  for i, (length, w) in enumerate(zip(lengths, weights)):
    gap = math.ceil(total / w)  # about the positions between two draws of source i
    start = max(0, math.floor((length - len(lengths) - 1) * total / w))
    while True:  # from the first draw of source i at or after start, key = its count
      k = start
      while (found := draws[k])[0] != i:
        k += 1
      if found[1] < length or start == 0:
        break
      start = max(0, start - (found[1] - length + 2) * gap)  # past it: start earlier
    while found != (i, length - 1):
      k += 1
      found = draws[k]
    end = max(end, k + 1)
  return end


class Tally:
  """A thread-safe {name: count}, counted in the process that takes the batches (grain's
  worker processes included): ``names`` start at 0."""

  def __init__(self, names: Sequence[str] = ()):
    self.names = tuple(names)
    self._counts = collections.Counter({name: 0 for name in self.names})
    self._lock = threading.Lock()

  def add(self, names: Sequence[str]) -> None:
    with self._lock:
      self._counts.update(names)

  def counts(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)


class SourceCounts(Tally):
  """{source name: examples} this host was fed from each source of a `MixedSource`."""


class CountSources(grain.transforms.Map):
  """Batch -> the batch without its `MixedSource` tags, which it counts: a source index
  per row, or per packed row its conversations per source."""

  def __init__(self, counts: SourceCounts):
    self.counts = counts

  def map(self, element: Mapping[str, Any]) -> dict[str, Any]:
    batch = dict(element)
    tags = np.asarray(batch.pop(_SOURCE_KEY))
    if tags.ndim == 2:
      self.counts.add([name for name, n in zip(self.counts.names, tags.sum(axis=0))
                       for _ in range(int(n))])
    else:
      self.counts.add([self.counts.names[int(i)] for i in tags])
    return batch


class HostRows:
  """Index map: the k-th example of host ``index`` -> its position in the global order.

  Host p of P, local batch L = B / P: its k-th example is row p*L + k % L of global
  batch k // L. With one process this is the identity.
  """

  def __init__(self, dataset: grain.MapDataset, global_batch: int, index: int, count: int):
    self.dataset, self.global_batch = dataset, global_batch
    self.local_batch, self.index = global_batch // count, index

  def __len__(self) -> int:
    return len(self.dataset) // self.global_batch * self.local_batch

  def __getitem__(self, k: int) -> Any:
    batch, row = divmod(k, self.local_batch)
    return self.dataset[batch * self.global_batch + self.index * self.local_batch + row]


# --- Bad records (config.data.on_bad_record) --------------------------------------------

BAD_RECORD_POLICIES = ("error", "skip")
_REASON_KEY = "_bad_record_reason"  # uint8 [_REASON_BYTES] per example ([M, ...] per
                                     # packed row), only under "skip"
_REASON_BYTES = 64


def check_bad_record_policy(value: Any) -> str:
  """``config.data.on_bad_record``, validated: `ConfigError` naming it unless it is one of
  `BAD_RECORD_POLICIES`."""
  if value not in BAD_RECORD_POLICIES:
    raise ConfigError(f"config.data.on_bad_record must be 'error' (stop at a bad record) or "
                      f"'skip' (count and skip it), got {value!r}")
  return value


class SkippedRecords(Tally):
  """{reason: records} a training pipeline has skipped so far (``config.data.on_bad_record
  = "skip"``), e.g. {"unreadable image": 2}: the bad records among the examples this
  host was fed. One per run's data (`make_iterator`'s ``skipped``)."""


def _encode_reason(error: InputError | None) -> np.ndarray:
  """uint8 [_REASON_BYTES]: the error's reason in UTF-8, zero-padded; zeros for None."""
  out = np.zeros((_REASON_BYTES,), np.uint8)
  if error is not None:
    reason = str(getattr(error, "reason", "") or type(error).__name__)
    data = reason.encode("utf-8")[:_REASON_BYTES]
    out[:len(data)] = np.frombuffer(data, np.uint8)
  return out


class SkipBadRecords:
  """Random access over ``dataset`` (shuffled records, preprocessed) that skips bad ones.

  Position k holds the first good record at k, k+1, ... (cyclically over a finite
  ``dataset``; an endless one runs on into the next epoch): batches keep their size, and
  a resumed run, or one on another number of processes, sees the same batches.
  A record is bad when reading or preprocessing it raises `InputError` (the message names
  its file or build and its row or record); any other error propagates. The record at
  position k, if bad, is logged once there and its reason travels with the example
  (uint8 [64] under a private key) to `CountSkipped` in the process that takes the batch;
  `MAX_BAD_IN_A_ROW` bad records in a row, or ``records`` (the distinct records, if
  fewer), raise `InputError`.
  """

  def __init__(self, dataset: Any, records: int | None = None):
    self.dataset = dataset
    self._limit = min(len(dataset) if records is None else records, MAX_BAD_IN_A_ROW)

  def __len__(self) -> int:
    return len(self.dataset)

  def __getitem__(self, k: int) -> dict[str, Any]:
    n = len(self.dataset)
    first: InputError | None = None
    last: InputError | None = None
    for step in range(self._limit):
      try:
        example = self.dataset[(k + step) % n]
      except InputError as e:
        last = e
        if step == 0:  # Counted here only: at k + 1, ... it is counted at its own position.
          first = e
          logging.warning("skipping a bad record (config.data.on_bad_record='skip'): %s", e)
        continue
      return {**example, _REASON_KEY: _encode_reason(first)}
    raise too_many_bad(self._limit, "records", last)


class CountSkipped(grain.transforms.Map):
  """Batch -> the batch without the skip reasons (`SkipBadRecords`), which it adds to
  ``skipped``; runs in the process that consumes the batches."""

  def __init__(self, skipped: SkippedRecords):
    self.skipped = skipped

  def map(self, element: Mapping[str, Any]) -> dict[str, Any]:
    batch = dict(element)
    reasons = np.asarray(batch.pop(_REASON_KEY)).reshape(-1, _REASON_BYTES)
    found = [bytes(r).rstrip(b"\0").decode("utf-8", "replace") for r in reasons if r.any()]
    if found:
      self.skipped.add(found)
    return batch


def make_iterator(source: Any, transform: grain.transforms.Map, global_batch: int, seed: int,
                  num_workers: int = 0, start_batch: int = 0, on_bad_record: str = "error",
                  skipped: SkippedRecords | None = None,
                  sources: SourceCounts | None = None) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of host-local batches, from global batch
  ``start_batch`` on (the order does not depend on the number of processes). The source
  is shuffled anew each epoch (``seed`` + the epoch), and a batch may span two epochs:
  no example is dropped, and a source smaller than one batch repeats within it.

  ``on_bad_record`` ("error" | "skip", ``config.data.on_bad_record``): a record whose
  reading or preprocessing raises `InputError` stops the run, or is skipped
  (`SkipBadRecords`) and counted into ``skipped`` (a new `SkippedRecords` if None).
  A `MixedSource`'s examples are counted per source into ``sources``.
  """
  if global_batch % jax.process_count():
    raise ConfigError(f"config.batch_size={global_batch} is not divisible by the "
                      f"{jax.process_count()} processes")
  skip = check_bad_record_policy(on_bad_record) == "skip"
  if not len(source):
    raise InputError(f"the training data has no examples ({type(source).__name__} of length 0)")
  local_batch = global_batch // jax.process_count()
  # Repeated below the shuffle, which then draws epoch e's order with seed + e.
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat(None).map(transform)
  if skip and not isinstance(source, packed_rows.PackedRows):  # which skips for itself
    ds = grain.MapDataset.source(SkipBadRecords(ds, len(source)))
  ds = grain.MapDataset.source(HostRows(ds, global_batch, jax.process_index(),
                                        jax.process_count()))
  ds = ds[start_batch * local_batch:]
  ds = ds.batch(local_batch, drop_remainder=True)
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=1, prefetch_buffer_size=2))
  if num_workers > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
  if skip:
    it = it.map(CountSkipped(SkippedRecords() if skipped is None else skipped))
  names = getattr(source, "names", ())
  if names:
    it = it.map(CountSources(SourceCounts(names) if sources is None else sources))
  return iter(it)


def abstract_batch(example_batch: Mapping[str, np.ndarray], mesh, rules
                   ) -> tuple[dict[str, jax.ShapeDtypeStruct], dict[str, Any]]:
  """Global shapes and shardings of a batch, given one host-local batch."""
  shapes, shardings = {}, {}
  for k, v in example_batch.items():
    sh = sharding.batch_sharding(mesh, rules, v.ndim)
    shapes[k] = jax.ShapeDtypeStruct((v.shape[0] * jax.process_count(),) + v.shape[1:],
                                     v.dtype, sharding=sh)
    shardings[k] = sh
  return shapes, shardings


def abstract_train_batch(config: Any, mesh, rules
                         ) -> tuple[dict[str, jax.ShapeDtypeStruct], dict[str, Any]]:
  """`abstract_batch` of the batch a train step takes, as ``config`` describes it (no data
  is read): image [B, S, S, 3] f32 (K > 1 image slots: [B, K, S, S, 3]), tokens [B, T]
  i32, loss_mask [B, T] f32, and with ``config.data.pack`` segments [B, T] i32; B global."""
  local = config.batch_size // jax.process_count()
  size, t, k = config.data.image_size, config.data.max_text_length, config.data.image_slots
  example = {"image": np.zeros((local,) + ((k,) if k > 1 else ()) + (size, size, 3),
                               np.float32),
             "tokens": np.zeros((local, t), np.int32),
             "loss_mask": np.zeros((local, t), np.float32)}
  if config.data.pack:
    example["segments"] = np.zeros((local, t), np.int32)
  return abstract_batch(example, mesh, rules)


def to_global_batch(local: Mapping[str, np.ndarray], shardings: Mapping[str, Any]
                    ) -> dict[str, jax.Array]:
  """Host-local numpy batch -> global jax.Arrays laid out by ``shardings``."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v) for k, v in local.items()}
