"""The paper config compiles from shapes alone on a 64-device host mesh (no weights)."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _aot(*flags):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  result = subprocess.run([sys.executable, "-m", "tokenflex_jax.aot", "--num_cpu_devices=64",
                           *flags], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=1200)
  assert result.returncode == 0, result.stderr[-3000:]
  return result.stdout


def _rows(stdout):
  rows = [line.split("|")[1:-1] for line in stdout.splitlines() if line.startswith("| ")]
  return {int(r[0]): [float(x) for x in r[1:]] for r in rows[1:]}


def test_paper_model_fits_a_16_gib_chip_at_every_bucket():
  """Every bucket of stage 3 of the full paper model (27 + 28 scanned layers) on 64
  devices: at most 16 GiB per device (a TPU v5e chip's HBM)."""
  out = _aot("--config=configs/paper.py:stage=3")
  assert "mesh {'data': 1, 'fsdp': 64, 'tensor': 1}" in out
  rows = _rows(out)
  assert sorted(rows) == [64, 144, 256]
  for n, (_, gflop, xla_gflop, args, temps, total) in rows.items():
    assert gflop > 0 and xla_gflop > 0 and args > 0 and temps > 0 and total >= args, n
    assert total <= 16.0, (n, total)
  # More visual tokens, more work per step.
  assert rows[64][1] < rows[144][1] < rows[256][1]
