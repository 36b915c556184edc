"""The prepared GPU check (launch/gpu_check.sh, tokenflex_jax.gpu_check): its dry run on
this CPU end to end, its report of a GPU's figures, its wheel list, and the GPU bench
config's FLOP shares against the paper model's."""

import json
import os
import re
import subprocess

import jax
import pytest

from configs import gpu_bench, paper
from tests.xla_env import REPO, xla_flags
from tokenflex_jax import model_config
from tokenflex_jax.app import config_schema
from tokenflex_jax.benchmarking import gpu, suite
from tokenflex_jax.models import flops
from tokenflex_jax.models.vlm import VLM


def test_dry_run_measures_every_section_and_prints_the_gpu_table(tmp_path):
  # One device, as on the lent machine (not the suite's 8 host devices).
  env = dict(os.environ, XLA_FLAGS=xla_flags())
  result = subprocess.run(["bash", os.path.join(REPO, "launch", "gpu_check.sh"), "--dry",
                           f"--out={tmp_path}"], capture_output=True, text=True, timeout=600,
                          env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  with open(tmp_path / "gpu.json", encoding="utf-8") as f:
    r = json.load(f)
  assert r["dry"] is True
  failed = {name: s["error"] for name, s in r.items() if isinstance(s, dict) and "error" in s}
  assert not failed
  # The versions it ran with, printed first.
  assert r["versions"]["jax"] == jax.__version__ and r["versions"]["backend"] == "cpu"
  first = result.stdout.splitlines()[0]
  assert first.startswith("GPU check on 1 x cpu") and f"jax {jax.__version__}" in first
  assert r["matmul"]["bf16_tflops"] > 0
  # Attention: the xla implementation (cuDNN's place on a GPU) against the float32
  # reference, the mask as structure (right padding) and dense (left), within bf16's
  # tolerances; timed; no cuDNN call off a GPU.
  for name in ("reference_bf16", "xla"):
    row = r["attention"][name]
    for padding in ("right", "left"):
      assert row[padding]["ok"] and row[padding]["value"] < gpu.VALUE_TOLERANCE, row
    assert row["fwd_bwd_ms"] > 0 and row["calls_cudnn"] is False
  assert re.search(r"^\| xla \| [0-9.e-]+ / [0-9.e-]+ \| [0-9.e-]+ / [0-9.e-]+ \| [0-9.]+ "
                   r"\| False \| True \|$", result.stdout, re.M)
  # The bench: every bucket, the peer from our parameters (bf16 autocast), decoding.
  bench = r["bench"]
  assert list(bench["buckets"]) == ["64", "144", "256"] and "peer_error" not in bench
  assert bench["compute_dtype"] == "bfloat16" and bench["peer_device"] == "cpu"
  for n, b in bench["buckets"].items():
    assert b["step_s"] > 0 and b["peer_step_s"] > 0 and b["compiled_gib"] > 0
    assert abs(b["peer_loss"] - b["loss"]) < 2e-2 * abs(b["loss"]), b
    assert re.search(rf"^\| {n} \| [0-9.]+ \| ", result.stdout, re.M)
  assert bench["generation"]["same_ids"] and "mix_vs_fixed256" in bench
  assert (tmp_path / "gpu.md").read_text().strip() in result.stdout
  assert sorted(os.listdir(tmp_path)) == ["gpu.json", "gpu.md"]


def test_a_failing_section_is_recorded_and_the_next_runs():
  results, saved = {}, []

  def broken(into):
    into["partial"] = 1
    raise RuntimeError("no cuDNN here")

  gpu.run_sections({"a": broken, "b": lambda into: into.update(x=2)}, results,
                   lambda: saved.append(json.dumps(results, sort_keys=True)))
  assert results["a"]["error"] == "RuntimeError: no cuDNN here" and results["a"]["partial"] == 1
  assert results["b"]["x"] == 2 and len(saved) == 2 and '"error"' in saved[0]
  assert "- section a FAILED: RuntimeError: no cuDNN here" in gpu.markdown(results)


def test_the_report_of_a_gpu_run_gives_mfu_against_both_rates():
  bucket = dict(step_s=0.5, gflop_per_step=300_000.0, compiled_gib=40.0, peak_gib=60.0,
                compile_s=50.0, peer_step_s=0.75, speedup_vs_peer=1.5, loss=5.0,
                peer_loss=5.01)
  r = {"versions": {"device_kind": "NVIDIA H200", "device_count": 1, "backend": "gpu",
                    "jax": "0.11.2"},
       "matmul": {"size": 8192, "bf16_tflops": 750.0},
       "bench": {"batch_size": 4, "text_length": 1024, "compute_dtype": "bfloat16",
                 "remat_policy": "dots", "scan_layers": True,
                 "roofline_gflops": {"float32": 50e3, "bfloat16": 750e3},
                 "buckets": {"64": {**bucket, "loss": None, "peer_loss": None},
                             "256": bucket}, "mix": {"256": 1.0}, "mix_vs_fixed256": 1.0,
                 "peer_device": "cuda"}}
  for key in ("loss", "peer_loss"):  # the first losses compared at the largest bucket only
    del r["bench"]["buckets"]["64"][key]
  text = gpu.markdown(r)
  # 300 TFLOP in 0.5 s: 600 TFLOP/s, 0.80 of the measured 750 and 0.61 of the 989.4
  # published for an H200.
  assert "| 256 | 500.0 | 300.00 | 600 | 0.80 | 0.61 | 40.0 | 60.0 | 50 | 750.0 | 1.50 |" in text
  assert "750 TFLOP/s measured, 989 published" in text
  assert "first losses differ by at most 1.0e-02" in text
  # The bench section failed (cuDNN, say) and its XLA-attention rerun measured: its table.
  r["bench_xla"], r["bench"] = r["bench"], {"error": "XlaRuntimeError: cuDNN"}
  text = gpu.markdown(r)
  assert "- section bench FAILED: XlaRuntimeError: cuDNN" in text
  assert "bench_xla: train step, batch 4, text 1024" in text and "| 256 | 500.0 |" in text
  assert gpu.spec_of("NVIDIA H100 80GB HBM3") == gpu.GPU_SPECS["H100"]
  assert gpu.spec_of("cpu") is None


def test_a_failing_peer_is_recorded_when_allowed_and_raised_otherwise():
  def fail():
    raise RuntimeError("CUDA out of memory")
  out = {}
  assert suite._peer_attempt(out, suite.Options(peer_failure_ok=True), "timing", fail) is None
  assert out["peer_error"] == "timing: RuntimeError: CUDA out of memory"
  # Once failed, the peer is not called again.
  assert suite._peer_attempt(out, suite.Options(peer_failure_ok=True), "x", lambda: 1) is None
  with pytest.raises(RuntimeError):
    suite._peer_attempt({}, suite.Options(), "timing", fail)


def test_wheel_list_pins_what_the_suite_runs():
  def pins(path):
    with open(os.path.join(REPO, path), encoding="utf-8") as f:
      return dict(line.strip().split("==") for line in f
                  if line.strip() and not line.startswith("#"))
  wheels, ours = pins("launch/gpu_wheels.txt"), pins("requirements.txt")
  assert {"grain", "ml_collections", "flax", "optax", "orbax-checkpoint"} <= set(wheels)
  for name, version in wheels.items():
    assert ours.get(name, version) == version, name
  with open(os.path.join(REPO, "launch", "gpu_check.sh"), encoding="utf-8") as f:
    script = f.read()
  assert "--target /tmp/site .whl/*.whl" in script and "gpu_wheels.sh" in script


def _vit_shares(config):
  config = config_schema.to_spec(config)
  cfg = model_config.vlm_config(config, model_config.FixedTokenIds(config.model.llm.vocab_size))
  shares = []
  for n in config.token_counts:
    t = config.data.max_text_length
    forwards = {"vit": flops.vit_forward(cfg.vit),
                "projector": flops.projector_forward(cfg.projector, cfg.vit, cfg.llm.width, n),
                "llm": flops.llm_forward(cfg.llm, t - 1 + n, t)}
    total = flops.train_flops(forwards, {"vit": True, "projector": True, "llm": True})
    vit = flops.train_flops({"vit": forwards["vit"]}, {"vit": True})
    shares.append(100 * vit / total)
  return shares


def test_gpu_bench_configs_have_the_paper_models_flop_shares_and_size():
  want = _vit_shares(paper.get_config("3"))
  assert [round(s, 1) for s in want] == [4.1, 3.9, 3.5]
  for size, tolerance in (("1b", 0.1), ("cpu", 0.3)):
    got = _vit_shares(gpu_bench.get_config(f"size={size}"))
    assert max(abs(a - b) for a, b in zip(got, want)) < tolerance, (size, got, want)
  config = gpu_bench.get_config("size=1b")
  assert config.model.llm.dtype == config.model.vit.dtype == "bfloat16"
  assert config.data.max_text_length == 1024 and tuple(config.token_counts) == (64, 144, 256)
  # ~1.6B float32 master weights (the shapes alone: nothing is allocated).
  model = VLM(model_config.vlm_config(config_schema.to_spec(config),
                                      model_config.FixedTokenIds(151_936)))
  shapes = jax.eval_shape(lambda image, tokens: model.init(jax.random.key(0), image, tokens, 64),
                          jax.ShapeDtypeStruct((1, 384, 384, 3), "float32"),
                          jax.ShapeDtypeStruct((1, 16), "int32"))
  leaves = jax.tree.leaves(shapes)
  assert {leaf.dtype for leaf in leaves} == {jax.numpy.dtype("float32")}
  assert 1.5e9 < sum(leaf.size for leaf in leaves) < 1.8e9
