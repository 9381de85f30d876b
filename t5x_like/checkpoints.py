"""Where checkpoints are written and read: Orbax CheckpointManager, async, atomic.

A checkpoint `<dir>/checkpoints/<step>/` holds up to three items:

    params     the model parameters (pure dict)            -> sample / evaluate / init_from
    train      {"step", "opt_state"}                       -> resume
    data       the grain iterator state of every data shard (JSON, see batches.py)
                                                           -> resume at exactly the next batch

Orbax writes each checkpoint under a temporary name and renames it when every item has
committed, and deletes old checkpoints only after a newer one committed, so a run killed at any
moment leaves only whole checkpoints (plus ignorable temporaries). A checkpoint that is
nonetheless damaged (a truncated file, a disk that filled up) is detected when restoring: it is
moved aside as `damaged-<step>-<time>` and the next older one is used.

Restores always pass target shardings (a tree of ShapeDtypeStruct with `.sharding`), so a
checkpoint written on one mesh restores onto any other mesh, device count or process count.

A *model directory* (written by `t5x_like.export` or `t5x_like.hf import`) has the layout of a
run's workdir with parameters only: `config.json`, `tokenizer.model`, `checkpoints/<step>/params`.
"""

import os
import time

import jax
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from t5x_like.errors import UserError


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


def _preservation(max_to_keep: int, keep_best_by: str, keep_best: int, best_mode: str):
    latest = policies.LatestN(n=max_to_keep)
    if not keep_best_by:
        return latest
    best = policies.BestN(get_metric_fn=lambda metrics: metrics[keep_best_by],
                          reverse=best_mode == "min", n=keep_best,
                          keep_checkpoints_without_metrics=False)
    return policies.AnyPreservationPolicy([latest, best])


class Checkpointer:
    """The checkpoints of one training run (a thin layer over ocp.CheckpointManager)."""

    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True,
                 keep_best_by: str = "", keep_best: int = 1, best_mode: str = "min"):
        self.directory = directory
        options = ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=async_save,
            preservation_policy=_preservation(max_to_keep, keep_best_by, keep_best, best_mode))
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, batches=None, metrics: dict | None = None) -> None:
        """Starts saving `state` ({"step", "params", "opt_state"}); returns before it commits.

        `batches` (a batches.ShardedBatches) adds the data state; every process must call this.
        `metrics` (validation results at this step) rank the checkpoint for keep_best_by.
        """
        items = {"params": ocp.args.StandardSave(state["params"]),
                 "train": ocp.args.StandardSave({"step": state["step"],
                                                 "opt_state": state["opt_state"]})}
        if batches is not None:
            items["data"] = ocp.args.JsonSave(batches.global_state())
        self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics, force=True)

    def restore(self, step: int, target: dict, batches=None) -> dict:
        """Restores a full train state onto the shardings in `target` (abstract state)."""
        items = {"params": ocp.args.StandardRestore(target["params"]),
                 "train": ocp.args.StandardRestore({"step": target["step"],
                                                    "opt_state": target["opt_state"]})}
        if batches is not None:
            items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        if batches is not None:
            batches.set_global_state(restored["data"])
        return {"step": restored["train"]["step"], "params": restored["params"],
                "opt_state": restored["train"]["opt_state"]}

    def restore_newest_valid(self, target: dict, batches=None) -> dict | None:
        """The newest checkpoint that restores; damaged ones are moved aside with a warning."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(step, target, batches)
            except UserError:
                raise
            except Exception as e:  # Orbax/TensorStore raise many types for damaged files
                bad = os.path.join(self.directory, str(step))
                logging.warning("Checkpoint %s cannot be restored (%s: %s); moving it aside and "
                                "trying the previous one.", bad, type(e).__name__,
                                str(e).splitlines()[0][:300])
                _quarantine(self.directory, step)
                self.manager.reload()
        return None

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def _quarantine(directory: str, step: int) -> None:
    if jax.process_index() == 0:
        src = os.path.join(directory, str(step))
        os.replace(src, os.path.join(directory, f"damaged-{step}-{int(time.time())}"))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"t5x_like: quarantined checkpoint {step}")


def locate(path: str) -> tuple[str, int | None]:
    """A run/model directory or one of its checkpoints -> (directory, step or None = latest).

    Accepts `<dir>` (holding config.json and checkpoints/) or `<dir>/checkpoints/<step>`.
    """
    path = os.path.abspath(path)
    parent, name = os.path.split(path)
    if name.isdigit() and os.path.basename(parent) == "checkpoints":
        return os.path.dirname(parent), int(name)
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} is neither a t5x_like run or model directory (with config.json) "
                        "nor one of its checkpoints (<dir>/checkpoints/<step>).")
    return path, None


def restore_params(workdir: str, target_params, step: int | None = None):
    """Parameters only, from a run's or model directory's latest (or given) checkpoint."""
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise UserError(f"{workdir} has no checkpoints/ folder; train first or check the path.")
    manager = ocp.CheckpointManager(directory)
    try:
        step = manager.latest_step() if step is None else step
        if step is None:
            raise UserError(f"{directory} holds no finished checkpoint yet.")
        if step not in manager.all_steps():
            raise UserError(f"{directory} has no checkpoint for step {step} (it has "
                            f"{manager.all_steps()}).")
        logging.info("Restoring parameters from %s step %d", directory, step)
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target_params)))
        return restored["params"], step
    finally:
        manager.close()


def save_params(workdir: str, step: int, params) -> None:
    """Writes a parameters-only checkpoint (a model directory's), waiting until it commits."""
    manager = ocp.CheckpointManager(checkpoint_dir(workdir),
                                    options=ocp.CheckpointManagerOptions(create=True))
    try:
        manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                     force=True)
        manager.wait_until_finished()
    finally:
        manager.close()


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the shardings a restore should produce."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
