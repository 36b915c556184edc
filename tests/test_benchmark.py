"""The step-timing binary (tokenflex_jax.bench) measures every bucket and writes its figures."""

import json
import os

from tests.tiny import tiny_config
from tokenflex_jax.bench import benchmark


def test_benchmark_reports_every_bucket(tmp_path, capsys):
  config = tiny_config(batch_size=8)
  results = benchmark(config, str(tmp_path))
  assert set(results) == set(config.token_counts)
  for r in results.values():
    assert r["step_s"] > 0 and r["gflop_per_step"] > 0 and r["xla_gflop_per_step"] > 0
    assert 0 < r["mfu"] < 2
    assert r["examples_per_s"] == config.batch_size / r["step_s"]
  # More visual tokens, more work per step.
  flops = [results[n]["gflop_per_step"] for n in sorted(results)]
  assert flops == sorted(flops) and flops[0] < flops[-1]
  with open(os.path.join(tmp_path, "benchmark.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert set(saved["results"]) == {str(n) for n in config.token_counts}
  assert saved["roofline_gflops"]["float32"] > 0 and saved["roofline_gflops"]["bfloat16"] > 0
  table = capsys.readouterr().out
  assert all(f"| {n} |" in table for n in config.token_counts)
