"""Evaluates one set of params at several visual-token counts.

The questions come from the scene suite (``config.eval.suite = "scenes"``, the default)
or from an eval file: an MMBench TSV ("mmbench") or a VQA JSONL ("vqa") at
``config.eval.data_path`` (see `eval_files`).
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from tokenflex_jax import errors, sharding
from tokenflex_jax.data import scenes
from tokenflex_jax.data.pipeline import normalize_image
from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.data.rows import format_skipped
from tokenflex_jax.evaluation import auto_budget, benchmark_set, benchmarks, eval_files, outputs
from tokenflex_jax.evaluation.generate import encode_prompts, make_generate
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.specs import RunSpec


@dataclasses.dataclass
class EvalSet:
  """images: uint8 [M, H, W, 3]; image_index: int [N], the image of each prompt, or
  [N, K] for K image slots per prompt (-1: unused); prompts: i32 [N, P] left-padded;
  score(decoded texts) -> {family: accuracy}; families: {family:
  {"granularity", "chance"}}; examples_per_family: what the report states (the scene
  suite: per family; an eval file: its number of questions); prompt_scores(decoded
  texts) -> float [N], each prompt's own credit in [0, 1]; benchmark: the VLMEvalKit
  benchmark it reads, if any; question_families: str [N], each prompt's family (None:
  the file's one)."""
  images: np.ndarray
  image_index: np.ndarray
  prompts: np.ndarray
  score: Callable[[Sequence[str]], dict[str, float]]
  families: dict[str, dict[str, Any]]
  examples_per_family: int
  prompt_scores: Callable[[Sequence[str]], np.ndarray]
  benchmark: benchmark_set.BenchmarkSet | None = None
  question_families: np.ndarray | None = None


def scene_eval_set(config: RunSpec, tokenizer: ChatTokenizer) -> EvalSet:
  """The fixed scene-suite examples: ``examples_per_family`` of each configured family,
  scored by exact match. Seeds differ from training (``config.eval.seed``)."""
  images, questions, answers, families = [], [], [], []
  for i, family in enumerate(config.data.families):
    source = scenes.SceneSource(seed=config.eval.seed + i,
                                num_examples=config.eval.examples_per_family,
                                image_size=config.data.image_size, families=(family,))
    for j in range(len(source)):
      ex = source[j]
      images.append(ex["image"])
      questions.append(ex["question"])
      answers.append(ex["answer"])
      families.append(ex["family"])
  fams = np.array(families)

  def prompt_scores(texts: Sequence[str]) -> np.ndarray:
    return np.array([t == a for t, a in zip(texts, answers, strict=True)], np.float64)

  def score(texts: Sequence[str]) -> dict[str, float]:
    correct = prompt_scores(texts)
    return {f: float(correct[fams == f].mean()) for f in config.data.families}

  return EvalSet(np.stack(images), np.arange(len(images)),
                 encode_prompts(tokenizer, questions, config.eval.max_prompt_length,
                                config.data.image_first),
                 score, family_info(tuple(config.data.families)),
                 int(config.eval.examples_per_family), prompt_scores, question_families=fams)


def vlmeval_set(config: RunSpec, tokenizer: ChatTokenizer) -> EvalSet:
  """A VLMEvalKit benchmark TSV (`benchmark_set`): one family, the benchmark's headline
  (`benchmark_set.headline`); its full figures come with the results."""
  bench = benchmark_set.BenchmarkSet(config.eval.data_path, config.eval.benchmark, tokenizer,
                                     config.data.image_size, config.data.image_first)
  name = bench.benchmark
  prompts = np.full((len(bench.prompt_ids), config.eval.max_prompt_length),
                    tokenizer.pad_id, np.int32)
  for i, ids in enumerate(bench.prompt_ids):
    if len(ids) > prompts.shape[1]:
      raise errors.InputError(f"{config.eval.data_path}: index {bench.rows[i]['index']} needs "
                              f"{len(ids)} prompt tokens but config.eval.max_prompt_length "
                              f"is {prompts.shape[1]}")
    prompts[i, prompts.shape[1] - len(ids):] = ids
  return EvalSet(bench.images, bench.image_index, prompts,
                 lambda texts: {name: benchmark_set.headline(bench.score(texts),
                                                             len(bench.rows))},
                 {name: {"granularity": "vlmeval", "chance": float("nan")}},
                 len(bench.rows), bench.prompt_scores, bench)


def eval_file_set(config: RunSpec, tokenizer: ChatTokenizer) -> EvalSet:
  """An MMBench TSV or VQA JSONL file (``config.eval.suite``, ``config.eval.data_path``)."""
  if config.eval.suite == "vlmeval":
    return vlmeval_set(config, tokenizer)
  path, size, skip = config.eval.data_path, config.data.image_size, config.eval.skip_malformed
  if config.eval.suite == "mmbench":
    bench = eval_files.mmbench(path, size, skip)
  else:
    bench = eval_files.vqa(path, size, skip, config.eval.image_dir)
  if bench.skipped:
    logging.warning("%s: %s", path, format_skipped(bench.skipped))
  if not bench.questions:
    raise errors.InputError(f"{path}: no usable rows")
  try:
    prompts = encode_prompts(tokenizer, bench.questions, config.eval.max_prompt_length,
                             config.data.image_first)
  except errors.InputError as e:
    raise errors.InputError(f"{path}: {e}") from None
  granularity = config.eval.suite
  return EvalSet(bench.images, bench.image_index, prompts, bench.score,
                 {f: {"granularity": granularity, "chance": c} for f, c in bench.chance.items()},
                 bench.num_questions, bench.prompt_scores)


EVAL_SUITES = ("scenes", "mmbench", "vqa", "vlmeval")


def check_suite(config: RunSpec, context: str = "") -> None:
  """Raises `errors.ConfigError` unless ``config.eval.suite`` is one of `EVAL_SUITES`,
  with ``config.eval.data_path`` set for an eval file. ``context`` ends the message (why
  the run evaluates)."""
  suite = config.eval.suite
  if suite not in EVAL_SUITES:
    raise errors.ConfigError(f"config.eval.suite must be one of {EVAL_SUITES}, "
                             f"got {suite!r}{context}")
  if suite != "scenes" and not config.eval.data_path:
    raise errors.ConfigError(f"config.eval.suite={suite!r} needs config.eval.data_path, the "
                             f"{'JSONL' if suite == 'vqa' else 'TSV'} file{context}")
  if suite == "vlmeval" and (config.eval.benchmark or "") not in ("", *benchmarks.BENCHMARKS):
    raise errors.ConfigError(f"config.eval.benchmark must be one of {benchmarks.BENCHMARKS} "
                             f"or '' (the data file's name), got {config.eval.benchmark!r}")


def eval_set(config: RunSpec, tokenizer: ChatTokenizer) -> EvalSet:
  """``config.eval.suite``'s questions (`check_suite` has checked it at start-up)."""
  if config.eval.suite == "scenes":
    return scene_eval_set(config, tokenizer)
  return eval_file_set(config, tokenizer)


def family_info(names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
  by_name = {f.name: f for f in scenes.FAMILIES}
  return {n: {"granularity": by_name[n].granularity, "chance": by_name[n].chance,
              "visible_chance": scenes.visible_chance(n)} for n in names}


def prompt_buckets(prompts: np.ndarray, pad_id: int, smallest: int = 16) -> np.ndarray:
  """Each prompt's compiled length: its tokens (prompts i32 [N, P] left-padded) rounded
  up to a power of two, at least ``smallest``, at most P. [N] int."""
  lengths = np.sum(np.cumsum(prompts != pad_id, axis=1) > 0, axis=1)
  rounded = 2 ** np.ceil(np.log2(np.maximum(lengths, smallest)))
  return np.minimum(rounded.astype(np.int64), prompts.shape[1])


def slot_images(data: EvalSet, rows: np.ndarray) -> np.ndarray:
  """The images of ``rows``: [R, H, W, 3], or [R, K, H, W, 3] for an ``image_index`` of
  K slots per prompt (unused slots black)."""
  index = data.image_index[rows]
  images = data.images[np.maximum(index, 0)]
  if index.ndim == 2:
    images = np.where((index >= 0)[:, :, None, None, None], images, 0).astype(images.dtype)
  return images


@dataclasses.dataclass
class Predictor:
  """The sweep's compiled programs, compiled on first use: the ViT (`VLM.patches`, once
  per image for every count) and greedy decoding from the patches per (count, prompt
  length). compile_s: seconds spent compiling, per count (the ViT's under 0)."""
  model: VLM
  generate: Callable[..., Any]
  mesh: Any
  rules: Any
  compile_s: dict[int, float] = dataclasses.field(default_factory=dict)
  _programs: dict[Any, Any] = dataclasses.field(default_factory=dict)

  def _compiled(self, key: Any, fn: Callable[..., Any], out_ndims: tuple[int, ...],
                *args: Any) -> Any:
    if key not in self._programs:
      t0 = time.perf_counter()
      out = tuple(sharding.batch_sharding(self.mesh, self.rules, d) for d in out_ndims)
      with sharding.mesh_rules(self.mesh, self.rules):
        self._programs[key] = jax.jit(fn, out_shardings=out if len(out) > 1 else out[0]
                                      ).lower(*args).compile()
      count = key[0] if isinstance(key, tuple) else 0
      self.compile_s[count] = self.compile_s.get(count, 0.0) + time.perf_counter() - t0
    return self._programs[key]

  def patches(self, params: Any, images: jax.Array) -> jax.Array:
    """images f32 [B, H, W, 3] -> patches [B, L, C]."""
    fn = lambda p, i: self.model.apply({"params": p}, i, method=VLM.patches)
    return self._compiled("vit", fn, (images.ndim - 1,), params, images)(params, images)

  def decode(self, params: Any, prompts: jax.Array, patches: jax.Array, num_tokens: int
             ) -> tuple[jax.Array, jax.Array]:
    """prompts i32 [B, P'] left-padded -> (ids [B, max_new_tokens], confidence [B])."""
    fn = lambda p, t, x: self.generate(p, None, t, num_tokens, x)
    return self._compiled((num_tokens, prompts.shape[1]), fn, (2, 1), params, prompts,
                          patches)(params, prompts, patches)


def _predict_all(predictor: Predictor, params: Any, data: EvalSet, bs: int,
                 counts: Sequence[int], pad_id: int, mesh) -> tuple[
                     dict[int, list[list[int]]], dict[int, np.ndarray], dict[int, float]]:
  """({count: generated ids}, {count: confidence [N]}, {count: seconds}) for every
  example, in order.

  The prompts are sorted by their compiled length (`prompt_buckets`), so a batch is cut
  to its longest prompt's bucket instead of config.eval.max_prompt_length; each batch's
  images go through the ViT once for all counts (its time shared out equally). Each
  process feeds and reads back only its rows of every global batch (rows
  [p*bs/P, (p+1)*bs/P)); the hosts' predictions are gathered once at the end.
  """
  n, count, index = len(data.prompts), jax.process_count(), jax.process_index()
  local_bs = bs // count
  buckets = prompt_buckets(data.prompts, pad_id)
  order = np.argsort(buckets, kind="stable")
  padded = -(-n // bs) * bs  # The last batch is padded by repeating the last example.
  image_sh = sharding.batch_sharding(mesh, predictor.rules, data.image_index.ndim + 3)
  prompt_sh = sharding.batch_sharding(mesh, predictor.rules, 2)
  global_array = jax.make_array_from_process_local_data
  local = lambda x: np.asarray(multihost_utils.global_array_to_host_local_array(
      x, mesh, x.sharding.spec))
  # Wall time not spent compiling (programs compile on first use, inside the loop).
  clock = lambda: time.perf_counter() - sum(predictor.compile_s.values())
  outs = {c: [] for c in counts}
  confs = {c: [] for c in counts}
  seconds = dict.fromkeys(counts, 0.0)
  vit_s = 0.0
  for start in range(0, padded, bs):
    batch = order[np.minimum(np.arange(start, start + bs), n - 1)]
    rows = batch[index * local_bs:(index + 1) * local_bs]
    length = int(buckets[batch].max())
    t0 = clock()
    images = global_array(image_sh, normalize_image(slot_images(data, rows)))
    patches = jax.block_until_ready(predictor.patches(params, images))
    vit_s += clock() - t0
    shared = (clock() - t0) / len(counts)
    prompts = global_array(prompt_sh, data.prompts[rows][:, -length:])
    for c in counts:
      t0 = clock()
      out, conf = predictor.decode(params, prompts, patches, c)
      outs[c].append(local(out))
      confs[c].append(local(conf))
      seconds[c] += clock() - t0 + shared
  logging.info("eval: the ViT took %.1fs for %d images, shared by the %d counts; decoding "
               "%.1fs", vit_s, n, len(counts), sum(seconds.values()) - vit_s)
  position = np.empty(n, np.int64)
  position[order] = np.arange(n)
  ids, confidence = {}, {}
  for c in counts:
    out, conf = np.stack(outs[c]), np.stack(confs[c])  # [batches, local_bs, ...]
    if count > 1:  # [processes, batches, local_bs, ...] -> batch-major global order.
      out = np.swapaxes(np.asarray(multihost_utils.process_allgather(out)), 0, 1)
      conf = np.swapaxes(np.asarray(multihost_utils.process_allgather(conf)), 0, 1)
    out, conf = out.reshape(padded, -1)[position], conf.reshape(padded)[position]
    ids[c], confidence[c] = out.tolist(), conf
  return ids, confidence, seconds


def evaluate(model: VLM, params: Any, tokenizer: ChatTokenizer,
             config: RunSpec, mesh, rules, step: int) -> dict[str, Any]:
  """Greedy-decodes the eval set at every ``config.eval.token_counts``; returns results."""
  data = eval_set(config, tokenizer)
  n_examples, bs = len(data.prompts), config.eval.batch_size
  counts = tuple(config.eval.token_counts)
  predictor = Predictor(model, make_generate(model, config.eval.max_new_tokens,
                                             tokenizer.eos_id, tokenizer.pad_id), mesh, rules)
  t0 = time.perf_counter()
  predictions, confidence, seconds = _predict_all(predictor, params, data, bs, counts,
                                                  tokenizer.pad_id, mesh)
  sweep_s = time.perf_counter() - t0
  results, texts = {}, {}
  families = (data.question_families if data.question_families is not None
              else np.full(n_examples, next(iter(data.families))))
  for n in counts:
    texts[n] = [tokenizer.decode(p).strip() for p in predictions[n]]
    per_family = data.score(texts[n])
    results[str(n)] = {"visual_tokens": int(n), "families": per_family,
                       "average": float(np.mean(list(per_family.values()))),
                       "examples_per_s": n_examples / seconds[n]}
    if data.benchmark is not None:
      results[str(n)]["benchmark"] = data.benchmark.score(texts[n])
    logging.info("eval %d visual tokens: average %.3f (%s); %.0f examples/s; compile %.1fs",
                 n, results[str(n)]["average"],
                 ", ".join(f"{k}={v:.2f}" for k, v in per_family.items()),
                 n_examples / seconds[n], predictor.compile_s.get(n, 0.0))
  logging.info("eval sweep: %d questions x %d counts in %.1fs (%.0f questions/s, compiling "
               "%.1fs of it)", n_examples, len(counts), sweep_s,
               n_examples * len(counts) / sweep_s, sum(predictor.compile_s.values()))
  out = {"step": int(step), "suite": config.eval.suite, "eval_seed": int(config.eval.seed),
         "examples_per_family": data.examples_per_family,
         "families": data.families, "results": results,
         # Written to questions.npz beside results.json (`outputs.save`).
         "per_question": outputs.per_question(
             data.prompts, families, {n: confidence[n] for n in counts},
             {n: data.prompt_scores(texts[n]) for n in counts},
             {n: seconds[n] / n_examples for n in counts})}
  if data.benchmark is not None:  # written beside results.json by `outputs.save`
    out["benchmark"] = data.benchmark.benchmark
    out["predictions"] = {str(n): benchmark_set.predictions_tsv(data.benchmark.rows, texts[n])
                          for n in config.eval.token_counts}
  counts = sorted(set(config.token_counts) & set(config.eval.token_counts))
  if len(counts) >= 2:
    ladder = auto_budget.ladder_counts(config.eval.auto_counts, config.token_counts,
                                       config.eval.token_counts)
    out["auto_budget"] = auto_budget_results(data, texts, confidence, ladder)
    # What `predict --num_tokens=auto` does: config.eval.auto_threshold.
    out["auto_budget"]["configured"] = auto_budget.sweep(
        texts, confidence, ladder, data.score, [config.eval.auto_threshold])[0]
    out["auto_budget_ladders"] = {
        "-".join(map(str, lad)): auto_budget_results(data, texts, confidence, lad)
        for lad in auto_budget.ladders(counts)}
    credit = {c: data.prompt_scores(texts[c]) for c in counts}
    vocab, pad = model.config.llm.vocab_size, tokenizer.pad_id
    out["auto_budget_router_ladders"] = {
        "-".join(map(str, lad)): auto_budget_results(
            data, texts, auto_budget.router_confidence(
                data.prompts, vocab, confidence, credit, lad, pad),
            lad, "router: P(right here) - P(right at the next count), cross-fitted")
        for lad in auto_budget.ladders(counts)}
    # Fitted on every question here, for predict (config.eval.save_router).
    out["router"] = auto_budget.fit_router(
        data.prompts, vocab, pad, confidence, credit, texts, data.score, ladder,
        config.eval.router_tolerance,
        {"suite": config.eval.suite, "data_path": config.eval.data_path,
         "eval_seed": config.eval.seed, "step": int(step)}).to_json()
  else:
    logging.info("no automatic budget: fewer than two of the trained counts %s are among "
                 "config.eval.token_counts", tuple(config.token_counts))
  return out


def auto_budget_results(data: EvalSet, texts: dict[int, list[str]],
                        confidence: dict[int, np.ndarray], counts: Sequence[int],
                        signal: str = "mean token log-probability") -> dict[str, Any]:
  """The automatic budget escalating over ``counts`` (the trained ones), for a sweep of
  confidence thresholds, and the oracle (see `auto_budget`)."""
  curve = auto_budget.sweep(texts, confidence, counts, data.score,
                            auto_budget.default_thresholds({c: confidence[c] for c in counts}))
  best = auto_budget.oracle(texts, data.prompt_scores, counts, data.score)
  for point in curve:
    logging.info("auto budget (%s, %s), threshold %s: accuracy %.3f at %.1f visual tokens",
                 signal, "-".join(map(str, counts)), point["threshold"], point["accuracy"],
                 point["mean_visual_tokens"])
  logging.info("oracle budget: accuracy %.3f at %.1f visual tokens", best["accuracy"],
               best["mean_visual_tokens"])
  return {"counts": list(counts), "signal": signal, "curve": curve, "oracle": best}
