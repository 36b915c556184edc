"""The eval path on small files in each of the eight VLMEvalKit layouts: images (shared
references, lists, MMMU's markers) read, every question asked, the predictions written in
VLMEvalKit's layout, and `tokenflex_jax.score` on them giving the eval's own figures."""

import base64
import io
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

from tests.test_score import write_tsv
from tests.tiny import tiny_spec
from tokenflex_jax import model_config, sharding, specs
from tokenflex_jax.app import run_tokenizer
from tokenflex_jax.data.pipeline import normalize_image
from tokenflex_jax.errors import InputError
from tokenflex_jax.evaluation import benchmark_set, evaluator, outputs
from tokenflex_jax.evaluation.benchmarks import score_files
from tokenflex_jax.models.vlm import VLM


def png(seed: int) -> str:
  pixels = np.random.default_rng(seed).integers(0, 255, (8, 8, 3), np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return base64.b64encode(buf.getvalue()).decode()


def layout(name: str) -> list[dict]:
  """Three to four rows of ``name``'s columns."""
  mc = lambda i, **kw: {"index": i, "image": png(i), "question": "Which?", "A": "red",
                        "B": "blue", "answer": "A", "category": "color", **kw}
  if name == "MMBench_DEV_EN_V11":
    return [mc(1, hint="Look.", split="dev", **{"l2-category": "coarse_perception"}),
            mc(1000001, image="1", A="blue", B="red", answer="B", hint="Look.", split="dev",
               **{"l2-category": "coarse_perception"}),
            mc(2, hint="nan", split="dev", **{"l2-category": "logic_reasoning"})]
  if name in ("MMStar", "AI2D_TEST"):
    return [mc(1), mc(2, answer="B"), mc(3)]
  if name == "MMMU_DEV_VAL":
    return [mc(1, split="dev", question="<image 2> and <image 1>: which?",
               image=repr([png(1), png(2)])),
            mc(2, split="validation", A="nan", B="nan", answer="14", question="How many?"),
            mc(3, split="validation", image=repr([png(3), png(4)]), question="Compare.")]
  if name == "HallusionBench":
    return [{"index": f"VD_figure_0_0_{f}_{q}", "image": png(f), "question": "Is it red?",
             "answer": "Yes", "category": "VD", "l2-category": "VD_figure"}
            for f in range(2) for q in range(2)]
  if name == "OCRBench":
    return [{"index": i, "image": png(i), "question": "Read it.", "answer": "['ab']",
             "category": c} for i, c in enumerate(["Regular Text Recognition",
                                                    "Doc-oriented VQA"])]
  if name == "MathVista_MINI":
    return [{"index": 1, "image": png(1), "question": "Hint: ...\nQuestion: How many?",
             "answer": "3", "question_type": "free_form", "answer_type": "integer",
             "choices": "nan", "task": "counting", "skills": "['arithmetic reasoning']"},
            {"index": 2, "image": png(2), "question": "Which?", "answer": "red",
             "question_type": "multi_choice", "answer_type": "text",
             "choices": "['red', 'blue']", "answer_option": "A", "task": "fqa",
             "skills": "['logical reasoning']"}]
  return [{"index": 1, "image": png(1), "question": "What is it?", "answer": "a cat",
           "category": "rec"}]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("model"))
  config = tiny_spec(eval__token_counts=(16, 64), eval__batch_size=8,
                     eval__max_prompt_length=96)
  tokenizer = run_tokenizer.prepare(config, workdir)
  model = VLM(model_config.vlm_config(config, tokenizer))
  image = normalize_image(np.zeros((1, config.data.image_size, config.data.image_size, 3),
                                   np.uint8))
  prompt = np.array([tokenizer.prompt_ids("x")], np.int32)
  params = model.init(jax.random.key(0), image, prompt, 16)["params"]
  return config, tokenizer, model, params


@pytest.mark.parametrize("name", benchmark_set.benchmarks.BENCHMARKS)
def test_each_layout_is_evaluated_written_and_rescored(name, tiny_model, tmp_path):
  config, tokenizer, model, params = tiny_model
  rows = layout(name)
  data = write_tsv(tmp_path / f"{name}.tsv", rows)
  config = specs.replace(config, eval__suite="vlmeval", eval__data_path=data)
  bench = benchmark_set.BenchmarkSet(data, "", tokenizer, config.data.image_size, True)
  assert len(bench.prompt_ids) == len(rows)
  if name == "MMMU_DEV_VAL":
    # Row 1's markers put its second image (png 2, decoded first) before its first; row
    # 2's image is the same picture (decoded once); row 3 has no markers: both, in order.
    np.testing.assert_array_equal(bench.image_index, [[0, 1], [0, -1], [2, 3]])
    assert [ids.count(model.config.image_token_id) for ids in bench.prompt_ids] == [2, 1, 2]
  if name == "MMBench_DEV_EN_V11":  # the copy shares its question's image
    assert bench.image_index[:, 0].tolist() == [0, 0, 1]
  mesh, rules = sharding.mesh_from_config(config)
  results = evaluator.evaluate(model, params, tokenizer, config, mesh, rules, step=7)
  assert results["benchmark"] == name
  out = outputs.save(str(tmp_path / "eval"), name, results, "eval", overwrite=False)
  for n in ("16", "64"):
    table = os.path.join(out, f"predictions_{n}.tsv")
    with open(table, encoding="utf-8") as f:
      header = f.readline().rstrip("\n").split("\t")
    assert header[-1] == "prediction" and "image" not in header
    figures = results["results"][n]["benchmark"]
    assert score_files(data, table) == figures
  assert not os.path.exists(os.path.join(out, "predictions.tsv"))


def test_an_mmmu_marker_without_its_image_names_the_file_and_index(tiny_model, tmp_path):
  config, tokenizer, _, _ = tiny_model
  rows = layout("MMMU_DEV_VAL")[1:]
  rows[0] = dict(rows[0], question="<image 2> counts how many?")  # one image only
  data = write_tsv(tmp_path / "MMMU_DEV_VAL.tsv", rows)
  with pytest.raises(InputError, match=rf"^{re.escape(data)}: index 2: .*<image 2>"):
    benchmark_set.BenchmarkSet(data, "", tokenizer, config.data.image_size, True)
