"""Hugging Face checkpoints <-> this project's ViT and LLM parameters.

Reads a local Hugging Face model directory (``config.json`` plus ``model.safetensors``,
or shards listed in ``model.safetensors.index.json``) with the real ``safetensors``
reader, one tensor at a time, and maps it onto the parameter trees of
`models.vit.ViT` and `models.llm.LLM`:

  * vision: SigLIP vision towers (``SiglipVisionModel``, or the ``vision_model`` of a
    full ``SiglipModel``; SigLIP2's fixed-resolution checkpoints use the same layout);
  * language: Qwen2 / Qwen2.5 and Llama (grouped-query attention, optional q/k/v bias,
    tied or untied embeddings, RoPE theta).

Layout conventions. Torch ``Linear`` weights are ``[out, in]``; ours are ``[in, out]``,
with attention projections split per head: q/k/v ``[D, H, Dh]``, output ``[H, Dh, D]``.
The patch convolution is ``[C, 3, p, p]`` in torch and ``[p, p, 3, C]`` (HWIO) here.
Export applies the inverse maps, so import -> export is bit-exact.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from tokenflex_jax.models.llm import LLMConfig
from tokenflex_jax.models.vit import ViTConfig

Params = dict[str, Any]
# Receives each converted tensor (its path in the params tree, the array) and returns
# what to store: the array itself, or e.g. a sharded jax.Array made from it.
Place = Callable[[tuple[str, ...], np.ndarray], Any]
SAFETENSORS = "model.safetensors"
INDEX = "model.safetensors.index.json"


# --- Reading and writing checkpoint directories ---------------------------------------

def read_config(hf_dir: str) -> dict[str, Any]:
  path = os.path.join(hf_dir, "config.json")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: not a Hugging Face model directory")
  with open(path, encoding="utf-8") as f:
    return json.load(f)


class TensorReader:
  """Reads named tensors from a single-file or sharded safetensors checkpoint."""

  def __init__(self, hf_dir: str):
    index = os.path.join(hf_dir, INDEX)
    if os.path.exists(index):
      with open(index, encoding="utf-8") as f:
        weight_map = json.load(f)["weight_map"]
      self.files = {name: os.path.join(hf_dir, file) for name, file in weight_map.items()}
    else:
      single = os.path.join(hf_dir, SAFETENSORS)
      if not os.path.exists(single):
        raise FileNotFoundError(f"neither {SAFETENSORS} nor {INDEX} in {hf_dir}")
      with safe_open(single, framework="numpy") as f:
        self.files = {name: single for name in f.keys()}
    self.hf_dir = hf_dir

  def names(self) -> list[str]:
    return sorted(self.files)

  def __contains__(self, name: str) -> bool:
    return name in self.files

  def __call__(self, name: str) -> np.ndarray:
    if name not in self.files:
      raise KeyError(f"tensor {name!r} not in the checkpoint at {self.hf_dir}")
    with safe_open(self.files[name], framework="numpy") as f:
      return f.get_tensor(name)


def write_checkpoint(hf_dir: str, config: Mapping[str, Any],
                     tensors: Mapping[str, np.ndarray]) -> None:
  """Writes ``config.json`` and ``model.safetensors`` (one file)."""
  os.makedirs(hf_dir, exist_ok=True)
  with open(os.path.join(hf_dir, "config.json"), "w", encoding="utf-8") as f:
    json.dump(dict(config), f, indent=2)
  save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
            os.path.join(hf_dir, SAFETENSORS), metadata={"format": "pt"})


def _build(loaders: list[tuple[tuple[str, ...], Callable[[], np.ndarray]]],
           place: Place) -> Params:
  """Reads, converts and places one tensor at a time into a nested params dict."""
  params: Params = {}
  for path, load in loaders:
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = place(path, np.ascontiguousarray(load()))
  return params


# --- Layout maps (torch -> ours; each has an exact inverse) ----------------------------

def _linear(w: np.ndarray) -> np.ndarray:
  """torch Linear weight [out, in] -> kernel [in, out]."""
  return np.ascontiguousarray(w.T)


def _heads_in(w: np.ndarray, heads: int) -> np.ndarray:
  """q/k/v weight [H*Dh, D] -> [D, H, Dh]."""
  return np.ascontiguousarray(w.T.reshape(w.shape[1], heads, -1))


def _heads_out(w: np.ndarray, heads: int) -> np.ndarray:
  """output weight [D, H*Dh] -> [H, Dh, D]."""
  return np.ascontiguousarray(w.T.reshape(heads, -1, w.shape[0]))


def _unheads_in(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(k.reshape(k.shape[0], -1).T)


def _unheads_out(k: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(k.reshape(-1, k.shape[-1]).T)


# --- Vision: SigLIP --------------------------------------------------------------------

VISION_TYPES = ("siglip_vision_model", "siglip")

def vision_config_from_hf(config: Mapping[str, Any]) -> ViTConfig:
  """ViTConfig from a SigLIP ``config.json`` (a vision config or a full SigLIP one)."""
  cfg = config.get("vision_config", config)
  model_type = cfg.get("model_type", "siglip_vision_model")
  if model_type not in VISION_TYPES:
    raise ValueError(f"model_type={model_type!r} is not a supported vision tower "
                     f"{VISION_TYPES}")
  act = cfg.get("hidden_act", "gelu_pytorch_tanh")
  if act not in ("gelu_pytorch_tanh", "gelu_new"):
    raise ValueError(f"vision hidden_act={act!r}: only tanh-approximated GELU is supported")
  return ViTConfig(image_size=cfg["image_size"], patch_size=cfg["patch_size"],
                   width=cfg["hidden_size"], depth=cfg["num_hidden_layers"],
                   mlp_dim=cfg["intermediate_size"], num_heads=cfg["num_attention_heads"],
                   layer_norm_eps=cfg.get("layer_norm_eps", 1e-6))


def _vision_prefix(reader: TensorReader) -> str:
  for prefix in ("vision_model.", "model.vision_model.", ""):
    if f"{prefix}embeddings.patch_embedding.weight" in reader:
      return prefix
  raise KeyError(f"no SigLIP vision tower (embeddings.patch_embedding.weight) in "
                 f"{reader.hf_dir}")


def import_vision(hf_dir: str, place: Place = lambda path, x: x) -> tuple[ViTConfig, Params]:
  """(config, params) such that ``ViT(config).apply({"params": params}, images_nhwc)``
  equals the SigLIP tower's ``last_hidden_state`` (images in [-1, 1]).

  ``place(path, array)`` receives each converted tensor as it is read (e.g. to put it on
  devices with its sharding), so the host holds one tensor at a time.
  """
  config = vision_config_from_hf(read_config(hf_dir))
  reader = TensorReader(hf_dir)
  prefix = _vision_prefix(reader)
  get = lambda name: reader(prefix + name)
  heads = config.num_heads
  loaders: list[tuple[tuple[str, ...], Callable[[], np.ndarray]]] = [
      (("patch_embed", "kernel"),
       lambda: get("embeddings.patch_embedding.weight").transpose(2, 3, 1, 0)),
      (("patch_embed", "bias"), lambda: get("embeddings.patch_embedding.bias")),
      (("pos_embedding",), lambda: get("embeddings.position_embedding.weight")[None]),
      (("ln_final", "scale"), lambda: get("post_layernorm.weight")),
      (("ln_final", "bias"), lambda: get("post_layernorm.bias")),
  ]
  for i in range(config.depth):
    block, pre = f"block_{i}", f"encoder.layers.{i}."
    for n in ("q", "k", "v"):
      loaders += [
          ((block, n, "kernel"), lambda n=n, pre=pre: _heads_in(
              get(f"{pre}self_attn.{n}_proj.weight"), heads)),
          ((block, n, "bias"), lambda n=n, pre=pre: get(
              f"{pre}self_attn.{n}_proj.bias").reshape(heads, -1))]
    loaders += [
        ((block, "out", "kernel"), lambda pre=pre: _heads_out(
            get(f"{pre}self_attn.out_proj.weight"), heads)),
        ((block, "out", "bias"), lambda pre=pre: get(f"{pre}self_attn.out_proj.bias"))]
    for ours, theirs in (("ln_attn", "layer_norm1"), ("ln_mlp", "layer_norm2")):
      loaders += [((block, ours, "scale"), lambda t=theirs, pre=pre: get(f"{pre}{t}.weight")),
                  ((block, ours, "bias"), lambda t=theirs, pre=pre: get(f"{pre}{t}.bias"))]
    for n in ("fc1", "fc2"):
      loaders += [((block, n, "kernel"), lambda n=n, pre=pre: _linear(get(f"{pre}mlp.{n}.weight"))),
                  ((block, n, "bias"), lambda n=n, pre=pre: get(f"{pre}mlp.{n}.bias"))]
  return config, _build(loaders, place)


def export_vision(config: ViTConfig, params: Params, hf_dir: str) -> None:
  """Writes a ``SiglipVisionModel`` directory (no pooling head) from our ViT params."""
  p = lambda x: np.asarray(x)
  tensors = {
      "embeddings.patch_embedding.weight":
          p(params["patch_embed"]["kernel"]).transpose(3, 2, 0, 1),
      "embeddings.patch_embedding.bias": p(params["patch_embed"]["bias"]),
      "embeddings.position_embedding.weight": p(params["pos_embedding"])[0],
      "post_layernorm.weight": p(params["ln_final"]["scale"]),
      "post_layernorm.bias": p(params["ln_final"]["bias"]),
  }
  for i in range(config.depth):
    block, pre = params[f"block_{i}"], f"encoder.layers.{i}."
    for n in ("q", "k", "v"):
      tensors[f"{pre}self_attn.{n}_proj.weight"] = _unheads_in(p(block[n]["kernel"]))
      tensors[f"{pre}self_attn.{n}_proj.bias"] = p(block[n]["bias"]).reshape(-1)
    tensors[f"{pre}self_attn.out_proj.weight"] = _unheads_out(p(block["out"]["kernel"]))
    tensors[f"{pre}self_attn.out_proj.bias"] = p(block["out"]["bias"])
    for ours, theirs in (("ln_attn", "layer_norm1"), ("ln_mlp", "layer_norm2")):
      tensors[f"{pre}{theirs}.weight"] = p(block[ours]["scale"])
      tensors[f"{pre}{theirs}.bias"] = p(block[ours]["bias"])
    for n in ("fc1", "fc2"):
      tensors[f"{pre}mlp.{n}.weight"] = _linear(p(block[n]["kernel"]))
      tensors[f"{pre}mlp.{n}.bias"] = p(block[n]["bias"])
  hf_config = {
      "architectures": ["SiglipVisionModel"], "model_type": "siglip_vision_model",
      "image_size": config.image_size, "patch_size": config.patch_size,
      "hidden_size": config.width, "num_hidden_layers": config.depth,
      "intermediate_size": config.mlp_dim, "num_attention_heads": config.num_heads,
      "layer_norm_eps": config.layer_norm_eps, "hidden_act": "gelu_pytorch_tanh",
      "num_channels": 3, "vision_use_head": False, "torch_dtype": "float32",
  }
  write_checkpoint(hf_dir, hf_config, tensors)


# --- Language: Qwen2 / Llama -----------------------------------------------------------

LLM_TYPES = ("qwen2", "llama")


def _rope_theta(cfg: Mapping[str, Any]) -> float:
  if "rope_theta" in cfg:
    return float(cfg["rope_theta"])
  return float((cfg.get("rope_parameters") or {}).get("rope_theta", 10_000.0))


def llm_config_from_hf(config: Mapping[str, Any]) -> LLMConfig:
  """LLMConfig from a Qwen2 / Llama ``config.json`` (or a VLM's ``text_config``)."""
  cfg = config.get("text_config", config)
  model_type = cfg.get("model_type", "")
  if model_type not in LLM_TYPES:
    raise ValueError(f"model_type={model_type!r} is not one of the supported LLM families "
                     f"{LLM_TYPES}")
  scaling = cfg.get("rope_scaling") or {}
  rope_type = scaling.get("rope_type", scaling.get("type", "default"))
  if rope_type not in ("default", None):
    raise ValueError(f"rope_scaling type {rope_type!r} is not supported yet (only plain "
                     f"RoPE with rope_theta)")
  if cfg.get("hidden_act", "silu") != "silu":
    raise ValueError(f"hidden_act={cfg['hidden_act']!r}: only SwiGLU (silu) MLPs are supported")
  heads = cfg["num_attention_heads"]
  head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
  if model_type == "llama" and (cfg.get("attention_bias") or cfg.get("mlp_bias")):
    raise ValueError("Llama attention_bias/mlp_bias=True (biases on o_proj and the MLP too) "
                     "is not supported; Qwen2's q/k/v-only biases are")
  bias = model_type == "qwen2"
  return LLMConfig(vocab_size=cfg["vocab_size"], width=cfg["hidden_size"],
                   depth=cfg["num_hidden_layers"], num_heads=heads,
                   num_kv_heads=cfg.get("num_key_value_heads", heads), head_dim=head_dim,
                   mlp_dim=cfg["intermediate_size"], rope_theta=_rope_theta(cfg),
                   rms_norm_eps=cfg.get("rms_norm_eps", 1e-6), qkv_bias=bias,
                   tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _llm_prefix(reader: TensorReader) -> str:
  for prefix in ("model.", "model.language_model.", "language_model.model."):
    if f"{prefix}embed_tokens.weight" in reader:
      return prefix
  raise KeyError(f"no decoder (model.embed_tokens.weight) in {reader.hf_dir}")


def import_llm(hf_dir: str, place: Place = lambda path, x: x) -> tuple[LLMConfig, Params]:
  """(config, params) such that ``LLM(config).apply({"params": params}, token_ids)``
  equals the Hugging Face causal LM's logits. ``place`` as in `import_vision`."""
  config = llm_config_from_hf(read_config(hf_dir))
  reader = TensorReader(hf_dir)
  prefix = _llm_prefix(reader)
  get = lambda name: reader(prefix + name)
  loaders: list[tuple[tuple[str, ...], Callable[[], np.ndarray]]] = [
      (("embedding",), lambda: get("embed_tokens.weight")),
      (("final_norm", "scale"), lambda: get("norm.weight"))]
  if not config.tie_embeddings:
    head = "" if prefix == "model." else prefix.replace("model.", "", 1)
    loaders.append((("lm_head", "kernel"), lambda: _linear(reader(f"{head}lm_head.weight"))))
  for i in range(config.depth):
    layer, pre = f"layer_{i}", f"layers.{i}."
    for n, heads in (("q", config.num_heads), ("k", config.num_kv_heads),
                     ("v", config.num_kv_heads)):
      loaders.append(((layer, "attn", n, "kernel"), lambda n=n, h=heads, pre=pre: _heads_in(
          get(f"{pre}self_attn.{n}_proj.weight"), h)))
      if config.qkv_bias:
        loaders.append(((layer, "attn", n, "bias"), lambda n=n, h=heads, pre=pre: get(
            f"{pre}self_attn.{n}_proj.bias").reshape(h, -1)))
    loaders += [
        ((layer, "attn", "o", "kernel"), lambda pre=pre: _heads_out(
            get(f"{pre}self_attn.o_proj.weight"), config.num_heads)),
        ((layer, "attn_norm", "scale"), lambda pre=pre: get(f"{pre}input_layernorm.weight")),
        ((layer, "mlp_norm", "scale"),
         lambda pre=pre: get(f"{pre}post_attention_layernorm.weight"))]
    for n in ("gate", "up", "down"):
      loaders.append(((layer, "mlp", n, "kernel"),
                      lambda n=n, pre=pre: _linear(get(f"{pre}mlp.{n}_proj.weight"))))
  return config, _build(loaders, place)


def export_llm(config: LLMConfig, params: Params, hf_dir: str, model_type: str = "qwen2") -> None:
  """Writes a Qwen2 or Llama ``*ForCausalLM`` directory from our LLM params."""
  if model_type not in LLM_TYPES:
    raise ValueError(f"model_type must be one of {LLM_TYPES}, got {model_type!r}")
  if model_type == "qwen2" and not config.qkv_bias:
    raise ValueError("Qwen2 always has q/k/v biases; export a bias-free LLM as 'llama'")
  p = lambda x: np.asarray(x)
  tensors = {"model.embed_tokens.weight": p(params["embedding"]),
             "model.norm.weight": p(params["final_norm"]["scale"])}
  if not config.tie_embeddings:
    tensors["lm_head.weight"] = _linear(p(params["lm_head"]["kernel"]))
  for i in range(config.depth):
    layer, pre = params[f"layer_{i}"], f"model.layers.{i}."
    for n in ("q", "k", "v"):
      tensors[f"{pre}self_attn.{n}_proj.weight"] = _unheads_in(p(layer["attn"][n]["kernel"]))
      if config.qkv_bias:
        tensors[f"{pre}self_attn.{n}_proj.bias"] = p(layer["attn"][n]["bias"]).reshape(-1)
    tensors[f"{pre}self_attn.o_proj.weight"] = _unheads_out(p(layer["attn"]["o"]["kernel"]))
    tensors[f"{pre}input_layernorm.weight"] = p(layer["attn_norm"]["scale"])
    tensors[f"{pre}post_attention_layernorm.weight"] = p(layer["mlp_norm"]["scale"])
    for n in ("gate", "up", "down"):
      tensors[f"{pre}mlp.{n}_proj.weight"] = _linear(p(layer["mlp"][n]["kernel"]))
  hf_config = {
      "architectures": ["Qwen2ForCausalLM" if model_type == "qwen2" else "LlamaForCausalLM"],
      "model_type": model_type, "vocab_size": config.vocab_size,
      "hidden_size": config.width, "num_hidden_layers": config.depth,
      "num_attention_heads": config.num_heads, "num_key_value_heads": config.num_kv_heads,
      "head_dim": config.head_dim, "intermediate_size": config.mlp_dim,
      "rope_theta": config.rope_theta, "rms_norm_eps": config.rms_norm_eps,
      "tie_word_embeddings": config.tie_embeddings, "hidden_act": "silu",
      "max_position_embeddings": 32768, "torch_dtype": "float32",
  }
  if model_type == "llama":
    hf_config.update(attention_bias=config.qkv_bias, mlp_bias=False)
  write_checkpoint(hf_dir, hf_config, tensors)


def tree_paths(params: Params, prefix: str = "") -> Iterator[tuple[str, Any]]:
  """('a/b/kernel', leaf) for every leaf (for comparisons and logs)."""
  for k, v in params.items():
    if isinstance(v, Mapping):
      yield from tree_paths(v, f"{prefix}{k}/")
    else:
      yield f"{prefix}{k}", v

