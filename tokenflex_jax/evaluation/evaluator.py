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
from tokenflex_jax.evaluation import auto_budget, eval_files
from tokenflex_jax.evaluation.generate import encode_prompts, make_generate
from tokenflex_jax.models.vlm import VLM
from tokenflex_jax.specs import RunSpec


@dataclasses.dataclass
class EvalSet:
  """images: uint8 [M, H, W, 3]; image_index: int [N], the image of each prompt; prompts:
  i32 [N, P] left-padded; score(decoded texts) -> {family: accuracy}; families: {family:
  {"granularity", "chance"}}; examples_per_family: what the report states (the scene
  suite: per family; an eval file: its number of questions); prompt_scores(decoded
  texts) -> float [N], each prompt's own credit in [0, 1]."""
  images: np.ndarray
  image_index: np.ndarray
  prompts: np.ndarray
  score: Callable[[Sequence[str]], dict[str, float]]
  families: dict[str, dict[str, Any]]
  examples_per_family: int
  prompt_scores: Callable[[Sequence[str]], np.ndarray]


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
                 int(config.eval.examples_per_family), prompt_scores)


def eval_file_set(config: RunSpec, tokenizer: ChatTokenizer) -> EvalSet:
  """An MMBench TSV or VQA JSONL file (``config.eval.suite``, ``config.eval.data_path``)."""
  path, size, skip = config.eval.data_path, config.data.image_size, config.eval.skip_malformed
  if config.eval.suite == "mmbench":
    bench = eval_files.mmbench(path, size, skip)
  else:
    bench = eval_files.vqa(path, size, skip, config.eval.image_dir)
  if bench.skipped:
    logging.warning("%s: %s", path, format_skipped(bench.skipped))
  if not bench.questions:
    raise ValueError(f"{path}: no usable rows")
  granularity = config.eval.suite
  return EvalSet(bench.images, bench.image_index,
                 encode_prompts(tokenizer, bench.questions, config.eval.max_prompt_length,
                                config.data.image_first),
                 bench.score,
                 {f: {"granularity": granularity, "chance": c} for f, c in bench.chance.items()},
                 bench.num_questions, bench.prompt_scores)


EVAL_SUITES = ("scenes", "mmbench", "vqa")


def check_suite(config: RunSpec, context: str = "") -> None:
  """Raises `errors.ConfigError` unless ``config.eval.suite`` is one of `EVAL_SUITES`,
  with ``config.eval.data_path`` set for an eval file. ``context`` ends the message (why
  the run evaluates)."""
  suite = config.eval.suite
  if suite not in EVAL_SUITES:
    raise errors.ConfigError(f"config.eval.suite must be 'scenes', 'mmbench' or 'vqa', "
                             f"got {suite!r}{context}")
  if suite != "scenes" and not config.eval.data_path:
    raise errors.ConfigError(f"config.eval.suite={suite!r} needs config.eval.data_path, the "
                             f"{'TSV' if suite == 'mmbench' else 'JSONL'} file{context}")


def eval_set(config: RunSpec, tokenizer: ChatTokenizer) -> EvalSet:
  """``config.eval.suite``'s questions (`check_suite` has checked it at start-up)."""
  if config.eval.suite == "scenes":
    return scene_eval_set(config, tokenizer)
  return eval_file_set(config, tokenizer)


def family_info(names: tuple[str, ...]) -> dict[str, dict[str, Any]]:
  by_name = {f.name: f for f in scenes.FAMILIES}
  return {n: {"granularity": by_name[n].granularity, "chance": by_name[n].chance} for n in names}


def _predict_all(compiled: Any, params: Any, data: EvalSet, bs: int, image_sh, prompt_sh,
                 mesh) -> tuple[list[list[int]], np.ndarray]:
  """(generated ids, confidence [N]) for every example, in order.

  Each process feeds and reads back only its rows of every global batch (rows
  [p*bs/P, (p+1)*bs/P)); the hosts' predictions are gathered once at the end.
  """
  n, count, index = len(data.prompts), jax.process_count(), jax.process_index()
  local_bs = bs // count
  padded = -(-n // bs) * bs  # The last batch is padded by repeating the last example.
  rows_of = lambda start: np.minimum(np.arange(start, start + local_bs), n - 1)
  local_out, local_conf = [], []
  for start in range(index * local_bs, padded, bs):
    rows = rows_of(start)
    images = normalize_image(data.images[data.image_index[rows]])
    out, conf = compiled(params, jax.make_array_from_process_local_data(image_sh, images),
                         jax.make_array_from_process_local_data(prompt_sh, data.prompts[rows]))
    local_out.append(np.asarray(
        multihost_utils.global_array_to_host_local_array(out, mesh, prompt_sh.spec)))
    local_conf.append(np.asarray(
        multihost_utils.global_array_to_host_local_array(conf, mesh, conf.sharding.spec)))
  local_out = np.stack(local_out)  # [batches, local_bs, T]
  local_conf = np.stack(local_conf)  # [batches, local_bs]
  if count > 1:  # [processes, batches, local_bs, ...] -> batch-major global order.
    local_out = np.swapaxes(np.asarray(multihost_utils.process_allgather(local_out)), 0, 1)
    local_conf = np.swapaxes(np.asarray(multihost_utils.process_allgather(local_conf)), 0, 1)
  return local_out.reshape(padded, -1)[:n].tolist(), local_conf.reshape(padded)[:n]


def evaluate(model: VLM, params: Any, tokenizer: ChatTokenizer,
             config: RunSpec, mesh, rules, step: int) -> dict[str, Any]:
  """Greedy-decodes the eval set at every ``config.eval.token_counts``; returns results."""
  data = eval_set(config, tokenizer)
  n_examples, bs = len(data.prompts), config.eval.batch_size
  generate = make_generate(model, config.eval.max_new_tokens, tokenizer.eos_id, tokenizer.pad_id)
  image_sh = sharding.batch_sharding(mesh, rules, 4)
  prompt_sh = sharding.batch_sharding(mesh, rules, 2)
  conf_sh = sharding.batch_sharding(mesh, rules, 1)
  results, texts, confidence = {}, {}, {}
  for n in config.eval.token_counts:
    fn = jax.jit(lambda p, i, t, n=n: generate(p, i, t, n), out_shardings=(prompt_sh, conf_sh))
    with sharding.mesh_rules(mesh, rules):
      t0 = time.perf_counter()
      compiled = fn.lower(params, jax.ShapeDtypeStruct((bs,) + data.images.shape[1:],
                                                       np.float32, sharding=image_sh),
                          jax.ShapeDtypeStruct((bs, data.prompts.shape[1]), np.int32,
                                               sharding=prompt_sh)).compile()
      compile_s = time.perf_counter() - t0
      t0 = time.perf_counter()
      predictions, confidence[n] = _predict_all(compiled, params, data, bs, image_sh,
                                                prompt_sh, mesh)
      seconds = time.perf_counter() - t0
    texts[n] = [tokenizer.decode(p).strip() for p in predictions]
    per_family = data.score(texts[n])
    results[str(n)] = {"visual_tokens": int(n), "families": per_family,
                       "average": float(np.mean(list(per_family.values()))),
                       "examples_per_s": n_examples / seconds}
    logging.info("eval %d visual tokens: average %.3f (%s); %.0f examples/s; compile %.1fs",
                 n, results[str(n)]["average"],
                 ", ".join(f"{k}={v:.2f}" for k, v in per_family.items()),
                 n_examples / seconds, compile_s)
  out = {"step": int(step), "suite": config.eval.suite,
         "examples_per_family": data.examples_per_family,
         "families": data.families, "results": results}
  counts = sorted(set(config.token_counts) & set(config.eval.token_counts))
  if len(counts) >= 2:
    ladder = auto_budget.ladder_counts(config.eval.auto_counts, config.token_counts,
                                       config.eval.token_counts)
    out["auto_budget"] = auto_budget_results(data, texts, confidence, ladder)
    out["auto_budget_ladders"] = {
        "-".join(map(str, lad)): auto_budget_results(data, texts, confidence, lad)
        for lad in auto_budget.ladders(counts)}
    credit = {c: data.prompt_scores(texts[c]) for c in counts}
    out["auto_budget_router_ladders"] = {
        "-".join(map(str, lad)): auto_budget_results(
            data, texts, auto_budget.router_confidence(
                data.prompts, model.config.llm.vocab_size, confidence, credit, lad),
            lad, "router: P(right here) - P(right at the next count), cross-fitted")
        for lad in auto_budget.ladders(counts)}
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
