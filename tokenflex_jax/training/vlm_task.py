"""The VLM's training task: answer-token loss at a visual-token budget drawn per step."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp

from tokenflex_jax.data import pipeline
from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.models import flops
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.specs import RunSpec
from tokenflex_jax.training.buckets import Buckets
from tokenflex_jax.training.loss import chunked_answer_loss
from tokenflex_jax.training.steps import LossFn
from tokenflex_jax.training.trainer import Task


def useful_positions(tokens: jax.Array, num_tokens: int, image_id: int, pad_id: int
                     ) -> jax.Array:
  """The positions of a batch (tokens [B, T]) that hold real text or visual tokens at
  ``num_tokens`` per image: the non-padding text, each image placeholder replaced by its
  ``num_tokens`` (a row of K image slots pays for T + K (num_tokens - 1) positions
  whatever it holds)."""
  placeholders = jnp.sum(tokens == image_id)
  return (jnp.sum(tokens != pad_id) - placeholders + placeholders * num_tokens
          ).astype(jnp.float32)


def vlm_loss(model: VLM, weighting: str, vocab_chunk: int = 0) -> LossFn:
  """(params, batch, num_tokens) -> answer loss; batch: image [B, H, W, 3] (or
  [B, K, H, W, 3], K image slots per row) f32, tokens [B, T] i32, loss_mask [B, T] f32,
  and for packed rows segments [B, T] i32 (`VLM.__call__`). The logits are computed
  ``vocab_chunk`` vocabulary entries at a time (0: all at once; `chunked_answer_loss`).
  Its metrics add the batch's `useful_positions`."""
  def loss_fn(params, batch, num_tokens):
    variables = {"params": params}
    segments = batch.get("segments")
    hidden = model.apply(variables, batch["image"], batch["tokens"], num_tokens,
                         segments=segments, method=VLM.text_hidden)
    head = model.apply(variables, method=VLM.output_head)
    loss, aux = chunked_answer_loss(hidden, head, batch["tokens"], batch["loss_mask"],
                                    weighting, vocab_chunk, segments)
    aux["useful_positions"] = useful_positions(batch["tokens"], num_tokens,
                                               model.config.image_token_id,
                                               model.config.pad_token_id)
    return loss, aux
  return loss_fn


def vlm_task(config: RunSpec, model: VLM, mesh, rules,
             load_tokenizer: Callable[[], ChatTokenizer] | None = None,
             evaluate: Callable[[Any, int], Mapping[str, float]] | None = None) -> Task:
  """The VLM's `Task` for ``config`` (checked by `config_checks`; its buckets:
  ``config.token_counts`` drawn with ``config.token_probs``). Without ``load_tokenizer``
  the task has no data (shapes only, e.g. for an ahead-of-time compile). ``evaluate``:
  the ``(params, step) -> scalars`` the trainer runs every ``config.eval_every`` steps
  (the train binary's, from `evaluation.periodic`); None: no periodic evaluation."""
  buckets = Buckets.of(config)
  slots = config.data.image_slots
  on_bad_record = config.data.on_bad_record  # checked at the door (config_checks)
  abstract_batch, _ = pipeline.abstract_train_batch(config, mesh, rules)
  image, tokens = abstract_batch["image"], abstract_batch["tokens"]
  init_params = lambda rng: model.init(rng, jnp.zeros(image.shape, image.dtype),
                                       jnp.zeros(tokens.shape, tokens.dtype),
                                       buckets.counts[0])["params"]

  @functools.cache
  def source_and_transform():
    if load_tokenizer is None:
      raise ValueError("this VLM task was built without a tokenizer: it has no data")
    return pipeline.training_source(config.data, load_tokenizer)

  skipped = pipeline.SkippedRecords()  # over every iterator of the run (restarts too)
  sources = pipeline.SourceCounts(
      [name for name, _, _ in pipeline.components(config.data)] if config.data.mixture else ())

  def data_from(start: int):
    return pipeline.make_iterator(*source_and_transform(), config.batch_size, config.data.seed,
                                  config.data.num_workers, start_batch=start,
                                  on_bad_record=on_bad_record, skipped=skipped,
                                  sources=sources)

  return Task(evaluate=evaluate, eval_every=config.eval_every if evaluate else 0,
              microbatches=config.microbatches,
              count_per_microbatch=config.count_per_microbatch,
              skipped_records=skipped.counts,
              source_counts=sources.counts if config.data.mixture else None,
              init_params=init_params,
              loss_fn=vlm_loss(model, config.loss_weighting, config.loss_vocab_chunk),
              abstract_batch=abstract_batch, data_from=data_from, buckets=buckets,
              tokens_per_example=lambda n: config.data.max_text_length + slots * (n - 1),
              name="VLM train step",
              flops_per_step=lambda n: flops.vlm_train_flops(
                  model.config, n, config.data.max_text_length, config.batch_size,
                  {name: m > 0 for name, m in config.lr_multipliers.items()}, slots))
