"""The equal-compute baselines of configs/reproduce.py spend TokenFLEX's training FLOPs."""

import pytest

from configs import reproduce
from tokenflex_jax.app import config_schema
from tokenflex_jax.data import tokenizer as tok_lib
from tokenflex_jax.studies import equal_compute


def _spec(model: str, stage: int, suite: str = "v2"):
  return config_schema.to_spec(reproduce.get_config(f"model={model},seed=0,stage={stage},"
                                                    f"suite={suite}"))


@pytest.mark.parametrize("stage", [1, 2])
def test_the_configs_steps_match_tokenflexs_flops(tmp_path, stage):
  tok = tok_lib.ensure_tokenizer(str(tmp_path / "t.model"), reproduce.SUITES["v2"][0])
  reference = _spec("tokenflex", stage)
  for name, steps in reproduce.EQUAL_COMPUTE_STEPS.items():
    fixed = _spec(name, stage)
    assert fixed.total_steps == steps[stage] == equal_compute.matched_steps(reference, fixed, tok)
    spent = fixed.total_steps * equal_compute.step_flops(fixed, tok, fixed.token_counts[0])
    wanted = reference.total_steps * equal_compute.mean_step_flops(reference, tok)
    assert spent == pytest.approx(wanted, rel=2e-3)  # to the step
    # More steps than TokenFLEX: its mean count (183) is above 64 and 144.
    assert fixed.total_steps > reference.total_steps
  with pytest.raises(ValueError, match="not one count"):
    equal_compute.matched_steps(reference, reference, tok)
