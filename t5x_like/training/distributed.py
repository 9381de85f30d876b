"""Starting JAX's multi-controller runtime (`jax.distributed`) when a job spans processes.

One program runs in every process (one per host, or several per host in tests); after
`jax.distributed.initialize` each sees all devices of the job, and the same jitted step runs
everywhere. Entry points call `initialize` before anything touches JAX devices:

    explicit   distributed.coordinator_address / num_processes / process_id (any cluster, and
               launch/local_multiprocess.sh on one machine)
    detected   TPU VM slices and SLURM jobs: jax.distributed.initialize() finds its peers itself
    neither    a single process: nothing to do

The rest are the few things a process does with its peers outside a jitted step: gather small
host values (`allgather_json`, `gather_rows`), and hold a copy of a global tree on its own
devices (`local_copy`), which is how RL samples on every process (training/tasks/rl.py).
"""

import json
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from t5x_like.core.errors import UserError
from t5x_like.modeling import partitioning


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


def allgather_json(obj) -> list:
    """JSON-serializable objects from every process, in process order (a collective: every
    process calls it)."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([len(data)], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:len(data)] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(gathered, sizes.ravel())]


def gather_rows(values) -> np.ndarray:
    """Every process's rows of a small host array [n_p, ...] (n_p may differ), concatenated in
    process order (a collective). Values travel as JSON: float32 round-trips exactly."""
    values = np.asarray(values)
    if jax.process_count() == 1:
        return values
    parts = allgather_json(values.tolist())
    return np.concatenate([np.asarray(p, values.dtype).reshape(-1, *values.shape[1:])
                           for p in parts])


def local_mesh(mesh):
    """The mesh a process runs work of its own on (RL's sampling host loop, which the global
    mesh cannot run: every process would have to take the same steps): `mesh` itself when it
    is all this process's, else one over this process's devices, all on the data axis."""
    if jax.process_count() == 1:
        return mesh
    return partitioning.make_mesh({"data": -1}, jax.local_devices())


def local_copy(tree, mesh, local):
    """A global tree (sharded over `mesh`, maybe across processes) -> the same values on the
    devices of `local` (local_mesh(mesh)): unchanged when that is `mesh`, else replicated on
    each of this process's devices (for a model: its whole parameters on each). A collective:
    every process calls it."""
    if local is mesh:
        return tree
    everywhere = jax.jit(lambda t: t, out_shardings=partitioning.replicated(mesh))(tree)
    sharding = partitioning.replicated(local)

    def one(x):
        by_device = {s.device: s.data for s in x.addressable_shards}
        return jax.make_array_from_single_device_arrays(
            x.shape, sharding, [by_device[d] for d in local.devices.flat])
    return jax.tree.map(one, everywhere)
