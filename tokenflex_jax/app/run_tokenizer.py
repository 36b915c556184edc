"""The run's tokenizer, from ``config.tokenizer``.

A "project" tokenizer (the demo's own sentencepiece model) lives in the workdir as
``tokenizer.model``: the configured file, else one inherited from the init workdir (so
every stage shares one vocabulary), else trained on the suite's text. An LLM's own
tokenizer (kind "hf" or "sentencepiece") is read from ``config.tokenizer.path``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import jax
from absl import logging
from etils import epath

from tokenflex_jax import errors, paths
from tokenflex_jax.data import chat
from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.data.tokenizer import ensure_tokenizer
from tokenflex_jax.specs import RunSpec

TOKENIZER_FILE = "tokenizer.model"


def tokenizer_path(config: RunSpec, workdir: str) -> str:
  """The tokenizer file of ``config.tokenizer``; raises `errors.ConfigError` for an
  unknown kind, or an LLM's tokenizer without a path."""
  t = config.tokenizer
  if t.kind not in chat.KINDS:
    raise errors.ConfigError(f"config.tokenizer.kind must be one of {chat.KINDS}, "
                             f"got {t.kind!r}")
  if t.kind == "project":
    return t.path or os.path.join(workdir, TOKENIZER_FILE)
  if not t.path:
    raise errors.ConfigError(f"config.tokenizer.kind={t.kind!r} needs "
                             "config.tokenizer.path (the LLM's tokenizer.json or .model file)")
  return t.path


def loader(config: RunSpec, workdir: str) -> Callable[[], ChatTokenizer]:
  """A picklable zero-argument function that loads the run's tokenizer (grain workers
  call it on their side)."""
  t = config.tokenizer
  return functools.partial(chat.load_tokenizer, kind=t.kind, path=tokenizer_path(config, workdir),
                           template=t.template, image_token=t.image_token,
                           system_prompt=t.system_prompt)


def _inherit(config: RunSpec, path: str) -> None:
  """Copies the init workdir's project tokenizer to ``path`` (process 0 writes)."""
  for source in (config.init.checkpoint, config.init.vision_checkpoint):
    inherited = os.path.join(source, TOKENIZER_FILE) if source else ""
    if inherited and epath.Path(inherited).exists():
      if jax.process_index() == 0:
        paths.write_atomically(path, epath.Path(inherited).read_bytes())
      return


def prepare(config: RunSpec, workdir: str) -> ChatTokenizer:
  """The run's tokenizer, creating the workdir's project tokenizer if it has none."""
  t = config.tokenizer
  if t.kind != "project":
    tokenizer = loader(config, workdir)()
    logging.info("tokenizer %s (%s, template %s): %d ids", t.path, t.kind, t.template,
                 tokenizer.vocab_size)
    return tokenizer
  path = tokenizer_path(config, workdir)
  if not epath.Path(path).exists() and not t.path:
    _inherit(config, path)
  tokenizer = ensure_tokenizer(path, tuple(config.data.families))
  logging.info("tokenizer %s: %d pieces", path, tokenizer.vocab_size)
  return tokenizer
