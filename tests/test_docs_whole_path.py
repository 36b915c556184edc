"""docs/huggingface.md's whole path, run as the docs print it.

The lines of the "The whole path" block are run by bash as they are, with the doc's
folders (/models, /data, /ckpt, /runs, /out) under a temporary folder and, per binary,
size overrides only (a batch of 8, 2 steps, short texts; `SIZES`): tiny SigLIP and Qwen2
towers built offline with transformers (a Qwen2.5-style tokenizer.json with its own chat
template), a LLaVA JSON with JPEG photos, text-only, multi-turn and system rows, an
MMBench TSV and a VQA JSONL. A documented command that does not run fails the test.

Two lengths: "all" (marked slow) runs every line; "stage1", in CI, leaves out the train
lines of stages 2 and 3 and points the lines after them at /runs/stage1 (the same
commands, a shorter run).
"""

import base64
import io
import json
import os
import re
import subprocess
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # pylint: disable=wrong-import-position
import pytest  # pylint: disable=wrong-import-position
import torch  # pylint: disable=wrong-import-position
import transformers  # pylint: disable=wrong-import-position
from PIL import Image  # pylint: disable=wrong-import-position
from safetensors.numpy import load_file  # pylint: disable=wrong-import-position

from tests.test_chat_templates import QWEN25  # pylint: disable=wrong-import-position
from tests.test_chat_tokenizers import _bpe  # pylint: disable=wrong-import-position
from tests.test_convert_hf import RTOL, relative_error  # pylint: disable=wrong-import-position
from tests.xla_env import REPO, xla_flags  # pylint: disable=wrong-import-position
from tokenflex_jax.data import images  # pylint: disable=wrong-import-position
from tokenflex_jax.data.hf_tokenizer import HFTokenizer  # pylint: disable=wrong-import-position
from tokenflex_jax.evaluation.generate import make_generate  # pylint: disable=wrong-import-position
from tokenflex_jax.models import hf  # pylint: disable=wrong-import-position
from tokenflex_jax.models.llm import LLM  # pylint: disable=wrong-import-position
from tokenflex_jax.models.vlm import VLM  # pylint: disable=wrong-import-position

DOC = os.path.join(REPO, "docs", "huggingface.md")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|image_pad|>"]
COLORS = {"red": (220, 20, 20), "green": (20, 200, 20), "blue": (20, 20, 220),
          "yellow": (230, 230, 20)}
# The only flags the test adds to a documented command: sizes, per binary.
SIZES = {
    "tokenflex_jax.train": ("--config.batch_size=8 --config.total_steps=2 "
                            "--config.optimizer.warmup_steps=1 --config.checkpoint_every=2 "
                            "--config.log_every=1 --config.data.max_text_length=96 "
                            "--config.data.num_workers=0"),
    "tokenflex_jax.eval": ("--config.eval.batch_size=8 --config.eval.max_prompt_length=160 "
                           "--config.eval.max_new_tokens=3"),
    "tokenflex_jax.predict": "--max_new_tokens=3",
}


def whole_path_commands() -> str:
  """The indented lines of huggingface.md's "## The whole path" section."""
  with open(DOC, encoding="utf-8") as f:
    text = f.read()
  section = text.split("\n## The whole path\n", 1)[1].split("\n## ", 1)[0]
  lines = [line[4:] for line in section.splitlines() if line.startswith("    ")]
  assert any(line.startswith("python -m tokenflex_jax.train") for line in lines), section
  return "\n".join(lines) + "\n"


def _randomise(model: torch.nn.Module, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in model.parameters():
      p.copy_(torch.randn(p.shape, generator=gen) * 0.2)


def _towers(root: str) -> None:
  """/models/siglip-so400m-patch14-384 and /models/Qwen2.5-7B-Instruct, tiny."""
  vision = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
      image_size=32, patch_size=2, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
      num_attention_heads=2))
  _randomise(vision, 1)
  vision.save_pretrained(os.path.join(root, "models", "siglip-so400m-patch14-384"))
  llm_dir = os.path.join(root, "models", "Qwen2.5-7B-Instruct")
  text = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
      vocab_size=448, hidden_size=64, intermediate_size=96, num_hidden_layers=1,
      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False))
  _randomise(text, 2)
  text.save_pretrained(llm_dir)
  _bpe(SPECIALS).save(os.path.join(llm_dir, "tokenizer.json"))
  with open(os.path.join(llm_dir, "tokenizer_config.json"), "w", encoding="utf-8") as f:
    json.dump({"tokenizer_class": "Qwen2TokenizerFast", "eos_token": "<|im_end|>",
               "pad_token": "<|endoftext|>", "bos_token": None,
               "chat_template": QWEN25.replace("<G>", "").replace("</G>", "")}, f)


def _jpeg(color: str, size: int = 40) -> bytes:
  pixels = np.full((size, size + 8, 3), COLORS[color], np.uint8)
  pixels[::7] = 255  # Some structure, so the photos are not flat.
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="JPEG")
  return buf.getvalue()


def _data(root: str) -> None:
  """/data: a LLaVA JSON + images, an MMBench TSV and a VQA JSONL."""
  images = os.path.join(root, "data", "llava", "images", "coco")
  os.makedirs(images)
  names = list(COLORS)
  rows = []
  for i in range(12):
    color = names[i % 4]
    with open(os.path.join(images, f"{i}.jpg"), "wb") as f:
      f.write(_jpeg(color))
    turns = [{"from": "human", "value": "<image>\nWhat colour is the car?"},
             {"from": "gpt", "value": color}]
    if i % 3 == 1:  # multi-turn
      turns += [{"from": "human", "value": "Is it bright?"},
                {"from": "gpt", "value": "yes" if color == "yellow" else "no"}]
    if i % 4 == 2:  # a system turn
      turns = [{"from": "system", "value": "Answer in one word."}] + turns
    rows.append({"id": f"coco-{i}", "image": f"coco/{i}.jpg", "conversations": turns})
  rows.append({"id": "text-0", "conversations": [  # text-only
      {"from": "human", "value": "Name a colour."}, {"from": "gpt", "value": "red"}]})
  with open(os.path.join(root, "data", "llava_v1_5_mix665k.json"), "w", encoding="utf-8") as f:
    json.dump(rows, f)
  header = "index\tquestion\thint\tA\tB\tC\tD\tanswer\tcategory\timage\n"
  lines = [header]
  for i, color in enumerate(names):
    image = base64.b64encode(_jpeg(color)).decode()
    lines.append(f"{i}\tWhat colour is the car?\tnan\t{names[0]}\t{names[1]}\t{names[2]}\t"
                 f"{names[3]}\t{'ABCD'[i]}\t{'warm' if i % 2 == 0 else 'cold'}\t{image}\n")
  with open(os.path.join(root, "data", "MMBench_DEV_EN.tsv"), "w", encoding="utf-8") as f:
    f.write("".join(lines))
  with open(os.path.join(root, "data", "textvqa_val.jsonl"), "w", encoding="utf-8") as f:
    for i, color in enumerate(names):
      f.write(json.dumps({"image": f"llava/images/coco/{i}.jpg",
                          "question": "What colour is the car?", "answers": [color] * 10}) + "\n")


def _script(root: str, length: str) -> str:
  """The doc's commands with its folders under ``root`` and `SIZES` added per binary;
  for ``length`` "stage1" without the train lines of stages 2 and 3."""
  commands = whole_path_commands()
  if length == "stage1":
    logical = re.split(r"(?<!\\)\n", commands)  # a command with its continuation lines
    kept = [c for c in logical if not re.match(
        r"python -m tokenflex_jax.train .*--workdir=/runs/stage[23]", c, re.S)]
    assert len(kept) == len(logical) - 2, "the doc's stage 2 and 3 train lines moved"
    commands = "\n".join(kept).replace("/runs/stage3", "/runs/stage1")
  commands = re.sub(r"(?<![\w.~])/(models|data|ckpt|runs|out)\b", root + r"/\1", commands)
  cases = "".join(f"    {module}) extra=({flags});;\n" for module, flags in SIZES.items())
  return (f"set -euo pipefail\n"
          f"python() {{  # the documented python, plus the size overrides of its binary\n"
          f"  local extra=()\n  case \"$2\" in\n{cases}  esac\n"
          f"  {sys.executable} \"$@\" \"${{extra[@]}}\"\n}}\n" + commands)


@pytest.fixture(scope="module", params=["stage1", pytest.param("all", marks=pytest.mark.slow)])
def whole_path(request, tmp_path_factory):
  """(root folder, the last stage's name, the finished bash run) of the doc's whole path."""
  root = str(tmp_path_factory.mktemp("whole_path"))
  _towers(root)
  _data(root)
  # Two host devices: the doc's mesh (1, -1, 1) shards the towers as they are converted
  # and the model as it trains (FSDP over 2); compiles are faster than over 8.
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=xla_flags(2))
  env.pop("PYTHONPATH", None)  # The docs run from the repository root, nothing else.
  env.pop("PYTEST_CURRENT_TEST", None)
  run = subprocess.run(["bash", "-c", _script(root, request.param)], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=1200)
  assert run.returncode == 0, f"a documented command failed:\n{run.stderr[-5000:]}"
  return root, "stage1" if request.param == "stage1" else "stage3", run


def test_every_documented_command_runs(whole_path):
  root, last, run = whole_path
  # The paper model stays in bfloat16: the overrides carry the towers' shapes only.
  with open(os.path.join(root, "ckpt", "start", "model_overrides.txt"), encoding="utf-8") as f:
    overrides = f.read().split()
  assert "--config.model.llm.width=64" in overrides and "--config.model.vit.patch_size=2" in overrides
  assert not [o for o in overrides if ".dtype=" in o], overrides
  with open(os.path.join(root, "runs", last, "config.json"), encoding="utf-8") as f:
    trained = json.load(f)
  assert trained["model"]["llm"]["dtype"] == trained["model"]["vit"]["dtype"] == "bfloat16"
  assert trained["model"]["llm"]["width"] == 64 and trained["stage"] == int(last[-1])
  # Each stage started from the one before, and each evaluation wrote its results.
  assert f"initialised llm, vit from {root}/ckpt/start (step 0); projector" in run.stderr
  if last == "stage3":
    assert f"initialised llm, projector, vit from {root}/runs/stage2" in run.stderr
  evals = os.path.join(root, "runs", last, "eval")
  for stem, suite, families, chance, questions in (
      ("MMBench_DEV_EN", "mmbench", {"warm", "cold"}, 0.25 ** 4, 4),
      ("textvqa_val", "vqa", {"vqa"}, 0.0, 4)):
    with open(os.path.join(evals, stem, "step_2", "results.json"), encoding="utf-8") as f:
      results = json.load(f)
    assert results["suite"] == suite and set(results["families"]) == families
    assert results["examples_per_family"] == questions
    assert all(f["chance"] == pytest.approx(chance) for f in results["families"].values())
    assert set(results["results"]) == {"64", "100", "144", "196", "256"}  # every budget
    for r in results["results"].values():
      assert set(r["families"]) == families
      assert all(0.0 <= a <= 1.0 for a in r["families"].values())
  with open(os.path.join(evals, "index.json"), encoding="utf-8") as f:
    index = json.load(f)["evaluations"]  # Both evaluations kept and listed.
  assert [(e["suite"], e["step"], e["dir"]) for e in index] == [
      ("MMBench_DEV_EN", 2, "MMBench_DEV_EN/step_2"), ("textvqa_val", 2, "textvqa_val/step_2")]
  assert "answered at" in run.stderr  # predict --num_tokens=auto
  # Quiet logs: nothing that reads like a fault when nothing is wrong.
  for noise in ("Unable to initialize backend", "_CHECKPOINT_METADATA", "read only=",
                "read_only=True, setting", "Using custom data configuration"):
    assert noise not in run.stderr, noise


def test_the_exported_folder_is_the_trained_model(whole_path):
  root, last, _ = whole_path
  folder = os.path.join(root, "out", "tokenflex")
  config, params = hf.import_vlm(folder)  # float32, as the folder stores it
  model = VLM(config)
  hf_model = transformers.AutoModelForCausalLM.from_pretrained(
      folder, trust_remote_code=True, dtype=torch.float32).eval()
  processor = transformers.AutoProcessor.from_pretrained(folder, trust_remote_code=True)
  tok = HFTokenizer(os.path.join(root, "models", "Qwen2.5-7B-Instruct", "tokenizer.json"),
                    "", "<|image_pad|>")
  question = "What colour is the car?"
  with open(os.path.join(root, "data", "llava", "images", "coco", "1.jpg"), "rb") as f:
    jpeg = f.read()
  pixels = images.decode(jpeg, config.vit.image_size) / 127.5 - 1.0
  text = processor.apply_chat_template(
      [{"role": "user", "content": "<|image_pad|>" + question}], add_generation_prompt=True)
  for count in (64, 36):  # trained, untrained
    inputs = processor(images=[Image.open(io.BytesIO(jpeg))], text=[text],
                       num_visual_tokens=count)
    ids = tok.prompt_ids(question)
    assert inputs["input_ids"][0].tolist() == np.repeat(
        ids, [count if i == tok.image_id else 1 for i in ids]).tolist()
    with torch.no_grad():
      theirs = hf_model(**inputs).logits[:, -1].numpy()
    tokens = np.asarray([ids + [tok.pad_id]], np.int32)  # the slot after the prompt
    ours = model.apply({"params": params}, pixels[None], tokens, count)[:, len(ids)]
    assert relative_error(ours, theirs) < RTOL
    prompts = np.asarray([ids], np.int32)
    answer, _ = make_generate(model, 3, tok.eos_id, tok.pad_id)(params, pixels[None],
                                                                prompts, count)
    out = hf_model.generate(**inputs, max_new_tokens=3)
    theirs_answer = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert theirs_answer == np.asarray(answer)[0, :len(theirs_answer)].tolist()
  # The folder read back into a workdir, with the overrides of its model.
  with open(os.path.join(root, "ckpt", "again", "model_overrides.txt"), encoding="utf-8") as f:
    overrides = f.read().split()
  assert "--config.model.projector.pooling=resize_avg" in overrides
  assert os.path.isdir(os.path.join(root, "ckpt", "again", "checkpoints", "0"))
  # The towers: a plain Qwen2 folder with the trained LLM.
  towers = os.path.join(root, "out", "towers")
  assert os.path.exists(os.path.join(towers, "vision", "config.json"))
  again = transformers.Qwen2ForCausalLM.from_pretrained(
      os.path.join(towers, "llm"), attn_implementation="eager").eval()
  llm_config, llm_params = hf.import_llm(os.path.join(towers, "llm"))
  tokens = np.arange(10, dtype=np.int32).reshape(1, 10)
  with torch.no_grad():
    ref = again(input_ids=torch.from_numpy(tokens).long()).logits.numpy()
  assert relative_error(LLM(llm_config).apply({"params": llm_params}, tokens), ref) < RTOL
  np.testing.assert_array_equal(llm_params["embedding"], params["llm"]["embedding"])
  original = load_file(os.path.join(root, "models", "Qwen2.5-7B-Instruct", hf.SAFETENSORS))
  moved = not np.array_equal(np.asarray(params["llm"]["embedding"]),
                             original["model.embed_tokens.weight"])
  # Stage 1 trains the projector alone: the LLM comes back bit-exact. Stage 3 trains it.
  assert moved == (last == "stage3")
