"""One of N processes for tests/test_multihost.py: draw buckets, gather every host's draw.

  python -m tests.multihost_buckets_worker PROCESS_ID NUM_PROCESSES PORT OUT_JSON
"""

import json
import random
import sys

import jax
import numpy as np
from jax.experimental import multihost_utils

from tokenflex_jax.training.buckets import token_count_for_step

STEPS = 300


def main(process_id: int, num_processes: int, port: int, out: str) -> None:
  jax.config.update("jax_num_cpu_devices", 4)
  jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}",
                             num_processes=num_processes, process_id=process_id)
  # Host-local randomness differs on purpose: the draw must not depend on it.
  np.random.seed(1000 + process_id)
  random.seed(process_id)
  np.random.random(17 * (process_id + 1))
  local = np.asarray([token_count_for_step(0, s, (64, 144, 256), (0.2, 0.3, 0.5))
                      for s in range(STEPS)], np.int32)
  gathered = np.asarray(multihost_utils.process_allgather(local))  # [processes, STEPS]
  if jax.process_index() == 0:
    with open(out, "w", encoding="utf-8") as f:
      json.dump({"process_count": jax.process_count(), "device_count": jax.device_count(),
                 "draws": gathered.tolist()}, f)
  jax.distributed.shutdown()


if __name__ == "__main__":
  main(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
