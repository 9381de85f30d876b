"""Training batches across processes: logical data shards, one global batch per step.

The training data is split into `data.num_shards` logical shards (shard i reads records
i, i + S, i + 2S, ...), each with its own shuffled, packed iterator that yields batch_size / S
rows. Process p of P owns shards [p*S/P, (p+1)*S/P) and puts their rows side by side; the mesh
then sees one global batch. The data order depends on S only, never on how many processes
read it, so a run on 2 processes and a run on 1 process with S = 2 see identical batches, and
the iterator state is saved per shard (gathered into one JSON item of the checkpoint) so a
checkpoint resumes exactly on any process count that divides S.

Each step, `global_batch` turns this process's rows into the global batch the jitted step
takes; evaluation pads a short last batch with weight-0 rows (`pad_rows`) and sums a step's
statistics over a split (`sum_over_batches`) until every process has run out (`all_done`).
"""

from typing import Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from t5x_like.core.errors import UserError
from t5x_like.modeling import partitioning
from t5x_like.training import distributed


def local_shards(num_shards: int) -> list[int]:
    """The logical shards this process reads."""
    count, index = jax.process_count(), jax.process_index()
    if num_shards % count:
        raise UserError(f"config key 'data.num_shards': {num_shards} is not a multiple of the "
                        f"{count} processes; use a multiple (0 = one shard per process).")
    per = num_shards // count
    return list(range(index * per, (index + 1) * per))


class ShardedBatches:
    """This process's rows of each global batch, from its shards' iterators, in shard order."""

    def __init__(self, make_iterator: Callable[[int], Iterator[dict]], shards: list[int]):
        self.shards = shards
        self.iterators = {s: make_iterator(s) for s in shards}

    def __iter__(self):
        return self

    def __next__(self) -> dict:
        parts = [next(self.iterators[s]) for s in self.shards]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    def local_state(self) -> dict[str, dict]:
        return {str(s): self.iterators[s].get_state() for s in self.shards}

    def global_state(self) -> dict[str, dict]:
        """Every shard's iterator state, from all processes (a collective: all must call)."""
        return {k: v for part in distributed.allgather_json(self.local_state())
                for k, v in part.items()}

    def set_global_state(self, states: dict[str, dict]) -> None:
        missing = [s for s in self.shards if str(s) not in states]
        if missing:
            raise UserError(f"the checkpoint's data state has shards {sorted(states, key=int)}, "
                            f"not {missing}: data.num_shards changed since it was written; "
                            "keep it as it was to resume.")
        for s in self.shards:
            self.iterators[s].set_state(states[str(s)])


def check_batch(cfg, mesh) -> None:
    """data.batch_size and eval.batch_size against the mesh and the processes, and the
    micro-batches of optimizer.grad_accum_steps against the data-parallel size."""
    dp = partitioning.data_parallel_size(mesh)
    for key, size in (("data.batch_size", cfg.data.batch_size),
                      ("eval.batch_size", cfg.eval.batch_size)):
        if size % dp or size % jax.process_count():
            raise UserError(f"config key '{key}': {size} is not divisible by the data-parallel "
                            f"size {dp} (mesh.data x mesh.fsdp) and the {jax.process_count()} "
                            "processes; pick a multiple of both.")
    micro = cfg.data.batch_size // cfg.optimizer.grad_accum_steps
    if micro % dp:
        raise UserError(f"config key 'optimizer.grad_accum_steps': micro-batches of {micro} "
                        f"sequences do not divide over the data-parallel size {dp}.")


def global_batch(local: dict, mesh) -> dict:
    """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded on the mesh."""
    sharding = partitioning.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def pad_rows(local: dict | None, rows: int, template: dict) -> dict:
    """Pads a short evaluation batch (or stands in for a finished one) with weight-0 rows."""
    if local is None:
        return {k: np.zeros_like(v) for k, v in template.items()}
    n = len(next(iter(local.values())))
    return {k: np.pad(v, [(0, rows - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in local.items()}


def all_done(done: bool) -> bool:
    """Whether every process is done (a collective with several processes)."""
    if jax.process_count() == 1:
        return done
    return bool(np.all(multihost_utils.process_allgather(np.array(done))))


def sum_over_batches(step: Callable[[dict], dict], batches: Iterator[dict], template: dict, *,
                     max_steps: int, mesh) -> dict[str, float]:
    """Sums the host values of `step(global batch)` over `batches` (max_steps of them, 0 = all),
    each process feeding its own rows; `template` is one local batch of zeros (its shapes pad a
    short batch). Processes that run out first feed weight-0 rows until all have."""
    rows = len(next(iter(template.values())))
    totals: dict[str, float] = {}
    steps = 0
    while max_steps == 0 or steps < max_steps:
        local = next(batches, None)
        if all_done(local is None):
            break
        for k, v in jax.device_get(step(global_batch(pad_rows(local, rows, template),
                                                     mesh))).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        steps += 1
    return totals
