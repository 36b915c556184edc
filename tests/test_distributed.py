"""Multi-process start-up decisions (the real multi-process runs are in test_multihost)."""

import pytest

from tokenflex_jax.app import distributed


@pytest.mark.parametrize("environ, expected", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1k-w-0"}, None),                  # a single-host slice
    ({"TPU_WORKER_HOSTNAMES": "w-0,w-1,w-2,w-3"}, "tpu_pod"),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, None),          # one task: single process
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, "slurm"),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "openmpi"),
])
def test_detect_cluster(environ, expected):
  assert distributed.detect_cluster(environ) == expected


def test_single_process_run_initialises_nothing():
  assert distributed.initialize(environ={}) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(coordinator_address="127.0.0.1:1234"), "needs --num_processes and --process_id"),
    (dict(coordinator_address="127.0.0.1:1234", num_processes=2, process_id=2),
     r"--process_id=2 is not in \[0, 2\)"),
    (dict(num_processes=2, process_id=0), "need --coordinator_address"),
])
def test_inconsistent_flags_are_rejected(kwargs, message):
  with pytest.raises(ValueError, match=message):
    distributed.initialize(environ={}, **kwargs)
