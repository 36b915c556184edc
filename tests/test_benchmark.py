"""The benchmark (tokenflex_jax.bench): every figure of its report, on a tiny model."""

import json
import os

import pytest

from tests.tiny import tiny_spec
from tokenflex_jax.benchmarking import real_data, report, suite

# The PyTorch peer has the paper's projector and one position per visual token.
PEER_MODEL = dict(model__projector__position_embedding=False, model__visual_position_span=0,
                  model__llm__qkv_bias=True, mesh__shape=(-1, 1, 1))


def test_benchmark_reports_every_figure(tmp_path):
  # Two buckets keep the compiles (each bucket: ours in both layer layouts, the loss, and
  # the two decoders at the largest) within the suite's budget.
  config = tiny_spec(token_counts=(64, 256), token_probs=(0.4, 0.6), **PEER_MODEL)
  options = suite.Options(rounds=2, steps_per_round=1, warmup=1, new_tokens=4,
                          pipeline_batches=2, profile=True, real_data=False)
  r = suite.benchmark(config, str(tmp_path), options)
  counts = [str(n) for n in sorted(config.token_counts)]
  assert list(r["buckets"]) == counts
  for b in r["buckets"].values():
    assert b["step_spread_s"][0] <= b["step_s"] <= b["step_spread_s"][1]
    assert 0 < b["mfu"] < 2 and b["gflop_per_step"] > 0 and b["xla_gflop_per_step"] > 0
    assert b["examples_per_s"] == config.batch_size / b["step_s"]
    # The peer is the same model from the same parameters: the same first loss.
    assert abs(b["peer_loss"] - b["loss"]) < 1e-4 * abs(b["loss"]), b
    assert b["speedup_vs_peer"] == b["peer_step_s"] / b["step_s"] > 0
  # More visual tokens, more work per step.
  flops = [r["buckets"][n]["gflop_per_step"] for n in counts]
  assert flops == sorted(flops) and flops[0] < flops[-1]
  steps = {n: r["buckets"][n]["step_s"] for n in counts}
  assert r["mix_vs_fixed256"] == (0.4 * steps["64"] + 0.6 * steps["256"]) / steps["256"]
  assert r["pipeline_vs_consumption"] > 0
  # Decoding with the cache and recomputing the whole sequence give the same tokens.
  assert r["generation"]["same_ids"] and r["kv_cache_speedup"] > 0
  assert set(r["layouts"]) == {"scanned", "unrolled"}
  for layout in r["layouts"].values():
    assert set(layout["compile_s"]) == set(counts) and min(layout["step_s"].values()) > 0

  # The profile: the largest bucket's trace on disk, its time per op and group.
  prof = r["profile"]
  assert prof["bucket"] == 256 and list(tmp_path.glob("profile/**/*perfetto_trace.json.gz"))
  assert prof["groups_ms"]["matmul"] > 0 and prof["top_ops"]
  assert sum(prof["groups_ms"].values()) >= max(o["ms"] for o in prof["top_ops"]) > 0
  # Matmul time traced back to its JAX source (which ops make the top 15 varies with
  # the machine's timing, so the whole trace is asked, not the top).
  assert 0 < prof["sourced_ms"].get("matmul", 0) <= prof["groups_ms"]["matmul"] + 1e-9
  # How the threads spent it: every thread's op time within its busy time, within the wall.
  t = prof["threads"]
  assert t["per_thread"] and t["op_parallelism"] > 0
  for thread in t["per_thread"]:
    assert 0 < thread["ops_ms"] <= thread["busy_ms"] * 1.001 <= t["wall_ms"] * 1.001

  table = report.write(r, str(tmp_path))
  with open(os.path.join(tmp_path, "bench.json"), encoding="utf-8") as f:
    saved = json.load(f)
  for key in ("roofline_gflops", "buckets", "mix_vs_fixed256", "pipeline_vs_consumption",
              "kv_cache_speedup", "compile_s"):
    assert key in saved
  assert saved["roofline_gflops"]["float32"] > 0 and saved["roofline_gflops"]["bfloat16"] > 0
  assert set(saved["compile_s"]) == set(counts)
  assert all(f"| {n} |" in table for n in counts)
  assert (tmp_path / "bench.md").read_text().startswith("train step, batch 8")
  assert "profile of the 256-token step" in table and "thread-pool tasks" in table


def test_the_real_data_section(tmp_path):
  """Packed against padded rows and the peer's length-grouped batches on the same
  synthetic LLaVA rows, over an epoch: bench.json's real_data figures, packed rows
  fuller."""
  config = tiny_spec(token_counts=(16, 64), token_probs=(0.5, 0.5), **PEER_MODEL)
  opts = real_data.RealDataOptions(conversations=80, scale=0.1, padded_length=64,
                                   text_capacity=96, padded_rows=None, batches=2)
  d = real_data.measure(config, str(tmp_path), rounds=1, steps_per_round=2, warmup=1,
                        peer=True, setup=suite.setup, torch_peer=suite.torch_peer(),
                        opts=opts)
  assert list(d["buckets"]) == ["16", "64"] and d["setup"]["packed"]["image_slots"] >= 1
  setup = d["setup"]
  assert setup["padded"]["epoch_batches"] == 80 // setup["padded"]["rows_per_batch"]
  assert 1 <= setup["packed"]["epoch_batches"] < setup["padded"]["epoch_batches"]
  assert setup["peer"]["epoch_batches"] == setup["padded"]["epoch_batches"]
  for b in d["buckets"].values():
    assert 0 < b["useful_share_padded"] < b["useful_share_packed"] <= 1
    assert b["packed_vs_padded"] == b["useful_tokens_per_s_packed"] / b[
        "useful_tokens_per_s_padded"] > 0
    assert b["packed_vs_peer"] == b["useful_tokens_per_s_packed"] / b[
        "useful_tokens_per_s_peer"] > 0
  table = report.real_data_markdown(d)
  assert "| 64 |" in table and "packed / peer" in table


def test_isolated_measurements(tmp_path):
  """The microbench (tokenflex_jax.microbench) on the tiny model: every line of its report,
  the two attentions' steps both timed."""
  from tokenflex_jax import errors
  from tokenflex_jax.benchmarking import micro
  config = tiny_spec(token_counts=(64,), token_probs=(1.0,))
  with pytest.raises(errors.ConfigError, match=r"--num_tokens=100 is not one of"):
    micro.main_report(config, str(tmp_path), 100)
  text = micro.main_report(config, str(tmp_path), 64)
  assert "1 independent in one call" in text and "2 independent in one call" in text
  assert "- reference:" in text and "- blocked:" in text
  assert "train step at 64 tokens, alternating rounds: reference" in text
  times = micro.step_ab(config, str(tmp_path), 64, ("reference", "blocked"), rounds=1,
                        steps_per_round=1, warmup=1)
  assert set(times) == {"reference", "blocked"} and min(times.values()) > 0


def test_timed_batches_spread_over_the_epoch():
  assert real_data.spread(10, 4) == [0, 3, 6, 9]
  assert real_data.spread(3, 6) == [0, 1, 2] and real_data.spread(7, 1) == [0]


def test_mfu_is_a_chips_share_on_accelerators_and_the_hosts_on_cpu_devices():
  """The roofline is measured on the first device: one chip of 8, or a host whose cores
  all 8 simulated CPU devices share."""
  from types import SimpleNamespace
  from tokenflex_jax.benchmarking import timing
  gpus = [SimpleNamespace(platform="gpu")] * 8
  cpus = [SimpleNamespace(platform="cpu")] * 8
  # 30 GFLOP per device in 1 s against a 1000 GFLOP/s roofline.
  assert timing.mfu(30e9, 1.0, 1000.0, gpus) == pytest.approx(0.03)
  assert timing.mfu(30e9, 1.0, 1000.0, cpus) == pytest.approx(0.24)
  assert timing.mfu(30e9, 1.0, 1000.0, cpus[:1]) == pytest.approx(0.03)
