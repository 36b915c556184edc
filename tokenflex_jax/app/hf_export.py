"""A trained TokenFLEX model as one Hugging Face folder, and that folder back as params.

The folder (`export_folder`) is what ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` and ``AutoProcessor.from_pretrained(DIR,
trust_remote_code=True)`` load offline:

  config.json                 TokenFlexConfig: vision_config, llm_config (the decoder's
                              own limits, e.g. max_position_embeddings), num_image_token,
                              visual_token_counts, the projector and rotary fields
  model.safetensors           every weight, float32 (or bfloat16), Ristretto's tensor
                              names; above 5 GiB, shards and model.safetensors.index.json
  configuration_tokenflex.py, modeling_tokenflex.py, processing_tokenflex.py
                              the model on transformers' SigLIP and Qwen2 / Llama modules
  tokenizer.json, tokenizer_config.json, chat_template.jinja
                              the run's tokenizer and its chat template
  generation_config.json      greedy, the end of turn as eos_token_id, the pad id
  preprocessor_config.json, processor_config.json
                              SigLIP's image processor; the processor's default N
  README.md                   what the folder holds and how to call it

`models.hf.import_vlm` reads the weights back.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Sequence
from typing import Any

from tokenflex_jax import hf_remote, paths
from tokenflex_jax.data import tokenizer_export
from tokenflex_jax.data.chat import ChatTokenizer
from tokenflex_jax.models import hf
from tokenflex_jax.models.vlm import VLMConfig

REMOTE_FILES = ("configuration_tokenflex.py", "modeling_tokenflex.py",
                "processing_tokenflex.py")
MODEL_CLASS = "modeling_tokenflex.TokenFlexForConditionalGeneration"
AUTO_MAP = {"AutoConfig": "configuration_tokenflex.TokenFlexConfig",
            "AutoModel": MODEL_CLASS, "AutoModelForCausalLM": MODEL_CLASS,
            "AutoModelForImageTextToText": MODEL_CLASS}
PROCESSOR_CLASS = "processing_tokenflex.TokenFlexProcessor"


def export_folder(config: VLMConfig, params: Any, tokenizer: ChatTokenizer, out_dir: str,
                  llm_type: str, counts: Sequence[int], max_new_tokens: int,
                  dtype: str = "float32", shard_bytes: int = hf.SHARD_BYTES) -> None:
  """Writes the folder (module docstring) for ``params`` (host arrays {"vit",
  "projector", "llm"}) of a model of ``config`` trained at ``counts`` visual tokens (the
  largest is the default); ``llm_type`` "qwen2" or "llama"; the weights in ``dtype``
  ("float32": bit-exact; "bfloat16": half the bytes), in files of at most ``shard_bytes``
  (`hf.write_checkpoint`)."""
  os.makedirs(out_dir, exist_ok=True)
  files = tokenizer_export.write(tokenizer, out_dir)
  hf_config, tensors = hf.vlm_tensors(config, params, llm_type)
  default = max(counts)
  hf_config.update(auto_map=AUTO_MAP, image_token=files.image_token,
                   num_image_token=default, visual_token_counts=sorted(counts),
                   template=files.template_name)
  hf.write_checkpoint(out_dir, hf_config, tensors, dtype, shard_bytes)
  for name in REMOTE_FILES:
    shutil.copyfile(os.path.join(os.path.dirname(hf_remote.__file__), name),
                    os.path.join(out_dir, name))
  paths.write_json(os.path.join(out_dir, "generation_config.json"), {
      "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id,
      **({"bos_token_id": tokenizer.bos_id} if tokenizer.bos_id is not None else {}),
      "do_sample": False, "max_new_tokens": max_new_tokens})
  size = config.vit.image_size
  paths.write_json(os.path.join(out_dir, "preprocessor_config.json"), {
      "image_processor_type": "SiglipImageProcessor", "processor_class": "TokenFlexProcessor",
      "do_resize": True, "size": {"height": size, "width": size}, "resample": 3,
      "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
      "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True})
  paths.write_json(os.path.join(out_dir, "processor_config.json"), {
      "processor_class": "TokenFlexProcessor", "auto_map": {"AutoProcessor": PROCESSOR_CLASS},
      "num_visual_tokens": default, "image_token": files.image_token})
  with open(os.path.join(out_dir, "chat_template.jinja"), "w", encoding="utf-8") as f:
    f.write(files.chat_template)
  with open(os.path.join(out_dir, "README.md"), "w", encoding="utf-8") as f:
    f.write(model_card(config, counts, files.image_token))


def model_card(config: VLMConfig, counts: Sequence[int], image_token: str) -> str:
  """The folder's README: what it holds and the calls that use it."""
  return f"""# A TokenFLEX model exported by tokenflex_jax

SigLIP tower ({config.vit.depth} layers, {config.vit.image_size} px), the token-adaptive
projector ({config.projector.pooling}, {config.projector.mlp}) and a decoder of
{config.llm.depth} layers. Trained at {sorted(counts)} visual tokens per image; any
square count runs.

```python
from transformers import AutoModelForCausalLM, AutoProcessor
model = AutoModelForCausalLM.from_pretrained(DIR, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(DIR, trust_remote_code=True)
prompt = processor.apply_chat_template(
    [{{"role": "user", "content": "{image_token}What is shown?"}}], add_generation_prompt=True)
inputs = processor(images=[image], text=[prompt], num_visual_tokens={max(counts)})
out = model.generate(**inputs)
print(processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
```
"""
