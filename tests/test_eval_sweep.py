"""The evaluation sweep (ViT once per image for every count, prompts cut to their length
bucket) gives the predictions of greedy decoding per count from full-length prompts."""

import jax
import numpy as np

from tests.tiny import tiny_spec
from tokenflex_jax import model_config, sharding
from tokenflex_jax.app import run_tokenizer
from tokenflex_jax.data.pipeline import normalize_image
from tokenflex_jax.evaluation import evaluator
from tokenflex_jax.evaluation.generate import make_generate
from tokenflex_jax.models.vlm import VLM


def test_prompt_buckets_are_powers_of_two_within_the_prompt():
  pad = 0
  prompts = np.zeros((4, 40), np.int32)
  for i, length in enumerate([3, 16, 17, 40]):
    prompts[i, 40 - length:] = 5
  np.testing.assert_array_equal(evaluator.prompt_buckets(prompts, pad), [16, 16, 32, 40])


def test_sweep_predictions_equal_per_count_decoding(tmp_path):
  config = tiny_spec(eval__batch_size=8, eval__examples_per_family=3,
                     eval__token_counts=(16, 64))
  tokenizer = run_tokenizer.prepare(config, str(tmp_path))
  model = VLM(model_config.vlm_config(config, tokenizer))
  data = evaluator.eval_set(config, tokenizer)
  data.prompts[::3, :-2] = tokenizer.pad_id  # some short prompts: other length buckets
  params = model.init(jax.random.key(0), normalize_image(data.images[:1]),
                      data.prompts[:1], 16)["params"]
  mesh, rules = sharding.mesh_from_config(config)
  generate = make_generate(model, config.eval.max_new_tokens, tokenizer.eos_id,
                           tokenizer.pad_id)
  predictor = evaluator.Predictor(model, generate, mesh, rules)
  ids, confidence, seconds = evaluator._predict_all(  # pylint: disable=protected-access
      predictor, params, data, 8, (16, 64), tokenizer.pad_id, mesh)
  images = normalize_image(data.images[data.image_index])
  for n in (16, 64):
    want, want_conf = jax.jit(lambda p, i, t, n=n: generate(p, i, t, n))(
        params, images, data.prompts)
    assert ids[n] == np.asarray(want).tolist()
    np.testing.assert_allclose(confidence[n], want_conf, rtol=1e-5, atol=1e-6)
    assert seconds[n] > 0
  assert set(predictor.compile_s) == {0, 16, 64}
