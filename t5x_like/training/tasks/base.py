"""What a task gives the training job, and what the job gives a task to build its steps."""

import collections
import dataclasses
from typing import Any, Callable, Iterator

from t5x_like.training import state as state_lib


@dataclasses.dataclass
class Job:
    """The job's set-up, as far as a task's steps need it."""
    cfg: Any  # resolved config
    spec: state_lib.StateSpec
    mesh: Any
    tokenizer: Any
    state: dict  # the state the loop starts from (restored, or initialized)
    base: dict | None  # PEFT: the frozen base (a step input), else None
    init_dir: str | None  # init_from, located
    init_step: int | None
    encode: Callable  # the task's encoder (counting what it drops or truncates)
    eval_source: Any  # the validation split's records


class Task:
    """A task of the training job. Subclasses say what differs; the defaults suit most."""

    kind = "text"  # the record kind it trains on (data_pipelines/records.py)

    def check(self, cfg, mesh) -> None:
        """What the task needs of the config and the mesh, checked before the data."""

    def encoder(self, cfg, tokenizer, text_field: str,
                counts: collections.Counter) -> Callable:
        """record -> example (or None: dropped), counting in `counts` what it cuts or drops."""
        raise NotImplementedError

    def dataset(self, cfg, source, encode: Callable, *, batch_size: int, train: bool,
                index: int, count: int) -> Iterator[dict]:
        """Batches of `batch_size` examples from part `index` of `count` of the records."""
        raise NotImplementedError

    def check_data(self, cfg, encode: Callable, splits: dict) -> None:
        """Refuses data the task cannot learn from ({split name: source})."""

    def initial_state(self, cfg, spec, init_dir: str, init_step: int | None, base) -> dict:
        """The state of a run that starts from init_from."""
        return state_lib.state_from_init(cfg, spec, init_dir, init_step, base)

    def build(self, job: Job) -> tuple[Callable, Callable]:
        """(train_step(state, local batch) -> (state, metrics), evaluate(params) -> metrics)."""
        raise NotImplementedError

    def counted_metrics(self, cfg, counts: collections.Counter) -> dict:
        """What the train metrics report of the encoder's counts."""
        return {}
