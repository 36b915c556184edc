r"""Plans a dataset's rows without a model: the useful share of each bucket's positions,
padded (one conversation per row, today's training rows) against packed (`pack`).

  python -m tokenflex_jax.data.packing --lengths=ROWS.jsonl --config=configs/paper.py \
      [--text_capacity=C] [--images_per_row=K] [--open_rows=64] [--json_out=F]
  python -m tokenflex_jax.data.packing --config=configs/paper.py \
      --config.data.tfds_dir=BUILD --config.tokenizer.path=...   # a built dataset

ROWS.jsonl: one ``{"text_tokens": int, "images": int}`` per conversation (e.g. from
``--synthetic=N``: N conversations shaped like LLaVA-1.5's mix665k, `synthetic_llava`,
written to --lengths). Without --lengths the config's training data (its source or
mixture, e.g. a LLaVA build) is measured in its chat template, as packing measures it
(`packed_rows.measure`: every conversation, images counted, not decoded). The config gives the buckets (``config.token_counts``) and the
padded row (``config.data.max_text_length``); the packed row holds C text tokens and K
image slots: by default, with ``config.data.pack``, the row training builds
(`pipeline.row_shape`), else C = ``max_text_length`` and the K with the highest mean
useful share over the buckets (`pack.best_image_slots`). Prints, per bucket,
the useful share of each layout (real text and visual tokens over all positions) and
their ratio, with conversations per row and the share truncated.
"""

from __future__ import annotations

import dataclasses
import json
import sys

from absl import app, flags

from tokenflex_jax import entry, errors
from tokenflex_jax.app import config_checks, config_schema, run_tokenizer
from tokenflex_jax.data import pack, pipeline, synthetic_llava
from tokenflex_jax.specs import RunSpec


def plan(lengths: list[pack.Lengths], counts: tuple[int, ...], max_text_length: int,
         text_capacity: int = 0, images_per_row: int = 0, open_rows: int = 64
         ) -> dict:
  """{"padded": figures, "packed": figures, "packed_shape": {...}, "buckets": {N:
  {"useful_share_padded", "useful_share_packed", "packed_vs_padded"}}} (figures:
  `pack.LayoutFigures` as a dict)."""
  capacity = text_capacity or max_text_length
  shape = pack.RowShape(capacity, images_per_row or pack.best_image_slots(lengths, capacity,
                                                                          counts, open_rows))
  padded = pack.figures(lengths, pack.padded_shape(max_text_length), counts, packed=False)
  packed = pack.figures(lengths, shape, counts, packed=True, open_rows=open_rows)
  return {"conversations": len(lengths), "padded_length": max_text_length,
          "padded": dataclasses.asdict(padded),
          "packed": dataclasses.asdict(packed), "packed_shape": dataclasses.asdict(shape),
          "buckets": {n: {"useful_share_padded": padded.useful_share[n],
                          "useful_share_packed": packed.useful_share[n],
                          "packed_vs_padded": packed.useful_share[n] / padded.useful_share[n]}
                      for n in counts}}


def measured(spec: RunSpec) -> list[pack.Lengths]:
  """The lengths of one pass over ``spec``'s training data, uncut (a row too large to
  cut anything); conversations that cannot be measured stop it, or under
  ``config.data.on_bad_record="skip"`` are left out."""
  if spec.tokenizer.kind == "project" and not spec.tokenizer.path:
    raise errors.ConfigError("config.tokenizer.path is empty: measuring the data needs the "
                             "run's tokenizer (the project's model: WORKDIR/tokenizer.model)")
  return pipeline.measured_lengths(spec.data, run_tokenizer.loader(spec, ""))


def markdown(result: dict) -> str:
  shape, padded, packed = result["packed_shape"], result["padded"], result["packed"]
  lines = [f"{result['conversations']} conversations. Padded: one per row of "
           f"{result['padded_length']} token slots, {padded['truncated_share']:.1%} truncated. Packed: {shape['text_capacity']} text "
           f"tokens and {shape['image_slots']} image slots per row, "
           f"{packed['conversations_per_row']:.2f} conversations per row, "
           f"{packed['truncated_share']:.1%} truncated.", "",
           "| visual tokens | useful share, padded | useful share, packed | packed / padded |",
           "|---|---|---|---|"]
  for n, b in result["buckets"].items():
    lines.append(f"| {n} | {b['useful_share_padded']:.3f} | {b['useful_share_packed']:.3f} | "
                 f"{b['packed_vs_padded']:.2f} |")
  return "\n".join(lines)


def main() -> None:
  config = config_schema.define_config_flag(flags.FLAGS, sys.argv)
  lengths = flags.DEFINE_string("lengths", None, "JSONL of {\"text_tokens\", \"images\"} "
                                "per conversation; none: measure the config's data.")
  synthetic = flags.DEFINE_integer("synthetic", 0, "First write this many mix665k-shaped "
                                   "conversations to --lengths (synthetic_llava).")
  capacity = flags.DEFINE_integer("text_capacity", 0, "Packed row's text tokens (0: the "
                                  "training row's with config.data.pack, else "
                                  "config.data.max_text_length).")
  images = flags.DEFINE_integer("images_per_row", 0, "Packed row's image slots (0: the "
                                "training row's with config.data.pack, else balanced to "
                                "the data).")
  open_rows = flags.DEFINE_integer("open_rows", 64, "Rows first fit keeps open.")
  json_out = flags.DEFINE_string("json_out", None, "Also write the figures here.")
  flags.mark_flags_as_required(["config"])

  def run(argv: list[str]) -> None:
    if len(argv) > 1:
      raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    for flag, value, least in (("--text_capacity", capacity.value, 0),
                               ("--images_per_row", images.value, 0),
                               ("--open_rows", open_rows.value, 1),
                               ("--synthetic", synthetic.value, 0)):
      if value < least:
        raise errors.ConfigError(f"{flag}={value} must be >= {least}")
    spec = config_schema.to_spec(config_schema.loaded(config))
    config_checks.check(spec, (config_checks.data_described, config_checks.trained_counts)
                        if lengths.value else (config_checks.data_read, config_checks.tokenizer,
                                               config_checks.trained_counts))
    if synthetic.value and not lengths.value:
      raise errors.ConfigError("--synthetic writes to --lengths: give both")
    if synthetic.value:
      synthetic_llava.write_lengths(lengths.value,
                                    synthetic_llava.mix665k_lengths(synthetic.value))
    rows = (synthetic_llava.read_lengths(lengths.value) if lengths.value else measured(spec))
    trained = pipeline.row_shape(spec.data) if spec.data.pack else pack.RowShape(0, 0)
    result = plan(rows, spec.token_counts, spec.data.max_text_length,
                  capacity.value or trained.text_capacity,
                  images.value or trained.image_slots, open_rows.value)
    print(markdown(result))
    if json_out.value:
      with open(json_out.value, "w", encoding="utf-8") as f:
        json.dump(result, f, indent=2)

  entry.run(run)


if __name__ == "__main__":
  main()
