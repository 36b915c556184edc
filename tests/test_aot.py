"""The paper config compiles from shapes alone on a 64-device host mesh (no weights), and
a small VLM for a TPU topology with the TPU compiler (libtpu) on this host."""

import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot(*flags, target="--num_cpu_devices=64"):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "tokenflex_jax.aot", target, *flags],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _rows(stdout):
  rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ")]
  return {int(r[0]): [float(x) for x in r[1:7]] for r in rows[1:]}  # no roofline off a TPU


def test_paper_model_fits_a_16_gib_chip_at_every_bucket():
  """Every bucket of stage 3 of the full paper model (27 + 28 scanned layers) on 64
  devices: at most 16 GiB per device (a TPU v5e chip's HBM)."""
  out = _aot("--config=configs/paper.py:stage=3")
  assert "mesh {'data': 1, 'fsdp': 64, 'tensor': 1} of cpu; attention blocked" in out
  assert all(line.endswith("| - |") for line in out.splitlines() if line.startswith("| 64 "))
  rows = _rows(out)
  assert sorted(rows) == [64, 144, 256]
  for n, (_, gflop, xla_gflop, args, temps, total) in rows.items():
    assert gflop > 0 and xla_gflop > 0 and args > 0 and temps > 0 and total >= args, n
    assert total <= 16.0, (n, total)
  # More visual tokens, more work per step.
  assert rows[64][1] < rows[144][1] < rows[256][1]


def test_a_tpu_topology_is_compiled_by_the_tpu_compiler_with_splash(tmp_path):
  """--topology=v5e:2x2 from this CPU host: the target's devices make the mesh, "auto"
  attention is splash, lowered by Mosaic into the TPU program (its kernel calls counted),
  and the JSON holds the TPU compiler's memory, FLOPs, bytes and the roofline bound."""
  out = tmp_path / "aot.json"
  stdout = _aot("--config=configs/demo.py", "--config.token_counts=(64,)",
                "--config.token_probs=(1.0,)", f"--json_out={out}", target="--topology=v5e:2x2")
  assert "mesh {'data': 4, 'fsdp': 1, 'tensor': 1} of TPU v5 lite; attention splash" in stdout
  with open(out, encoding="utf-8") as f:
    r = json.load(f)["64"]
  for key in ("total_gib", "compile_s", "flops", "bytes_accessed", "roofline_step_s"):
    assert r[key] > 0, (key, r)
  assert r["tpu_kernels"] > 0  # splash's kernels, in the ViT's and the decoder's layers
  assert r["roofline_step_s"] == max(r["flops"] / 197e12, r["bytes_accessed"] / 819e9)
  assert r["total_gib"] == max(r["argument_gib"], r["output_gib"]) + r["temp_gib"]


def test_an_unknown_topology_is_one_line():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "tokenflex_jax.aot", "--topology=v5e:3x5x9",
                           "--config=configs/demo.py"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith("error: --topology=v5e:3x5x9: ")
