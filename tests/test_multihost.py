"""Real multi-process JAX on 127.0.0.1: every host draws the same bucket at every step."""

import json
import os
import socket
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_bucket_choice_identical_across_processes(tmp_path):
  out, port, n = str(tmp_path / "draws.json"), free_port(), 2
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  procs = [subprocess.Popen([sys.executable, "-m", "tests.multihost_buckets_worker", str(i),
                             str(n), str(port), out], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
           for i in range(n)]
  logs = [p.communicate(timeout=300)[0] for p in procs]
  assert all(p.returncode == 0 for p in procs), "\n".join(log[-2000:] for log in logs)
  with open(out, encoding="utf-8") as f:
    result = json.load(f)
  assert result["process_count"] == n and result["device_count"] == 4 * n
  draws = result["draws"]
  assert len(draws) == n and draws[0] == draws[1]
  assert set(draws[0]) == {64, 144, 256}  # A real mixture, not one constant bucket.
