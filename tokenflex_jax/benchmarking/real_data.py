"""The benchmark's real-data section: useful tokens/s of packed rows against padded rows,
and against the PyTorch peer trained the LLaVA way, on the same LLaVA rows.

The rows: `synthetic_llava.write_llava` (mix665k-shaped lengths scaled by ``scale``;
text-only rows; one image at most, the layout the peer reads as LLaVA-1.5 does), built
with `llava_tfds`, tokenized by the run's tokenizer. Three ways through one epoch of them:
- padded: one conversation per row, each row ``padded_length`` token slots (the paper
  config's 1024), the bench config's batch;
- packed: rows of ``text_capacity`` text tokens and K image slots, K the planner's best
  for the data (`pack.best_image_slots`), as many rows per batch as fill about the padded
  batch's positions at the largest bucket;
- peer: the PyTorch peer on the padded rows' conversations, sorted by length into
  batches (LLaVA's ``group_by_modality_length``), each padded to its longest row.
Useful tokens/s of each: the epoch's real text and visual tokens over the epoch's
estimated seconds, its batches times the mean step time of ``batches`` of them spread
evenly over the epoch (the peer's over its length-sorted batches, short to long), timed
in rounds that alternate between the three. Our steps have static shapes, so their time
hardly depends on which rows they hold; the epoch's useful share of our rows is the
planner's (`pack.figures`, what `python -m tokenflex_jax.data.packing` prints).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
import numpy as np
from absl import logging

from tokenflex_jax import model_config, sharding, specs
from tokenflex_jax.app import run_tokenizer
from tokenflex_jax.benchmarking import timing
from tokenflex_jax.data import llava_tfds, pack, pipeline, synthetic_llava
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training import compiled


@dataclasses.dataclass(frozen=True)
class RealDataOptions:
  """conversations written; their lengths x ``scale`` words (0.5: about mix665k's 280
  tokens a conversation in the bench's tokenizer); the padded row's token slots and the
  packed row's text tokens (the paper config's 1024 and its ``pack=1`` row's 1536); the
  padded rows per batch (None: the config's batch); batches timed per layout, spread
  over the epoch."""
  conversations: int = 400
  scale: float = 0.5
  padded_length: int = 1024
  text_capacity: int = 1536
  padded_rows: int | None = 4
  batches: int = 6


def useful(batch: dict[str, np.ndarray], num_tokens: int, image_id: int, pad_id: int) -> int:
  """Real text and visual tokens of a batch (tokens [B, T]): `vlm_task.useful_positions`
  in numpy."""
  tokens = np.asarray(batch["tokens"])
  images = int((tokens == image_id).sum())
  return int((tokens != pad_id).sum()) - images + images * num_tokens


def _layouts(config: RunSpec, tfds_dir: str, opts: RealDataOptions, k: int, rows: int
             ) -> dict[str, RunSpec]:
  # Truncated to fit; a conversation that would keep no answer token in a layout's row is
  # left out of that layout.
  data = dict(data__source="llava", data__tfds_dir=tfds_dir, data__mixture=(),
              data__truncate=True, data__on_bad_record="skip", data__num_workers=0)
  return {"padded": specs.replace(config, **data, data__max_text_length=opts.padded_length,
                                  data__image_slots=1, data__pack=False),
          "packed": specs.replace(config, **data, data__pack=True, data__image_slots=k,
                                  data__max_text_length=opts.text_capacity + k,
                                  batch_size=rows)}


def _peer_batches(padded: list[dict[str, np.ndarray]], pad_id: int
                  ) -> list[dict[str, np.ndarray]]:
  """The padded batches' rows sorted by length, cut into batches of the same size, each
  padded to its own longest row."""
  rows = [{key: b[key][i] for key in ("image", "tokens", "loss_mask")}
          for b in padded for i in range(b["tokens"].shape[0])]
  length = lambda row: int((row["tokens"] != pad_id).sum())
  rows.sort(key=length)
  size = padded[0]["tokens"].shape[0]
  out = []
  for start in range(0, len(rows) - size + 1, size):
    group = rows[start:start + size]
    longest = max(length(row) for row in group)
    out.append({"image": np.stack([row["image"] for row in group]),
                "tokens": np.stack([row["tokens"][:longest] for row in group]),
                "loss_mask": np.stack([row["loss_mask"][:longest] for row in group])})
  return out


def spread(total: int, count: int) -> list[int]:
  """``count`` indices spread evenly over range(total), first and last included."""
  if count >= total:
    return list(range(total))
  if count == 1:
    return [0]
  return [round(i * (total - 1) / (count - 1)) for i in range(count)]


def measure(config: RunSpec, workdir: str, rounds: int, steps_per_round: int, warmup: int,
            peer: bool, setup: Any, torch_peer: Any, opts: RealDataOptions = RealDataOptions()
            ) -> dict[str, Any]:
  """The section's figures: {"setup": ..., "buckets": {N: {"useful_share_packed",
  "useful_share_padded", "packed_vs_padded", "packed_vs_peer", ...}}}. ``setup`` and
  ``torch_peer`` are `suite.setup` and the peer's module (imported by the suite)."""
  root = os.path.join(workdir, "real_data")
  json_path = synthetic_llava.write_llava(os.path.join(root, "rows"), opts.conversations,
                                          seed=config.data.seed, multi_image_share=0.0,
                                          image_size=config.data.image_size, scale=opts.scale)
  tfds_dir = llava_tfds.build(os.path.join(root, "tfds"), json_path,
                              os.path.join(root, "rows", "images"))
  tokenizer = run_tokenizer.prepare(config, workdir)
  load_tokenizer = run_tokenizer.loader(config, workdir)
  if opts.padded_rows:
    config = specs.replace(config, batch_size=opts.padded_rows)
  counts = sorted(config.token_counts)
  largest = counts[-1]
  probe = _layouts(config, tfds_dir, opts, 1, config.batch_size)["padded"]
  lengths = pipeline.measured_lengths(probe.data, load_tokenizer)
  k = pack.best_image_slots(lengths, opts.text_capacity, counts)
  shapes = {"padded": pack.padded_shape(opts.padded_length),
            "packed": pack.RowShape(opts.text_capacity, k)}
  figures = {name: pack.figures(lengths, shape, counts, packed=name == "packed")
             for name, shape in shapes.items()}
  mesh, rules = sharding.mesh_from_config(config)
  shards = sharding.data_parallel_size(dict(mesh.shape), rules)
  padded_positions = config.batch_size * shapes["padded"].positions(largest)
  rows = shards * max(1, round(padded_positions / shapes["packed"].positions(largest) / shards))
  layouts = _layouts(config, tfds_dir, opts, k, rows)
  epoch = {name: max(1, figures[name].rows // layouts[name].batch_size) for name in layouts}
  out: dict[str, Any] = {"setup": {
      "conversations": len(lengths), "scale": opts.scale,
      "mean_text_tokens": float(np.mean([c.text_tokens for c in lengths])),
      "batches_timed": opts.batches,
      "padded": {"rows_per_batch": config.batch_size, "token_slots": opts.padded_length,
                 "epoch_batches": epoch["padded"]},
      "packed": {"rows_per_batch": rows, "text_capacity": opts.text_capacity,
                 "image_slots": k, "epoch_batches": epoch["packed"]}}}
  model = VLM(model_config.vlm_config(config, tokenizer))
  image_id, pad_id = model.config.image_token_id, model.config.pad_token_id
  runs, batches = {}, {}
  for name, spec in layouts.items():
    runs[name] = setup(spec, model, mesh, rules, load_tokenizer)
    shardings = compiled.shardings_of(dict(runs[name].task.abstract_batch))
    batches[name] = [pipeline.to_global_batch(next(runs[name].task.data_from(start)),
                                              shardings)
                     for start in spread(epoch[name], opts.batches)]
  peer_state = None
  if peer:
    device = torch_peer.device_for(jax.default_backend())
    peer_model = torch_peer.build(model.config,
                                  jax.tree.map(np.array, runs["padded"].state.params),
                                  config.loss_weighting, device)
    data = runs["padded"].task.data_from(0)
    grouped = _peer_batches([next(data) for _ in range(epoch["padded"])], pad_id)
    timed = [grouped[i] for i in spread(len(grouped), opts.batches)]
    out["setup"]["peer"] = {"epoch_batches": len(grouped)}
    peer_state = (peer_model, torch_peer.optimizer(peer_model, config.optimizer),
                  [torch_peer.torch_batch(b, device) for b in timed], grouped)
  calls = {name: 0 for name in (*layouts, "peer")}

  def step(name: str, n: int) -> float:
    """One timed step of layout ``name`` on its next timed batch: seconds."""
    i, calls[name] = calls[name], calls[name] + 1
    if name == "peer":
      peer_model, opt, timed, _ = peer_state
      return torch_peer.step_times(peer_model, opt, timed[i % len(timed)], n,
                                   config.optimizer.clip_norm, 0, 1)[0]
    run = runs[name]
    times, run.state = timing.time_steps(run.job.steps[n], run.state,
                                         batches[name][i % len(batches[name])], 1)
    return times[0]

  names = [*layouts, *(("peer",) if peer else ())]
  buckets = {}
  for n in counts:
    for name in names:
      for _ in range(warmup):
        step(name, n)
    seconds = {name: [] for name in names}
    for name in calls:
      calls[name] = 0
    for _ in range(rounds):
      for name in names:
        seconds[name] += [step(name, n) for _ in range(steps_per_round)]
    # The useful tokens of the epoch's whole batches, the ones its time counts.
    epoch_useful = {name: figures[name].useful_share[n] * epoch[name] *
                    layouts[name].batch_size * shapes[name].positions(n) for name in layouts}
    epoch_s = {name: epoch[name] * float(np.mean(seconds[name])) for name in layouts}
    rate = {name: epoch_useful[name] / epoch_s[name] for name in layouts}
    row = {"useful_share_packed": figures["packed"].useful_share[n],
           "useful_share_padded": figures["padded"].useful_share[n],
           "useful_tokens_per_s_packed": rate["packed"],
           "useful_tokens_per_s_padded": rate["padded"],
           "packed_vs_padded": rate["packed"] / rate["padded"]}
    if peer:
      grouped = peer_state[3]
      rate["peer"] = sum(useful(b, n, image_id, pad_id) for b in grouped) / (
          len(grouped) * float(np.mean(seconds["peer"])))
      row.update(useful_tokens_per_s_peer=rate["peer"],
                 packed_vs_peer=rate["packed"] / rate["peer"])
    buckets[str(n)] = row
    logging.info("real data, bucket %d: %s", n, row)
  out["buckets"] = buckets
  return out
