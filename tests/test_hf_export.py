"""The exported Hugging Face folder against our model: transformers loads it offline with
its own SigLIP and Llama / Qwen2 modules, its logits and greedy answers are ours, its
processor and tokenizer give our inputs, and importing it back is bit-exact.

Tiny random models (float32), three variants covering every branch of the modeling
file: the demo's (Llama, tied embeddings, SwiGLU, adaptive pooling, projector position
table, visual tokens spanning 256 positions laid out "raster"), one with Qwen2 biases,
untied embeddings, LLaVA's GELU MLP, resize-then-average pooling and the "grid" layout,
and one with one position per visual token.
"""

import io
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import flax.linen as nn  # pylint: disable=wrong-import-position
import jax  # pylint: disable=wrong-import-position
import jax.numpy as jnp  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position
from safetensors import safe_open  # pylint: disable=wrong-import-position
from transformers import (  # pylint: disable=wrong-import-position
    AutoModelForCausalLM, AutoProcessor, AutoTokenizer, GenerationConfig)

from tests.test_chat_tokenizers import (  # pylint: disable=wrong-import-position
    CHATML_TOKENS, IMAGE_TOKENS, LLAMA3_TOKENS, QWEN_TEMPLATE, _bpe, _write)
from tests.tiny import tiny_spec  # pylint: disable=wrong-import-position
from tokenflex_jax import errors, model_config  # pylint: disable=wrong-import-position
from tokenflex_jax.app import hf_export  # pylint: disable=wrong-import-position
from tokenflex_jax.data import images as images_lib  # pylint: disable=wrong-import-position
from tokenflex_jax.data import scenes  # pylint: disable=wrong-import-position
from tokenflex_jax.data import tokenizer as tok_lib  # pylint: disable=wrong-import-position
from tokenflex_jax.data import tokenizer_export  # pylint: disable=wrong-import-position
from tokenflex_jax.data.hf_tokenizer import HFTokenizer  # pylint: disable=wrong-import-position
from tokenflex_jax.data.sp_chat_tokenizer import (  # pylint: disable=wrong-import-position
    SentencePieceChatTokenizer)
from tokenflex_jax.evaluation.generate import (  # pylint: disable=wrong-import-position
    encode_prompts, make_generate)
from tokenflex_jax.models import hf  # pylint: disable=wrong-import-position
from tokenflex_jax.models.vlm import VLM  # pylint: disable=wrong-import-position

TRAINED, UNTRAINED = (64, 144), (36, 100)  # the tiny spec trains at 64, 144, 256
QUESTIONS = ["what color is the square", "how many shapes are there"]
ATOL = 1e-4
VARIANTS = {
    "demo": {},
    "qwen2_gelu_grid": dict(model__llm__qkv_bias=True, model__llm__tie_embeddings=False,
                            model__projector__mlp="gelu", model__projector__pooling="resize_avg",
                            model__projector__position_embedding=False,
                            model__visual_position_layout="grid"),
    "one_position_per_token": dict(model__visual_position_span=0),
}


def _uint8_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _perturbed(params, seed: int = 1):
  """Random params, moved off their initial values (zero biases, unit norms)."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda x: (np.asarray(x) + 0.05 * rng.standard_normal(x.shape)
                                 ).astype(np.float32), params)


def _export(variant: str, root, **options):
  """(variant, VLM, params, tokenizer, folder, images uint8 [2, S, S, 3]) of a random
  model of ``variant`` exported under ``root`` (``options``: `export_folder`'s)."""
  spec = tiny_spec(**VARIANTS[variant])
  tok = tok_lib.ensure_tokenizer(str(root / "tokenizer.model"))
  config = model_config.vlm_config(spec, tok)
  model = VLM(config)
  pixels = _uint8_images(2, config.vit.image_size)
  tokens = jnp.asarray(encode_prompts(tok, QUESTIONS, 16))
  params = _perturbed(nn.unbox(model.init(jax.random.key(0), pixels / 127.5 - 1.0, tokens,
                                          64)["params"]))
  folder = str(root / "folder")
  hf_export.export_folder(config, params, tok, folder, "qwen2" if config.llm.qkv_bias
                          else "llama", spec.token_counts, max_new_tokens=8, **options)
  return variant, model, params, tok, folder, pixels


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def exported(request, tmp_path_factory):
  """`_export` of each variant, float32 in one file."""
  return _export(request.param, tmp_path_factory.mktemp(request.param))


@pytest.fixture(scope="module")
def loaded(exported):
  """transformers' model and processor from the folder, offline."""
  folder = exported[4]
  model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True,
                                               dtype=torch.float32).eval()
  return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def _inputs(processor, pixels, count):
  texts = [processor.apply_chat_template([{"role": "user", "content": "<image>" + q}],
                                         add_generation_prompt=True) for q in QUESTIONS]
  return processor(images=list(pixels), text=texts, num_visual_tokens=count)


def test_the_folder_holds_what_transformers_needs(exported):
  variant, model, _, tok, folder, _ = exported
  for name in ("config.json", "model.safetensors", "modeling_tokenflex.py",
               "configuration_tokenflex.py", "processing_tokenflex.py", "tokenizer.json",
               "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
               "preprocessor_config.json", "processor_config.json", "README.md"):
    assert os.path.isfile(os.path.join(folder, name)), name
  config = hf.read_config(folder)
  assert config["num_image_token"] == 256 and config["visual_token_counts"] == [64, 144, 256]
  assert config["llm_config"]["max_position_embeddings"] == model.config.llm.max_positions
  generation = GenerationConfig.from_pretrained(folder)
  assert generation.eos_token_id == tok.eos_id and generation.pad_token_id == tok.pad_id
  assert generation.do_sample is False
  # Ristretto's tensor names, ours without the biases its projector has.
  names = set(hf.TensorReader(folder).names())
  assert "vision_model.vision_model.embeddings.patch_embedding.weight" in names
  assert "language_model.model.embed_tokens.weight" in names
  assert "projector.mlp.layernorm.weight" in names
  assert ("projector.mlp.f1.weight" in names) == (variant != "qwen2_gelu_grid")


def test_import_gives_the_same_parameters_back(exported):
  _, model, params, _, folder, _ = exported
  config, again = hf.import_vlm(folder)
  assert config == hf.vlm_config_from_hf(hf.read_config(folder))
  assert (config.projector, config.visual_position_span, config.visual_position_layout) == (
      model.config.projector, model.config.visual_position_span,
      model.config.visual_position_layout)
  assert config.llm == model.config.llm and config.vit == model.config.vit
  flat = lambda tree: {jax.tree_util.keystr(k): v for k, v in
                       jax.tree_util.tree_leaves_with_path(tree)}
  ours, theirs = flat(params), flat(again)
  assert ours.keys() == theirs.keys()
  for name, value in ours.items():
    np.testing.assert_array_equal(theirs[name], value, err_msg=name)


def test_a_bfloat16_export_in_shards_loads_and_imports_the_rounded_parameters(tmp_path):
  """``dtype="bfloat16"`` with small shards: the index and shards transformers writes,
  every tensor bfloat16; transformers loads it; importing it gives our parameters
  rounded to bfloat16, as float32; and a float32 export over it leaves no stale shard."""
  _, model, params, tok, folder, _ = _export("demo", tmp_path, dtype="bfloat16",
                                              shard_bytes=20_000)
  with open(os.path.join(folder, hf.INDEX), encoding="utf-8") as f:
    index = json.load(f)
  shards = sorted(set(index["weight_map"].values()))
  assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
  assert not os.path.exists(os.path.join(folder, hf.SAFETENSORS))
  total = 0
  for shard in shards:
    with safe_open(os.path.join(folder, shard), framework="pt") as f:
      dtypes = {f.get_slice(name).get_dtype() for name in f.keys()}
      sizes = [f.get_slice(name).get_shape() for name in f.keys()]
    assert dtypes == {"BF16"}, shard
    total += sum(2 * int(np.prod(shape)) for shape in sizes)
  assert total == index["metadata"]["total_size"]
  config = hf.read_config(folder)
  assert config["torch_dtype"] == config["llm_config"]["torch_dtype"] == "bfloat16"
  hf_model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
  assert next(hf_model.parameters()).dtype == torch.bfloat16
  _, again = hf.import_vlm(folder)
  rounded = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16).astype(np.float32),
                         params)
  for got, want in zip(jax.tree.leaves(again), jax.tree.leaves(rounded)):
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, want)
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(rounded),
                                                     jax.tree.leaves(params)))
  hf_export.export_folder(model.config, params, tok, folder, "llama", (64, 144, 256), 8)
  assert sorted(f for f in os.listdir(folder) if "safetensors" in f) == [hf.SAFETENSORS]


def test_the_processor_gives_our_ids_and_pixels(exported, loaded):
  _, _, _, tok, _, pixels = exported
  _, processor = loaded
  inputs = _inputs(processor, pixels, 64)
  for row, question in enumerate(QUESTIONS):
    ids = inputs["input_ids"][row][inputs["attention_mask"][row].bool()].tolist()
    ours = tok.prompt_ids(question)
    assert ids == np.repeat(ours, [64 if i == tok.image_id else 1 for i in ours]).tolist()
  np.testing.assert_allclose(inputs["pixel_values"].permute(0, 2, 3, 1).numpy(),
                             pixels / 127.5 - 1.0, atol=1e-6)
  # A PNG of another size: resized as our reader resizes it (bicubic), then [-1, 1].
  image = Image.fromarray(_uint8_images(1, 45, seed=3)[0])
  png = io.BytesIO()
  image.save(png, format="PNG")
  size = pixels.shape[1]
  ours = images_lib.decode(png.getvalue(), size) / 127.5 - 1.0
  theirs = processor.image_processor(image, return_tensors="pt")["pixel_values"][0]
  np.testing.assert_allclose(theirs.permute(1, 2, 0).numpy(), ours, atol=1e-6)


def test_images_and_image_markers_must_match(exported, loaded):
  _, _, _, _, _, pixels = exported
  model, processor = loaded
  with pytest.raises(ValueError, match=r"^1 image\(s\) but 0 <image> marker\(s\)"):
    processor(images=[pixels[0]], text=["What is shown?"], num_visual_tokens=64)
  with pytest.raises(ValueError, match=r"^0 image\(s\) but 1 <image> marker\(s\)"):
    processor(text=["<image>What is shown?"], num_visual_tokens=64)
  nested = processor(images=[[pixels[0], pixels[1]], [pixels[0]]], num_visual_tokens=4,
                     text=["<image><image>Two?", "<image>One?"])  # a list per prompt
  assert nested["pixel_values"].shape[0] == 3
  text_only = processor(text=["What is shown?"], num_visual_tokens=64)
  pixel_values = processor.image_processor([pixels[0]], return_tensors="pt")["pixel_values"]
  with pytest.raises(ValueError, match=r"^0 image tokens for 1 images"):
    model(input_ids=text_only["input_ids"], attention_mask=text_only["attention_mask"],
          pixel_values=pixel_values)


def test_a_forward_without_a_mask_is_one_with_every_token(exported, loaded):
  """One unpadded row: no attention_mask means all ones, also where an image's tokens
  span several positions and no cache is used (transformers would otherwise split the
  row at each position jump)."""
  _, _, _, _, _, pixels = exported
  hf_model, processor = loaded
  inputs = processor(images=[pixels[0]], text=["<image>What is shown?"], num_visual_tokens=64)
  with torch.no_grad():
    masked = hf_model(**inputs, use_cache=False).logits
    unmasked = hf_model(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
                        use_cache=False).logits
  torch.testing.assert_close(unmasked, masked, rtol=0, atol=0)


@pytest.mark.parametrize("count", TRAINED + UNTRAINED)
def test_logits_equal_ours_at_trained_and_untrained_counts(exported, loaded, count):
  _, model, params, tok, _, pixels = exported
  hf_model, processor = loaded
  inputs = _inputs(processor, pixels, count)
  with torch.no_grad():
    theirs = hf_model(**inputs).logits.numpy()                   # [B, S, V], left-padded
  width = max(len(tok.prompt_ids(q)) for q in QUESTIONS)
  tokens = np.full((2, width), tok.pad_id, np.int32)
  for row, q in enumerate(QUESTIONS):
    ids = tok.prompt_ids(q)
    tokens[row, :len(ids)] = ids
  ours = np.asarray(model.apply({"params": params}, pixels / 127.5 - 1.0, tokens, count))
  for row, q in enumerate(QUESTIONS):
    ids = np.asarray(inputs["input_ids"][row])
    keep = np.asarray(inputs["attention_mask"][row]).astype(bool)
    image_slots = np.flatnonzero(ids == tok.image_id)
    # Each text token's slot, the placeholder's being its image's last visual slot.
    slots = [j for j in np.flatnonzero(keep) if ids[j] != tok.image_id or j == image_slots[-1]]
    targets = [t for t in range(1, len(tok.prompt_ids(q))) if tokens[row, t] != tok.image_id]
    assert len(targets) > 3
    for t in targets:  # ours[t] predicts token t; their slot of token t - 1 does too
      np.testing.assert_allclose(theirs[row, slots[t - 1]], ours[row, t], atol=ATOL, rtol=0)


@pytest.mark.parametrize("count", (TRAINED[0], UNTRAINED[0]))
def test_greedy_generate_equals_our_decoding_and_stops_where_it_stops(exported, loaded, count):
  _, model, params, tok, _, pixels = exported
  hf_model, processor = loaded
  prompts = jnp.asarray(encode_prompts(tok, QUESTIONS, 16))
  images = jnp.asarray(pixels / 127.5 - 1.0, jnp.float32)
  ours, _ = make_generate(model, 8, tok.eos_id, tok.pad_id)(params, images, prompts, count)
  ours = np.asarray(ours)
  inputs = _inputs(processor, pixels, count)
  out = hf_model.generate(**inputs)  # the folder's generation_config: greedy, 8 tokens
  theirs = out[:, inputs["input_ids"].shape[1]:].numpy()
  np.testing.assert_array_equal(theirs, ours[:, :theirs.shape[1]])
  assert (ours[:, theirs.shape[1]:] == tok.pad_id).all()
  # One image token per image, expanded by generate itself.
  one = processor(images=list(pixels), text=[processor.apply_chat_template(
      [{"role": "user", "content": "<image>" + q}], add_generation_prompt=True)
      for q in QUESTIONS], num_visual_tokens=1)
  expanded = hf_model.generate(**one, num_visual_tokens=count)
  np.testing.assert_array_equal(expanded[:, -theirs.shape[1]:].numpy(), theirs)
  # A stop: both end at the same token, the rest padding. The random model never writes
  # its end of turn, so the first answer's first new token after its first plays it.
  k = next(k for k in range(1, 8) if ours[0, k] not in ours[0, :k])
  stop = int(ours[0, k])
  ours_stop = np.asarray(make_generate(model, 8, stop, tok.pad_id)(params, images, prompts,
                                                                   count)[0])
  out = hf_model.generate(**inputs, eos_token_id=stop)
  theirs_stop = out[:, inputs["input_ids"].shape[1]:].numpy()
  assert theirs_stop[0, k] == stop and (theirs_stop[0, k + 1:] == tok.pad_id).all()
  np.testing.assert_array_equal(theirs_stop, ours_stop[:, :theirs_stop.shape[1]])


@pytest.fixture(scope="module")
def hf_tokenizer_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokenizers")
  tok = _bpe(CHATML_TOKENS + LLAMA3_TOKENS + IMAGE_TOKENS)
  own = _write(root / "own", tok, {"chat_template": QWEN_TEMPLATE, "bos_token": None,
                                   "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
  bare = _write(root / "bare", tok, {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"})
  return {"own": own, "bare": bare}


@pytest.mark.parametrize("template,image_token,system", [("", "<|image_pad|>", None),
                                                         ("", "<|image_pad|>", "Be brief."),
                                                         ("chatml", "<|image_pad|>", None),
                                                         ("llama3", "<image>", None)])
def test_an_llm_tokenizer_exports_with_the_template_the_run_used(
    tmp_path, hf_tokenizer_dirs, template, image_token, system):
  source = hf_tokenizer_dirs["own" if not template else "bare"]
  ours = HFTokenizer(source, template, image_token, system)
  files = tokenizer_export.write(ours, str(tmp_path))
  assert files.image_token == image_token
  theirs = AutoTokenizer.from_pretrained(str(tmp_path))
  for question in ("What is in the picture?", "  two  spaces ", "Ünïcode ﬁ 12?"):
    ids = theirs.apply_chat_template([{"role": "user", "content": image_token + question}],
                                     add_generation_prompt=True, tokenize=True)["input_ids"]
    assert list(ids) == ours.prompt_ids(question), (template, question)


def test_the_project_tokenizer_converts_exactly(tmp_path):
  ours = tok_lib.ensure_tokenizer(str(tmp_path / "tokenizer.model"))
  tokenizer_export.write(ours, str(tmp_path / "out"))
  theirs = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
  words = " ".join(scenes.corpus_texts()).split()
  rng = np.random.default_rng(0)
  for _ in range(300):
    question = " ".join(rng.choice(words, rng.integers(1, 12))) + rng.choice(
        ["?", "", ".", "  x ", " What is 12?", " Ünïcode ﬁ"])
    ids = theirs.apply_chat_template([{"role": "user", "content": "<image>" + question}],
                                     add_generation_prompt=True, tokenize=True)["input_ids"]
    assert list(ids) == ours.prompt_ids(question), question
    answer = ours.encode(question)
    if ours.sentencepiece.unk_id() not in answer:  # sentencepiece writes " ⁇ " for those
      assert theirs.decode(answer) == ours.decode(answer), question


def test_a_sentencepiece_llm_tokenizer_is_refused_in_one_line(tmp_path):
  model = tmp_path / "tokenizer.model"
  tok_lib.ensure_tokenizer(str(model))
  llama2 = SentencePieceChatTokenizer(str(model), "llama2", "<image>")
  with pytest.raises(errors.ConfigError, match="config.tokenizer.kind"):
    tokenizer_export.write(llama2, str(tmp_path / "out"))
