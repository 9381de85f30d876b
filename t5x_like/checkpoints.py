"""Where checkpoints are written and read: Orbax CheckpointManager, async, keep the last N.

A checkpoint `<workdir>/checkpoints/<step>/` holds three items:

    params     the model parameters (pure dict)            -> sample / evaluate / init_from
    train      {"step", "opt_state"}                       -> resume
    data_iter  the grain iterator state of this process    -> resume at exactly the next batch

Restores always pass target shardings (a tree of ShapeDtypeStruct with `.sharding`), so a
checkpoint written on one mesh restores onto any other mesh or device count.
"""

import os

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging

from t5x_like.errors import UserError


def checkpoint_dir(workdir: str) -> str:
    return os.path.join(os.path.abspath(workdir), "checkpoints")


class Checkpointer:
    def __init__(self, directory: str, *, max_to_keep: int = 3, async_save: bool = True):
        options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, data_iter=None) -> None:
        """Starts saving `state` ({"step", "params", "opt_state"}); returns before it commits."""
        items = {"params": ocp.args.StandardSave(state["params"]),
                 "train": ocp.args.StandardSave({"step": state["step"],
                                                 "opt_state": state["opt_state"]})}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointSave(data_iter)
        self.manager.save(step, args=ocp.args.Composite(**items))

    def restore(self, step: int, target: dict, data_iter=None) -> dict:
        """Restores a full train state onto the shardings in `target` (abstract state)."""
        items = {"params": ocp.args.StandardRestore(target["params"]),
                 "train": ocp.args.StandardRestore({"step": target["step"],
                                                    "opt_state": target["opt_state"]})}
        if data_iter is not None:
            items["data_iter"] = grain.checkpoint.CheckpointRestore(data_iter)
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return {"step": restored["train"]["step"], "params": restored["params"],
                "opt_state": restored["train"]["opt_state"]}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def restore_params(workdir: str, target_params, step: int | None = None):
    """Parameters only, from a run's latest (or given) checkpoint, onto `target_params`."""
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


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the shardings a restore should produce."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
