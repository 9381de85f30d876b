"""Starting JAX's multi-controller runtime (`jax.distributed`) when a job spans processes.

One program runs in every process (one per host, or several per host in tests); after
`jax.distributed.initialize` each sees all devices of the job, and the same jitted step runs
everywhere. Entry points call `initialize` before anything touches JAX devices:

    explicit   distributed.coordinator_address / num_processes / process_id (any cluster, and
               launch/local_multiprocess.sh on one machine)
    detected   TPU VM slices and SLURM jobs: jax.distributed.initialize() finds its peers itself
    neither    a single process: nothing to do
"""

import os

import jax
from absl import logging

from t5x_like.core.errors import UserError


def _detected_cluster() -> str | None:
    """The multi-process environment JAX can configure itself from, if any."""
    if len(os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",")) > 1:
        return "TPU slice"
    if int(os.environ.get("SLURM_NTASKS", "1") or 1) > 1 and "SLURM_JOB_ID" in os.environ:
        return "SLURM"
    return None


def initialize(dist_cfg) -> None:
    if dist_cfg.coordinator_address:
        kwargs = dict(coordinator_address=dist_cfg.coordinator_address,
                      num_processes=dist_cfg.num_processes, process_id=dist_cfg.process_id,
                      initialization_timeout=dist_cfg.initialization_timeout)
        where = f"coordinator {dist_cfg.coordinator_address}"
    else:
        cluster = _detected_cluster()
        if cluster is None:
            return
        kwargs, where = dict(initialization_timeout=dist_cfg.initialization_timeout), cluster
    try:
        jax.distributed.initialize(**kwargs)
    except Exception as e:  # connection refused, timeout, mismatched process counts
        raise UserError(f"jax.distributed could not start ({where}): {type(e).__name__}: "
                        f"{str(e).splitlines()[0]}; check that every process was started with "
                        "the same coordinator and process count.") from None
    logging.info("jax.distributed: process %d of %d (%s), %d local / %d global devices",
                 jax.process_index(), jax.process_count(), where, jax.local_device_count(),
                 jax.device_count())
