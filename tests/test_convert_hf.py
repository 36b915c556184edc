"""Hugging Face import/export against the real transformers models (tiny, random, local).

transformers and torch (CPU) are test-only dependencies (requirements-hf.txt);
HF_HUB_OFFLINE=1: the models are built from configs and saved locally, nothing is
downloaded.
"""

import dataclasses
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
import transformers  # pylint: disable=wrong-import-position
from safetensors.numpy import load_file  # pylint: disable=wrong-import-position

from tokenflex_jax.models import hf  # pylint: disable=wrong-import-position
from tokenflex_jax.models.llm import LLM, LLMConfig  # pylint: disable=wrong-import-position
from tokenflex_jax.models.vit import ViT  # pylint: disable=wrong-import-position

RTOL = 1e-4


def relative_error(ours, ref) -> float:
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))


def _randomise(model: torch.nn.Module, seed: int) -> None:
  """Random weights everywhere, biases and norms included (HF inits those to 0/1)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _save(model, path):
  model.save_pretrained(path)
  assert os.path.exists(os.path.join(path, "config.json"))
  return str(path)


def _assert_tensors_equal(original, exported, not_ours=()):
  """Every tensor of ``original`` comes back bit-exact from the export, except those
  whose names start with ``not_ours`` (parts we do not import, e.g. a pooling head)."""
  a = load_file(os.path.join(original, hf.SAFETENSORS))
  b = load_file(os.path.join(exported, hf.SAFETENSORS))
  assert sorted(b) == sorted(n for n in a if not n.startswith(not_ours or ("\0",)))
  for name in b:
    np.testing.assert_array_equal(a[name], b[name], err_msg=name)


# --- Vision ---------------------------------------------------------------------------

def siglip(tmp_path):
  config = transformers.SiglipVisionConfig(
      image_size=32, patch_size=4, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, layer_norm_eps=1e-6, attn_implementation="eager")
  model = transformers.SiglipVisionModel(config).eval()
  _randomise(model, 0)
  return model, _save(model, tmp_path / "siglip")


def test_siglip_vision_parity_and_round_trip(tmp_path):
  model, path = siglip(tmp_path)
  images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state
  config, params = hf.import_vision(path)
  assert (config.width, config.depth, config.num_heads, config.patch_size) == (48, 2, 4, 4)
  ours = ViT(config).apply({"params": params}, images)
  assert ours.shape == (2, 64, 48)
  assert relative_error(ours, ref.numpy()) < RTOL

  exported = str(tmp_path / "exported")
  hf.export_vision(config, params, exported)
  _assert_tensors_equal(path, exported, not_ours=("head.",))  # bit-exact round trip
  again = transformers.SiglipVisionModel.from_pretrained(
      exported, attn_implementation="eager").eval()
  with torch.no_grad():
    out = again(pixel_values=torch.from_numpy(images.transpose(0, 3, 1, 2))).last_hidden_state
  np.testing.assert_array_equal(out.numpy(), ref.numpy())


def siglip2(tmp_path):
  """A NaFlex SigLIP2 tower: 64 position-table entries (an 8 x 8 grid) of 4 px patches."""
  config = transformers.Siglip2VisionConfig(
      num_patches=64, patch_size=4, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=4, layer_norm_eps=1e-6, attn_implementation="eager")
  model = transformers.Siglip2VisionModel(config).eval()
  _randomise(model, 6)
  return model, _save(model, tmp_path / "siglip2")


def siglip2_inputs(images: np.ndarray, patch: int) -> dict[str, torch.Tensor]:
  """What ``Siglip2VisionModel`` takes for full square images [B, H, W, 3] (NHWC).

  pixel_values [B, L, p*p*3]: patches in row-major grid order, each flattened (row,
  column, channel) as the image processor's ``convert_image_to_patches``; no padding, so
  pixel_attention_mask [B, L] is all ones and spatial_shapes [B, 2] is the grid.
  """
  b, h, w, c = images.shape
  gh, gw = h // patch, w // patch
  patches = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
  return {"pixel_values": torch.from_numpy(patches.reshape(b, gh * gw, -1).copy()),
          "pixel_attention_mask": torch.ones((b, gh * gw), dtype=torch.int32),
          "spatial_shapes": torch.tensor([[gh, gw]] * b, dtype=torch.long)}


def test_siglip2_vision_parity_and_round_trip(tmp_path):
  model, path = siglip2(tmp_path)
  images = np.random.default_rng(7).uniform(-1, 1, (2, 32, 32, 3)).astype(np.float32)
  with torch.no_grad():
    ref = model(**siglip2_inputs(images, 4)).last_hidden_state.numpy()
  config, params = hf.import_vision(path)
  # image_size = sqrt(num_patches) * patch_size: the grid of the position table.
  assert (config.image_size, config.patch_size, config.grid_side) == (32, 4, 8)
  assert (config.width, config.depth, config.num_heads) == (48, 2, 4)
  ours = ViT(config).apply({"params": params}, images)
  assert ours.shape == (2, 64, 48)
  assert relative_error(ours, ref) < RTOL

  exported = str(tmp_path / "exported")
  hf.export_vision(config, params, exported, model_type="siglip2_vision_model")
  _assert_tensors_equal(path, exported, not_ours=("head.",))  # bit-exact round trip
  again = transformers.Siglip2VisionModel.from_pretrained(
      exported, attn_implementation="eager").eval()
  with torch.no_grad():
    out = again(**siglip2_inputs(images, 4)).last_hidden_state.numpy()
  np.testing.assert_array_equal(out, ref)


@pytest.mark.parametrize("image_size", [24, 44])  # 6 x 6 (antialiased) and 11 x 11 grids
def test_siglip2_import_resizes_the_position_table_for_another_grid(tmp_path, image_size):
  model, path = siglip2(tmp_path)
  images = np.random.default_rng(8).uniform(-1, 1, (1, image_size, image_size, 3))
  images = images.astype(np.float32)
  with torch.no_grad():
    ref = model(**siglip2_inputs(images, 4)).last_hidden_state.numpy()
  config, params = hf.import_vision(path, image_size=image_size)
  side = image_size // 4
  assert config.image_size == image_size
  assert params["pos_embedding"].shape == (1, side * side, 48)
  table = model.embeddings.position_embedding.weight.detach().reshape(8, 8, 48)
  resized = model.embeddings.resize_positional_embeddings(
      table, torch.tensor([[side, side]]), side * side)[0].numpy()
  assert relative_error(params["pos_embedding"][0], resized) < 1e-6
  ours = ViT(config).apply({"params": params}, images)
  assert relative_error(ours, ref) < RTOL


def test_vision_config_of_a_full_siglip2_model_and_its_errors():
  vision = {"model_type": "siglip2_vision_model", "num_patches": 256, "patch_size": 16,
            "hidden_size": 64, "num_hidden_layers": 1, "intermediate_size": 128,
            "num_attention_heads": 2}
  config = hf.vision_config_from_hf({"model_type": "siglip2", "vision_config": vision})
  assert (config.image_size, config.grid_side) == (256, 16)
  with pytest.raises(ValueError, match="config.json: vision num_patches=200"):
    hf.vision_config_from_hf(dict(vision, num_patches=200))
  with pytest.raises(ValueError, match="config.json: vision hidden_act='relu'"):
    hf.vision_config_from_hf(dict(vision, hidden_act="relu"))
  siglip_v1 = dict(vision, model_type="siglip_vision_model", image_size=224)
  with pytest.raises(ValueError, match="SigLIP2 only"):
    hf.vision_config_from_hf(siglip_v1, image_size=256)


def test_vision_import_rejects_a_language_model(tmp_path):
  _, path = qwen2(tmp_path, tied=True)
  with pytest.raises(ValueError, match="model_type='qwen2' is not a supported vision tower"):
    hf.import_vision(path)


# --- Language -------------------------------------------------------------------------

def qwen2(tmp_path, tied):
  config = transformers.Qwen2Config(
      vocab_size=96, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
      num_attention_heads=4, num_key_value_heads=2, rope_theta=1_000_000.0,
      rms_norm_eps=1e-6, tie_word_embeddings=tied, attn_implementation="eager")
  model = transformers.Qwen2ForCausalLM(config).eval()
  _randomise(model, 1)
  return model, _save(model, tmp_path / f"qwen2_tied{tied}")


def llama(tmp_path, bias):
  config = transformers.LlamaConfig(
      vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=6, num_key_value_heads=2, rope_theta=500_000.0, rms_norm_eps=1e-5,
      attention_bias=bias, tie_word_embeddings=False, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(config).eval()
  _randomise(model, 2)
  return model, _save(model, tmp_path / f"llama_bias{bias}")


@pytest.mark.parametrize("family, variant", [("qwen2", True), ("qwen2", False),
                                             ("llama", False)])
def test_llm_parity_and_round_trip(tmp_path, family, variant):
  model, path = (qwen2(tmp_path, tied=variant) if family == "qwen2"
                 else llama(tmp_path, bias=variant))
  vocab = model.config.vocab_size
  tokens = np.random.default_rng(3).integers(0, vocab, (2, 11)).astype(np.int32)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  config, params = hf.import_llm(path)
  assert config.num_kv_heads < config.num_heads  # grouped-query attention
  assert config.qkv_bias == (family == "qwen2")
  assert config.tie_embeddings == (family == "qwen2" and variant)
  ours = LLM(config).apply({"params": params}, tokens)
  assert ours.shape == (2, 11, vocab)
  assert relative_error(ours, ref) < RTOL

  exported = str(tmp_path / "exported")
  hf.export_llm(config, params, exported, model_type=family)
  _assert_tensors_equal(path, exported)
  cls = transformers.Qwen2ForCausalLM if family == "qwen2" else transformers.LlamaForCausalLM
  again = cls.from_pretrained(exported, attn_implementation="eager").eval()
  with torch.no_grad():
    out = again(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_array_equal(out, ref)


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 128}


def scaled_llama(tmp_path, rope_scaling):
  """Head dim 8, theta 1e4: wavelengths 6.3, 63, 628 and 6283 positions, so llama3's
  bands (kept below 128 / 4 = 32, scaled above 128, blended between) all occur."""
  config = transformers.LlamaConfig(
      vocab_size=80, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
      num_attention_heads=6, num_key_value_heads=2, rope_theta=10_000.0, rms_norm_eps=1e-5,
      rope_scaling=dict(rope_scaling), tie_word_embeddings=False, attn_implementation="eager")
  model = transformers.LlamaForCausalLM(config).eval()
  _randomise(model, 9)
  return model, _save(model, tmp_path / f"llama_{rope_scaling['rope_type']}")


@pytest.mark.parametrize("rope_scaling", [LLAMA3_SCALING, {"rope_type": "linear", "factor": 4.0}],
                         ids=["llama3", "linear"])
def test_llm_rope_scaling_parity_and_round_trip(tmp_path, rope_scaling):
  model, path = scaled_llama(tmp_path, rope_scaling)
  # 160 positions: past the 128-position original context, and long enough that the
  # scaled frequencies' angles differ from plain RoPE's by radians.
  tokens = np.random.default_rng(10).integers(0, 80, (1, 160)).astype(np.int32)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  config, params = hf.import_llm(path)
  assert (config.rope_type, config.rope_factor) == (rope_scaling["rope_type"],
                                                     rope_scaling["factor"])
  assert relative_error(LLM(config).apply({"params": params}, tokens), ref) < RTOL
  plain = dataclasses.replace(config, rope_type="default", rope_factor=1.0)
  assert relative_error(LLM(plain).apply({"params": params}, tokens), ref) > 1e-2

  exported = str(tmp_path / "exported")
  hf.export_llm(config, params, exported, model_type="llama")
  assert hf.read_config(exported)["rope_scaling"]["rope_type"] == rope_scaling["rope_type"]
  assert hf.llm_config_from_hf(hf.read_config(exported)) == config
  _assert_tensors_equal(path, exported)
  again = transformers.LlamaForCausalLM.from_pretrained(
      exported, attn_implementation="eager").eval()
  with torch.no_grad():
    out = again(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  np.testing.assert_array_equal(out, ref)


def test_unsupported_rope_scaling_names_its_type(tmp_path):
  _, path = scaled_llama(tmp_path, {"rope_type": "yarn", "factor": 4.0,
                                    "original_max_position_embeddings": 128})
  with pytest.raises(ValueError, match=r"config.json: rope_scaling type 'yarn' "
                                       r"\(field rope_parameters.rope_type\)"):
    hf.import_llm(path)
  with pytest.raises(ValueError, match=r"'dynamic' \(field rope_scaling.type\)"):
    hf.llm_config_from_hf({"model_type": "llama", "rope_scaling": {"type": "dynamic"}})
  with pytest.raises(ValueError, match="rope_scaling.factor is missing"):
    hf.llm_config_from_hf({"model_type": "llama", "rope_scaling": {"rope_type": "linear"}})
  with pytest.raises(ValueError, match="rope_type='yarn'"):
    LLMConfig(rope_type="yarn")


def test_sharded_checkpoint_with_index(tmp_path):
  model, _ = qwen2(tmp_path, tied=False)
  path = str(tmp_path / "sharded")
  model.save_pretrained(path, max_shard_size="20KB")
  assert os.path.exists(os.path.join(path, hf.INDEX))
  config, params = hf.import_llm(path)
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  assert relative_error(LLM(config).apply({"params": params}, tokens), ref) < RTOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_16_bit_checkpoint_imports_as_float32(tmp_path, dtype):
  """Released checkpoints are bfloat16: the parameters come back float32, each value the
  checkpoint's exactly, and the logits are the checkpoint's model's in float32."""
  model, _ = qwen2(tmp_path, tied=False)
  path = _save(model.to(dtype), tmp_path / "half")
  config, params = hf.import_llm(path)
  assert {str(x.dtype) for x in jax.tree.leaves(params)} == {"float32"}
  embedding = model.model.embed_tokens.weight.detach().float().numpy()
  np.testing.assert_array_equal(params["embedding"], embedding)
  tokens = np.arange(12, dtype=np.int32).reshape(2, 6)
  with torch.no_grad():
    ref = model.float()(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  assert relative_error(LLM(config).apply({"params": params}, tokens), ref) < RTOL


def test_the_shard_plan_keeps_each_file_under_the_limit_but_a_larger_tensor_alone():
  assert hf.shard_plan([3, 3, 10, 1, 1], 5) == [[0], [1], [2], [3, 4]]
  assert hf.shard_plan([2, 2, 1], 5) == [[0, 1, 2]]
  assert hf.shard_plan([], 5) == [[]]


def test_unsupported_configs_name_the_field(tmp_path):
  _, path = llama(tmp_path, bias=True)
  with pytest.raises(ValueError, match="attention_bias"):
    hf.import_llm(path)
  with pytest.raises(ValueError, match="model_type='gpt2'"):
    hf.llm_config_from_hf({"model_type": "gpt2"})
  with pytest.raises(ValueError, match="rope_scaling type 'yarn'"):
    hf.llm_config_from_hf({"model_type": "qwen2", "rope_scaling": {"rope_type": "yarn"},
                           "num_attention_heads": 2, "hidden_size": 8})
  with pytest.raises(FileNotFoundError, match="config.json"):
    hf.import_llm(str(tmp_path))

# The convert binary (towers -> workdir -> training -> HF again) is tested by running
# docs/huggingface.md's whole path: tests/test_docs_whole_path.py.


# --- The overrides of a converted paper-size checkpoint --------------------------------

QWEN25_7B = {  # Qwen2.5-7B-Instruct's config.json
    "architectures": ["Qwen2ForCausalLM"], "hidden_act": "silu", "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "model_type": "qwen2",
    "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "vocab_size": 152064}
SIGLIP_SO400M_384 = {  # siglip-so400m-patch14-384's config.json (its vision part)
    "model_type": "siglip", "vision_config": {
        "hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
        "model_type": "siglip_vision_model", "num_attention_heads": 16,
        "num_hidden_layers": 27, "patch_size": 14}}


def test_paper_towers_overrides_keep_the_paper_config_and_its_bfloat16():
  """The overrides of the paper's two towers, laid over configs/paper.py as the docs do,
  change nothing: the shapes already match and the compute dtype stays bfloat16."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  from tokenflex_jax.app import cli  # pylint: disable=import-outside-toplevel
  from tokenflex_jax.convert.__main__ import overrides  # pylint: disable=import-outside-toplevel
  written = overrides(hf.vision_config_from_hf(SIGLIP_SO400M_384),
                      hf.llm_config_from_hf(QWEN25_7B))
  assert "--config.model.llm.width=3584" in written and "--config.model.vit.depth=27" in written
  assert not [f for f in written if ".dtype=" in f], written

  def parsed(*extra):
    values = flags.FlagValues()
    argv = ["convert", "--config=configs/paper.py:stage=3", *extra, "--workdir=/tmp/x"]
    config, _ = cli.define_flags(flag_values=values, sys_argv=argv)
    values(argv)
    return config.value.model.to_dict()

  plain, converted = parsed(), parsed(*written)
  assert converted == plain
  assert converted["llm"]["dtype"] == converted["vit"]["dtype"] == "bfloat16"
