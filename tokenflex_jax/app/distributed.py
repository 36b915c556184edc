"""Multi-process start-up: `jax.distributed.initialize` when the run spans several hosts.

Three ways a run learns that it is one of several processes:
  * explicit flags (``--coordinator_address=HOST:PORT --num_processes=N --process_id=I``),
    used by ``launch/hosts.sh`` and by the tests (several processes on 127.0.0.1);
  * a Cloud TPU pod slice (``TPU_WORKER_HOSTNAMES`` lists more than one worker);
  * a SLURM job with more than one task (``SLURM_NTASKS`` > 1), or an Open MPI launch.
In the last two JAX finds the coordinator itself (``jax.distributed.initialize()`` with
no arguments). Otherwise the run is single-process and nothing is initialised.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import jax
from absl import logging


def detect_cluster(environ: Mapping[str, str] = os.environ) -> str | None:
  """Names the multi-process environment JAX can bootstrap from, or None."""
  workers = [h for h in environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
  if len(workers) > 1:
    return "tpu_pod"
  if "SLURM_JOB_ID" in environ and int(environ.get("SLURM_NTASKS", "1")) > 1:
    return "slurm"
  if int(environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "openmpi"
  return None


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None,
               environ: Mapping[str, str] = os.environ) -> str | None:
  """Initialises JAX's multi-process runtime if this run needs it.

  Call before any other JAX use. Returns how it was initialised ("flags", "tpu_pod",
  "slurm", "openmpi") or None for a single-process run.
  """
  if coordinator_address:
    if num_processes is None or process_id is None:
      raise ValueError("--coordinator_address needs --num_processes and --process_id")
    if not 0 <= process_id < num_processes:
      raise ValueError(f"--process_id={process_id} is not in [0, {num_processes})")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
    how = "flags"
  else:
    if num_processes is not None or process_id is not None:
      raise ValueError("--num_processes/--process_id need --coordinator_address")
    how = detect_cluster(environ)
    if how is None:
      return None
    jax.distributed.initialize()
  logging.info("jax.distributed (%s): process %d of %d, %d local / %d global devices", how,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count())
  return how
