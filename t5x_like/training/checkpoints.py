"""Where checkpoints are written and read: Orbax CheckpointManager, async, atomic.

A checkpoint `<dir>/checkpoints/<step>/` holds up to three items:

    params     the model parameters (pure dict)            -> sample / evaluate / init_from
    train      {"step", "opt_state"}                       -> resume
    data       the grain iterator state of every data shard (JSON, see batches.py)
                                                           -> resume at exactly the next batch

Orbax writes each checkpoint under a temporary name and renames it when every item has
committed, and deletes old checkpoints only after a newer one committed, so a run killed at any
moment leaves only whole checkpoints (plus temporaries, removed when the run restarts).

Once a checkpoint has committed, process 0 seals it: `<step>/integrity.json` records the size
and xxh3-128 hash of every file (Orbax checksums only its shard indexes, not the arrays). Every
restore checks the files it reads against it first, so a damaged checkpoint (a truncated or
overwritten file) is named instead of restoring garbage. Resuming moves a damaged checkpoint
aside as `damaged-<step>-<time>` and uses the next older one; when every one is damaged the run
stops rather than start again from step 0. Checkpoints written before seals existed (or by a run
killed between commit and seal) restore unverified, with a warning.

A save that cannot be written (a full disk) stops the run at the next save or wait with one
`EnvironmentFailure` sentence; earlier checkpoints stay, and the failed save's temporary folder
is removed when the run restarts.

Restores always pass target shardings (a tree of ShapeDtypeStruct with `.sharding`), so a
checkpoint written on one mesh restores onto any other mesh, device count or process count.

A *model directory* (written by `t5x_like.export` or `t5x_like.hf import`) has the layout of a
run's workdir with parameters only: `config.json`, `tokenizer.model`, `checkpoints/<step>/params`.
"""

import contextlib
import json
import logging as std_logging
import mmap
import os
import re
import sys
import tempfile
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import xxhash
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as policies

from t5x_like.core import errors
from t5x_like.core import files as files_lib
from t5x_like.core.errors import EnvironmentFailure, UserError

MANIFEST = "integrity.json"


class DamagedCheckpoint(UserError):
    """A checkpoint whose files differ from those recorded in its integrity.json."""


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
        self.directory, self.async_save = directory, async_save
        options = ocp.CheckpointManagerOptions(
            create=True, enable_async_checkpointing=async_save,
            # A save that failed (or a killed run) leaves a temporary folder: free its space.
            cleanup_tmp_directories=True,
            preservation_policy=_preservation(max_to_keep, keep_best_by, keep_best, best_mode))
        _quiet_write_errors()
        with _writing(directory, None):
            self.manager = ocp.CheckpointManager(directory, options=options)
        self._unsealed: int | None = None  # the step saved last, sealed once it has committed
        self._failed = False

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: dict, batches=None, metrics: dict | None = None) -> None:
        """Starts saving `state` ({"step", "params", "opt_state"}); returns before it commits.

        `batches` (a batches.ShardedBatches) adds the data state; every process must call this.
        `metrics` (validation results at this step) rank the checkpoint for keep_best_by.
        Raises EnvironmentFailure if this or the previous save could not be written.
        """
        self._settle()
        items = {"params": ocp.args.StandardSave(state["params"]),
                 "train": ocp.args.StandardSave({"step": state["step"],
                                                 "opt_state": state["opt_state"]})}
        if batches is not None:
            items["data"] = ocp.args.JsonSave(batches.global_state())
        with self._guard(step):
            self.manager.save(step, args=ocp.args.Composite(**items), metrics=metrics,
                              force=True)
        self._unsealed = step
        if not self.async_save:  # committed already: seal it now
            self._settle()

    def _settle(self) -> None:
        """Waits for the save in flight, then seals it (or raises EnvironmentFailure)."""
        if self._failed:
            raise EnvironmentFailure(f"an earlier checkpoint of {self.directory} could not be "
                                     "written; see the error above.")
        step = self._unsealed
        with self._guard(step):
            self.manager.wait_until_finished()
            if step is not None:
                seal(self.directory, step)
        self._unsealed = None

    @contextlib.contextmanager
    def _guard(self, step: int | None):
        """Turns a failed write (Orbax's own error, or TensorStore's text naming the errno)
        into one EnvironmentFailure sentence that says which checkpoint is left to resume."""
        try:
            with _writing(self.directory, step):
                yield
        except EnvironmentFailure as e:
            # Orbax's other writer threads may still run: the half-written temporary folder is
            # left to cleanup_tmp_directories when the run restarts (restores ignore it).
            self._failed = True
            self.manager.reload()  # a failed save dropped its predecessors from memory only
            kept, code = self.manager.latest_step(), getattr(e, "errno", None)
            fix = "free some space" if code in errors.DISK_FULL_ERRNOS else "fix that"
            after = (f"the last good checkpoint, {os.path.join(self.directory, str(kept))}, is "
                     f"intact; {fix} and rerun the same command to resume from it."
                     if kept is not None else f"no checkpoint was kept; {fix} and rerun the "
                     "same command.")
            raise _failure(f"{e}; training stopped, {after}", code) from None

    def restore(self, step: int, target: dict, batches=None) -> dict:
        """Restores a full train state onto the shardings in `target` (abstract state)."""
        verify(self.directory, step)
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
        """The newest checkpoint that restores; damaged ones are moved aside with a warning.

        None when the run has no checkpoint yet; UserError when it had some and all are damaged
        (starting again from step 0 would silently throw the run away).
        """
        damaged = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                return self.restore(step, target, batches)
            except DamagedCheckpoint as e:
                reason = str(e)
            except UserError:
                raise
            except Exception as e:  # Orbax/TensorStore raise many types for damaged files
                if _sealed(self.directory, step):
                    # Its files match their checksums, so this is no damage (e.g. a data state
                    # the pipeline cannot take): moving good checkpoints aside would hide it.
                    raise
                reason = (f"checkpoint {os.path.join(self.directory, str(step))} cannot be "
                          f"restored ({type(e).__name__}: {str(e).splitlines()[0][:300]})")
            logging.warning("%s; moving it aside and trying the previous one.", reason)
            damaged.append(step)
            _quarantine(self.directory, step)
            self.manager.reload()
        set_aside = sorted(n for n in os.listdir(self.directory) if n.startswith("damaged-"))
        if damaged or set_aside:
            raise UserError(
                f"every checkpoint in {self.directory} is damaged (kept, moved aside as "
                f"{', '.join(set_aside)}; see the warnings above), so this run cannot resume: "
                "put back a good copy from a backup, or move the damaged-* folders out of "
                "checkpoints/ to train again from step 0.")
        return None

    def best_step(self) -> int | None:
        return self.manager.best_step()

    def wait(self) -> None:
        """Waits until the last save has committed (and is sealed); EnvironmentFailure if it
        could not be written."""
        self._settle()

    def close(self) -> None:
        try:
            if not self._failed:
                self._settle()
        finally:
            # After a failed save Orbax raises the same failure again: it is reported already.
            with contextlib.suppress(Exception) if self._failed else contextlib.nullcontext():
                self.manager.close()


def _quarantine(directory: str, step: int) -> None:
    if jax.process_index() == 0:
        src = os.path.join(directory, str(step))
        os.replace(src, os.path.join(directory, f"damaged-{step}-{int(time.time())}"))
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"t5x_like: quarantined checkpoint {step}")


# ---------------------------------------------------------------------------------------------
# Failed writes.


def _os_error(error: BaseException) -> int | None:
    """The errno of a failed write: an OSError's, or the one TensorStore puts in its message
    (`... No space left on device [os_error_code='28']`); None for any other error."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno:
            return error.errno
        code = re.search(r"os_error_code='?(\d+)", str(error))
        if code:
            return int(code.group(1))
        error = error.__cause__ or error.__context__
    return None


class _WriteErrorFilter(std_logging.Filter):
    """Drops the log records of a failed write from the files under `where` (Orbax logs a
    traceback from each of its threads, asyncio one per unfinished write, ~80 lines each): the
    same error reaches the Checkpointer, which reports it in one sentence. `--verbosity=1`
    keeps them."""

    def __init__(self, where: str):
        super().__init__()
        self.where = where

    def filter(self, record: std_logging.LogRecord) -> bool:
        if (self.where not in record.pathname or not record.exc_info
                or logging.get_verbosity() > logging.INFO):
            return True
        return _os_error(record.exc_info[1]) is None


def _quiet_write_errors() -> None:
    """Installs (once) what keeps a failed save to one `error:` line."""
    for name, where in (("absl", "/orbax/"), ("asyncio", "")):
        logger = std_logging.getLogger(name)
        if not any(isinstance(f, _WriteErrorFilter) for f in logger.filters):
            logger.addFilter(_WriteErrorFilter(where))
    previous = sys.unraisablehook
    if getattr(previous, "quiets_closed_loops", False):
        return

    def hook(unraisable):
        # When one write fails, Orbax's event loop ends and TensorStore completes the other
        # writes into it: each completion is an unraisable "Event loop is closed", nothing more.
        if not (isinstance(unraisable.exc_value, RuntimeError)
                and str(unraisable.exc_value) == "Event loop is closed"):
            previous(unraisable)
    hook.quiets_closed_loops = True
    sys.unraisablehook = hook


@contextlib.contextmanager
def _writing(directory: str, step: int | None):
    """OSErrors (however wrapped) while writing checkpoint `step` -> one EnvironmentFailure."""
    try:
        yield
    except EnvironmentFailure:
        raise
    except Exception as e:
        code = _os_error(e)
        if code is None:
            raise  # not the disk's doing: the traceback is the useful report
        path = directory if step is None else os.path.join(directory, str(step))
        full = " (disk full?)" if code in errors.DISK_FULL_ERRNOS else ""
        raise _failure(f"cannot write checkpoint {path}: {os.strerror(code)}{full}",
                       code) from None


def _failure(message: str, code: int | None) -> EnvironmentFailure:
    failure = EnvironmentFailure(message)
    failure.errno = code  # (for the advice that follows: free space, or fix permissions)
    return failure


def check_writable(workdir: str) -> None:
    """Creates `workdir` and writes a file in it: an unwritable or missing disk is one
    EnvironmentFailure sentence before any data preparation or compilation."""
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise UserError(f"--workdir {workdir} is a file, not a folder; choose a folder.")
    try:
        os.makedirs(workdir, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-test-", dir=workdir)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise EnvironmentFailure(f"cannot write to the workdir {workdir}: "
                                 f"{e.strerror or e}; choose a --workdir on a writable "
                                 "disk.") from None


# ---------------------------------------------------------------------------------------------
# Seals: sizes and hashes of a committed checkpoint's files.

_unsealed_warned: set[str] = set()


def _hash(path: str) -> str:
    h = xxhash.xxh3_128()
    with open(path, "rb", buffering=0) as f:
        try:  # mapped: no copies, about 3x the speed of reading (~3 GB/s here)
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                h.update(mapped)
        except (OSError, ValueError):  # an empty file, or a filesystem without mmap
            f.seek(0)
            buffer = memoryview(bytearray(1 << 24))
            while n := f.readinto(buffer):
                h.update(buffer[:n])
    return h.hexdigest()


def _files(step_dir: str) -> list[str]:
    found = []
    for root, _, names in os.walk(step_dir):
        found += [os.path.relpath(os.path.join(root, n), step_dir) for n in names]
    return sorted(f for f in found if f != MANIFEST)


def seal(directory: str, step: int) -> None:
    """Writes `<directory>/<step>/integrity.json` for a committed checkpoint (process 0; the
    files of every process are on the shared disk by then)."""
    step_dir = os.path.join(directory, str(step))
    if jax.process_index() != 0 or not os.path.isdir(step_dir):  # (removed by keep-N already)
        return
    files = {f: {"bytes": os.path.getsize(os.path.join(step_dir, f)),
                 "xxh3_128": _hash(os.path.join(step_dir, f))} for f in _files(step_dir)}
    files_lib.atomic_write_json(os.path.join(step_dir, MANIFEST), {"format": 1, "files": files},
                                indent=1)


def _problem(step_dir: str, items: tuple[str, ...] | None) -> str | None:
    """What differs from the seal, in words; None if nothing (or there is no seal)."""
    manifest = os.path.join(step_dir, MANIFEST)
    if not os.path.isfile(manifest):
        if step_dir not in _unsealed_warned:
            _unsealed_warned.add(step_dir)
            logging.warning("Checkpoint %s has no %s (written by an older t5x_like, or the run "
                            "stopped just after it committed): restoring it unverified.",
                            step_dir, MANIFEST)
        return None
    try:
        with open(manifest) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"its {MANIFEST} is unreadable ({type(e).__name__}: {e})"
    for name, want in sorted(files.items()):
        if items is not None and name.split(os.sep)[0] not in items:
            continue
        path = os.path.join(step_dir, name)
        if not os.path.isfile(path):
            return f"{name} is missing"
        size = os.path.getsize(path)
        if size != want["bytes"]:
            return f"{name} has {size:,} bytes where {want['bytes']:,} were written"
        if _hash(path) != want["xxh3_128"]:
            return f"{name} does not match the checksum recorded when it was written"
    return None


def _sealed(directory: str, step: int) -> bool:
    return os.path.isfile(os.path.join(directory, str(step), MANIFEST))


def verify(directory: str, step: int, items: tuple[str, ...] | None = None) -> None:
    """Raises DamagedCheckpoint naming the first file of `<directory>/<step>` (of `items`
    only, e.g. ("params",)) that differs from its seal. Process 0 reads; all agree."""
    step_dir = os.path.join(directory, str(step))
    problem = _problem(step_dir, items) if jax.process_index() == 0 else None
    if jax.process_count() > 1:
        bad = multihost_utils.broadcast_one_to_all(np.int32(problem is not None))
        if bad and problem is None:
            problem = "a file differs from its checksum (see process 0's log)"
    if problem:
        raise DamagedCheckpoint(f"checkpoint {step_dir} is damaged: {problem}")


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
        try:
            verify(directory, step, items=("params",))
        except DamagedCheckpoint as e:
            others = [s for s in manager.all_steps() if s != step]
            raise DamagedCheckpoint(
                f"{e}; restore it from a backup" + (
                    f", or pick another checkpoint (steps here: "
                    f"{', '.join(map(str, others))})." if others else ".")) from None
        logging.info("Restoring parameters from %s step %d", directory, step)
        restored = manager.restore(step, args=ocp.args.Composite(
            params=ocp.args.StandardRestore(target_params)))
        return restored["params"], step
    finally:
        manager.close()


def save_params(workdir: str, step: int, params) -> None:
    """Writes a parameters-only checkpoint (a model directory's), waiting until it commits."""
    directory = checkpoint_dir(workdir)
    _quiet_write_errors()
    with _writing(directory, step):
        manager = ocp.CheckpointManager(directory,
                                        options=ocp.CheckpointManagerOptions(create=True))
        try:
            manager.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                         force=True)
            manager.wait_until_finished()
        finally:
            manager.close()
        seal(directory, step)


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the shardings a restore should produce."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
