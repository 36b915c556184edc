"""An LLM's sentencepiece ``.model`` behind `chat.ChatTokenizer`, in its chat template.

Two templates, chosen by name (texts shown as ``{...}``, texts trimmed):

* "llama2": ``<s>[INST] {text} [/INST] {reply} </s>`` per exchange; "[INST]" and
  "[/INST]" are encoded as text (they are not pieces of Llama 2's vocabulary).
* "gemma": ``<bos>`` then per turn ``<start_of_turn>{role}\\n{text}<end_of_turn>\\n`` with
  the roles "user" and "model"; the two turn markers must be single pieces.

Every text is encoded on its own and the ids are joined (`conversation.format_ids`), as
LLaVA's training code does, so a model that adds a dummy-prefix space gives each text
its leading "▁". Meta's reference tokenizes ``[/INST] {reply} </s>`` with a space piece
before ``</s>``; this leaves it out.
"""

from __future__ import annotations

from tokenflex_jax.data.chat_base import IdTemplateTokenizer, SpecialIds
from tokenflex_jax.data.conversation import IdTemplate
from tokenflex_jax.errors import ConfigError, InputError

TEMPLATES = ("llama2", "gemma")
LLAMA2_OPEN, LLAMA2_CLOSE = "[INST]", "[/INST]"
GEMMA_START, GEMMA_END = "<start_of_turn>", "<end_of_turn>"


class SentencePieceChatTokenizer(IdTemplateTokenizer):
  """A sentencepiece model (Llama 2 or Gemma style) plus its chat template.

  ``image_token`` must be a single piece of the model (e.g. a user-defined symbol
  "<image>"). A model without a pad piece pads with its unk id (never with eos, which
  the loss mask must see). ``eos_id`` is the template's end of turn (llama2: </s>;
  gemma: <end_of_turn>).
  """

  def __init__(self, model_path: str, template: str = "llama2", image_token: str = "<image>"):
    if template not in TEMPLATES:
      raise ConfigError(f"unknown chat template {template!r} for a sentencepiece tokenizer "
                       f"(config.tokenizer.template); expected one of {TEMPLATES}")
    sp = self._load(model_path, "sentencepiece model")
    self.template, self.image_token = template, image_token
    if sp.bos_id() < 0 or sp.eos_id() < 0:
      raise InputError(f"{model_path} has no bos or eos piece")
    image_id = self._piece_id(image_token, "the image placeholder")
    pad_id = sp.pad_id() if sp.pad_id() >= 0 else sp.unk_id()
    specials = {image_id}
    if template == "llama2":
      chat_template = IdTemplate(
          begin=(), user_open=(sp.bos_id(), *self.encode(LLAMA2_OPEN)),
          user_close=tuple(self.encode(LLAMA2_CLOSE)), assistant_open=(),
          end_of_turn=sp.eos_id(), assistant_close=(), trim=True)
    else:
      start = self._piece_id(GEMMA_START, "the gemma template's turn start")
      end = self._piece_id(GEMMA_END, "the gemma template's end of turn")
      specials |= {start, end}
      newline = tuple(self.encode("\n"))
      chat_template = IdTemplate(
          begin=(sp.bos_id(),), user_open=(start, *self.encode("user\n")),
          user_close=(end, *newline), assistant_open=(start, *self.encode("model\n")),
          end_of_turn=end, assistant_close=newline, trim=True)
    eos_id = chat_template.end_of_turn
    special = SpecialIds(vocab_size=sp.get_piece_size(), pad=pad_id, bos=sp.bos_id(),
                         eos=eos_id, image=image_id, stop=frozenset({eos_id, sp.eos_id()}),
                         drop=frozenset(specials | {pad_id, sp.bos_id()}))
    super().__init__({"model_path": model_path, "template": template,
                      "image_token": image_token}, chat_template, special)

  def _piece_id(self, piece: str, what: str) -> int:
    """The id of ``piece``; ValueError naming the file when it is not a single piece."""
    i = self._sp.piece_to_id(piece)
    if i == self._sp.unk_id() or self._sp.id_to_piece(i) != piece:
      raise InputError(f"{self.model_path} has no piece {piece!r} ({what}); it must be a "
                       "single piece of the model, e.g. a user-defined symbol")
    return i
