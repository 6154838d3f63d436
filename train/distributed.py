"""Joining several processes (hosts) into one JAX run through ``jax.distributed.initialize``.

A process joins when ``JAX_COORDINATOR_ADDRESS`` (``host:port`` of process 0) is set, with the
process count and its own index from ``JAX_NUM_PROCESSES`` and ``JAX_PROCESS_ID``, or, when
those are not set, from the cluster JAX detects (Slurm, Open MPI, Kubernetes, Cloud TPU). With
``auto`` (``xformers-zoo train --distributed``) a process joins from the detected cluster alone.
Otherwise it runs on its own host's devices.
"""

from __future__ import annotations

import logging
import os

import jax

log = logging.getLogger("xformers_zoo.train")

ADDRESS, COUNT, INDEX = "JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or not value.strip():
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"{name}={value!r} is not an integer") from None


def initialize_distributed(auto: bool = False) -> bool:
    """Joins the multi-process run the environment describes (see the module docstring);
    returns whether it did. Call it before anything else touches JAX's devices."""
    address = os.environ.get(ADDRESS) or None
    count, index = _env_int(COUNT), _env_int(INDEX)
    if address is None and not auto:
        if count is not None or index is not None:
            raise ValueError(f"{COUNT} or {INDEX} is set without {ADDRESS}: set all three "
                             "(the coordinator is process 0's host:port) to train on several "
                             "hosts, or none")
        return False
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=count,
                                   process_id=index)
    except ValueError as e:  # JAX names the one missing value; say which variables give it
        raise ValueError(f"cannot join the multi-process run ({e}): set {ADDRESS}=host:port "
                         f"of process 0, {COUNT} and {INDEX}, or launch under a cluster "
                         "manager JAX detects (srun, mpirun)") from None
    log.info("process %d of %d; %d local and %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())
    return True


def is_primary() -> bool:
    """Whether this process writes the run's shared files (metrics, config, final results)."""
    return jax.process_index() == 0
