"""Training batches across processes: logical data shards, one global batch per step.

The training data is split into `data.num_shards` logical shards (shard i reads records
i, i + S, i + 2S, ...), each with its own shuffled, packed iterator that yields batch_size / S
rows. Process p of P owns shards [p*S/P, (p+1)*S/P) and puts their rows side by side; the mesh
then sees one global batch. The data order depends on S only, never on how many processes
read it, so a run on 2 processes and a run on 1 process with S = 2 see identical batches, and
the iterator state is saved per shard (gathered into one JSON item of the checkpoint) so a
checkpoint resumes exactly on any process count that divides S.
"""

import json
from typing import Callable, Iterator

import jax
import numpy as np
from jax.experimental import multihost_utils

from t5x_like.core.errors import UserError


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
        return {k: v for part in _allgather_json(self.local_state()) for k, v in part.items()}

    def set_global_state(self, states: dict[str, dict]) -> None:
        missing = [s for s in self.shards if str(s) not in states]
        if missing:
            raise UserError(f"the checkpoint's data state has shards {sorted(states, key=int)}, "
                            f"not {missing}: data.num_shards changed since it was written; "
                            "keep it as it was to resume.")
        for s in self.shards:
            self.iterators[s].set_state(states[str(s)])


def _allgather_json(obj) -> list:
    """JSON-serializable objects from every process, in process order."""
    if jax.process_count() == 1:
        return [obj]
    data = np.frombuffer(json.dumps(obj).encode(), np.uint8)
    sizes = multihost_utils.process_allgather(np.array([len(data)], np.int32))
    padded = np.zeros(int(np.max(sizes)), np.uint8)
    padded[:len(data)] = data
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:int(n)]).decode()) for row, n in zip(gathered, sizes.ravel())]
