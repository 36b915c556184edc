"""The benchmark's real-data section: useful tokens/s of packed rows against padded rows,
and against the PyTorch peer trained the LLaVA way, on the same LLaVA rows.

The rows: `synthetic_llava.write_llava` (mix665k-shaped lengths scaled by ``scale``;
text-only rows; one image at most, the layout the peer reads as LLaVA-1.5 does), built
with `llava_tfds`, tokenized by the run's tokenizer. Per bucket, in rounds that
alternate between them, each stepping over the same ``batches`` batches again and again:
- padded: one conversation per row, each row ``padded_length`` token slots (the paper
  config's 1024, scaled), the bench config's batch;
- packed: rows of ``text_capacity`` text tokens and K image slots, K balanced to the
  data (`pack.balanced_image_slots`), as many rows per batch as fill about the padded
  batch's positions at the largest bucket;
- peer: the PyTorch peer on the padded batches' conversations, sorted by length into
  batches (LLaVA's ``group_by_modality_length``), each padded to its longest row.
Useful tokens: the real text and visual tokens of the batches stepped, over the seconds
the steps took (`vlm_task.useful_positions`).
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
  padded rows per batch (None: the config's batch); batches stepped over per layout."""
  conversations: int = 400
  scale: float = 0.5
  padded_length: int = 1024
  text_capacity: int = 1536
  padded_rows: int | None = 4
  batches: int = 2


def useful(batch: dict[str, np.ndarray], num_tokens: int, image_id: int, pad_id: int) -> int:
  """Real text and visual tokens of a batch (tokens [B, T]): `vlm_task.useful_positions`
  in numpy."""
  tokens = np.asarray(batch["tokens"])
  images = int((tokens == image_id).sum())
  return int((tokens != pad_id).sum()) - images + images * num_tokens


def _layouts(config: RunSpec, tfds_dir: str, opts: RealDataOptions, k: int, rows: int
             ) -> dict[str, RunSpec]:
  data = dict(data__source="llava", data__tfds_dir=tfds_dir, data__mixture=(),
              data__truncate=True, data__num_workers=0)
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
  for start in range(0, len(rows), size):
    group = rows[start:start + size]
    longest = max(length(row) for row in group)
    out.append({"image": np.stack([row["image"] for row in group]),
                "tokens": np.stack([row["tokens"][:longest] for row in group]),
                "loss_mask": np.stack([row["loss_mask"][:longest] for row in group])})
  return out


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
  probe = _layouts(config, tfds_dir, opts, 1, config.batch_size)["padded"]
  lengths = pipeline.measured_lengths(probe.data, load_tokenizer)
  k = pack.balanced_image_slots(lengths, opts.text_capacity)
  counts = sorted(config.token_counts)
  largest = counts[-1]
  mesh, rules = sharding.mesh_from_config(config)
  shards = sharding.data_parallel_size(dict(mesh.shape), rules)
  padded_positions = config.batch_size * (opts.padded_length + largest - 1)
  rows = shards * max(1, round(padded_positions / (opts.text_capacity + k * largest) / shards))
  layouts = _layouts(config, tfds_dir, opts, k, rows)
  out: dict[str, Any] = {"setup": {
      "conversations": len(lengths), "scale": opts.scale,
      "mean_text_tokens": float(np.mean([c.text_tokens for c in lengths])),
      "padded": {"rows_per_batch": config.batch_size, "token_slots": opts.padded_length},
      "packed": {"rows_per_batch": rows, "text_capacity": opts.text_capacity,
                 "image_slots": k}}}
  model = VLM(model_config.vlm_config(config, tokenizer))
  image_id, pad_id = model.config.image_token_id, model.config.pad_token_id
  runs, local, batches = {}, {}, {}
  for name, spec in layouts.items():
    runs[name] = setup(spec, model, mesh, rules, load_tokenizer)
    data = runs[name].task.data_from(0)
    local[name] = [next(data) for _ in range(opts.batches)]
    shardings = compiled.shardings_of(dict(runs[name].task.abstract_batch))
    batches[name] = [pipeline.to_global_batch(b, shardings) for b in local[name]]
  peer_state = None
  if peer:
    device = torch_peer.device_for(jax.default_backend())
    peer_model = torch_peer.build(model.config,
                                  jax.tree.map(np.array, runs["padded"].state.params),
                                  config.loss_weighting, device)
    grouped = _peer_batches(local["padded"], pad_id)
    peer_state = (peer_model, torch_peer.optimizer(peer_model, config.optimizer),
                  [torch_peer.torch_batch(b, device) for b in grouped], grouped)

  def ours(name: str, n: int, calls: int) -> tuple[float, int]:
    run, seconds, tokens = runs[name], 0.0, 0
    for i in range(calls):
      b = i % opts.batches
      times, run.state = timing.time_steps(run.job.steps[n], run.state, batches[name][b], 1)
      seconds, tokens = seconds + times[0], tokens + useful(local[name][b], n, image_id, pad_id)
    return seconds, tokens

  def theirs(n: int, calls: int) -> tuple[float, int]:
    peer_model, opt, batches, numpy_batches = peer_state
    seconds, tokens = 0.0, 0
    for i in range(calls):
      b = i % len(batches)
      seconds += torch_peer.step_times(peer_model, opt, batches[b], n,
                                       config.optimizer.clip_norm, 0, 1)[0]
      tokens += useful(numpy_batches[b], n, image_id, pad_id)
    return seconds, tokens

  buckets = {}
  for n in counts:
    totals = {name: [0.0, 0] for name in (*layouts, *(("peer",) if peer else ()))}
    ours("padded", n, warmup)
    ours("packed", n, warmup)
    if peer:
      theirs(n, warmup)
    for _ in range(rounds):
      for name in totals:
        s, t = ours(name, n, steps_per_round) if name != "peer" else theirs(n, steps_per_round)
        totals[name][0] += s
        totals[name][1] += t
    rate = {name: t / s for name, (s, t) in totals.items()}
    paid = lambda b, k: b["tokens"].shape[0] * (b["tokens"].shape[1] + k * (n - 1))
    share = {name: sum(useful(b, n, image_id, pad_id) for b in local[name]) / sum(
        paid(b, layouts[name].data.image_slots) for b in local[name]) for name in layouts}
    row = {"useful_share_packed": share["packed"], "useful_share_padded": share["padded"],
           "useful_tokens_per_s_packed": rate["packed"],
           "useful_tokens_per_s_padded": rate["padded"],
           "packed_vs_padded": rate["packed"] / rate["padded"]}
    if peer:
      row.update(useful_tokens_per_s_peer=rate["peer"],
                 packed_vs_peer=rate["packed"] / rate["peer"])
    buckets[str(n)] = row
    logging.info("real data, bucket %d: %s", n, row)
  out["buckets"] = buckets
  return out
