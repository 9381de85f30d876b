"""Hyperparameter sweeps: many runs of one job over config overrides, searched with Optuna.

    python -m t5x_like.sweep --config=configs/sweeps/pretrain_lr_batch.py --workdir=sweeps/lr_bs
    python -m t5x_like.sweep ... --parallel=2         two trials at a time on this machine
    python -m t5x_like.sweep ... --storage=postgresql://user:pw@db/optuna
                                                      workers on many hosts share one study
    python -m t5x_like.sweep ... --report_only        rewrite the results from the study alone

A sweep config (every default in configs/sweeps/common.py) names the job, the search space
over its config keys, the objective (a metric of the trial's metrics.jsonl) and how to search.
Each trial is its own process,

    python -m <program> --config=<config> --workdir=<sweep>/trials/<n> <args> --config.<k>=<v>...

so an exception, a NaN loss or an out-of-memory kill ends that trial only: it is recorded as
failed with the reason and the sweep goes on. While a trial runs its metrics.jsonl is read every
`poll_s` seconds; each evaluation is reported to Optuna, whose pruner may stop the trial.

The study lives in `<workdir>/study.db` (SQLite) unless --storage names a database. Rerunning
the same command resumes it: finished trials are never repeated, and a trial whose sweep process
died (killed, Ctrl-C, a lost host) runs again in its own workdir, so training resumes from its
last checkpoint. Results (sweep_report.py): results.csv, results.md, best_config.py and plots/
in the sweep workdir. The sweep config's checks are in sweep_config.py.
"""

import ctypes
import json
import math
import os
import queue
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings
from typing import Any

import optuna
from absl import flags, logging
from optuna.trial import TrialState

from t5x_like.core import config as config_lib
from t5x_like.core import files
from t5x_like.core import metrics as metrics_lib
from t5x_like.experiments import sweep_config, sweep_report
from t5x_like.core.errors import UserError

# Keys whose change makes old trials incomparable with new ones: a rerun must not mix them.
STUDY_KEYS = ("program", "config", "args", "fixed", "space", "objective")
LOG_TAIL_BYTES = 20_000

_STOP = threading.Event()  # set by the entry point on SIGINT/SIGTERM; running trials end


class TrialFailed(Exception):
    """A trial that ended without an objective value; the message says why."""


# ---------------------------------------------------------------------------------------------
# What the trials run with.


def share_data(cfg, workdir: str) -> dict[str, str]:
    """Training trials read one copy of the data, prepared here once, instead of each preparing
    its own (or several racing to write one cache). Returns the override that points them at it.

    Not for runs that take their tokenizer from init_from (the trainer fingerprints the data
    with it), nor when the job config names its own data.cache_dir."""
    if cfg.program != "t5x_like.train":
        return {}
    job = sweep_config.apply_overrides(sweep_config.load_job_config(cfg.config),
                                       sweep_config.flatten(cfg.fixed), where="fixed",
                                       config_path=cfg.config)
    if job.init_from or job.data.cache_dir:
        return {}
    from data_pipelines import prepare  # local: TFDS and SentencePiece load slowly

    cache_dir = os.path.abspath(os.path.join(workdir, "data"))
    logging.info("Preparing %s once for every trial in %s", job.data.source, cache_dir)
    prepare.prepare(job.data, cache_dir)
    return {"data.cache_dir": cache_dir}


def grid(cfg) -> dict[str, list]:
    return {name: list(spec["values"]) for name, spec in sweep_config.flatten(cfg.space).items()}


def budget(cfg) -> int:
    if cfg.trials:
        return cfg.trials
    return math.prod(len(v) for v in grid(cfg).values())


def suggest(trial: optuna.Trial, name: str, spec) -> Any:
    kind = spec.distribution
    if kind == "choice":
        return trial.suggest_categorical(name, list(spec["values"]))
    if kind == "integer":
        return trial.suggest_int(name, spec.low, spec.high, step=spec.step, log=spec.log)
    return trial.suggest_float(name, spec.low, spec.high, log=kind == "log_uniform")


def override_arg(name: str, value: Any) -> str:
    """--config.<name>=<value> as ml_collections parses it back (floats exactly, via repr)."""
    return f"--config.{name}={value!r}" if isinstance(value, float) else f"--config.{name}={value}"


# ---------------------------------------------------------------------------------------------
# The study.


def make_sampler(cfg) -> optuna.samplers.BaseSampler:
    if cfg.sampler == "grid":
        return optuna.samplers.GridSampler(grid(cfg), seed=cfg.seed)
    if cfg.sampler == "random":
        return optuna.samplers.RandomSampler(seed=cfg.seed)
    return optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=cfg.startup_trials)


def make_pruner(cfg) -> optuna.pruners.BasePruner:
    if cfg.pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=cfg.prune_startup_trials,
                                           n_warmup_steps=cfg.prune_warmup_steps)
    if cfg.pruner == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(
            min_resource=cfg.halving_min_steps or "auto", reduction_factor=cfg.halving_rate)
    return optuna.pruners.NopPruner()


def storage_url(workdir: str, storage: str = "") -> str:
    return storage or f"sqlite:///{os.path.abspath(os.path.join(workdir, 'study.db'))}"


def open_study(cfg, workdir: str, storage: str = "") -> optuna.Study:
    url = storage_url(workdir, storage)
    # SQLite: wait for the lock instead of failing when parallel trials write at once.
    engine_kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    # Heartbeats: a trial whose worker vanished (a lost host) fails after the grace period and
    # runs again; the local case (a dead sweep on this host) is found at once by recover().
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        rdb = optuna.storages.RDBStorage(
            url, engine_kwargs=engine_kwargs, heartbeat_interval=60, grace_period=300,
            heartbeat_stale_trial_callback=_retry_callback(max_retry=2))
    return optuna.create_study(
        storage=rdb, study_name=cfg.name or os.path.basename(os.path.abspath(workdir)),
        sampler=make_sampler(cfg), pruner=make_pruner(cfg), load_if_exists=True,
        direction="minimize" if cfg.objective.mode == "min" else "maximize")


def _retry_callback(max_retry: int | None):
    """Optuna's retry: a new waiting trial with the same parameters, user attributes (so the
    same workdir) and grid point."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        return optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=max_retry)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def recover(study: optuna.Study) -> list[int]:
    """Trials interrupted on this host (their sweep process is gone, or was stopped) run again
    in their own workdir; returns their numbers."""
    storage, host = study._storage, socket.gethostname()
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host") == host and not _alive(t.user_attrs.get("pid", -1)):
            storage.set_trial_user_attr(t._trial_id, "interrupted", True)
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    retried, again = sweep_report.retried(trials), []
    for t in trials:
        interrupted = t.state == TrialState.FAIL and t.user_attrs.get("interrupted")
        if interrupted and t.number not in retried:
            _retry_callback(max_retry=None)(study, t)
            again.append(t.number)
    return again


def counted(study: optuna.Study) -> int:
    """Trials that used the budget or are using it: not interrupted ones (they run again) nor
    waiting ones (the next trial any worker starts takes them)."""
    return sum(1 for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING
               and not (t.state == TrialState.FAIL and t.user_attrs.get("interrupted")))


# ---------------------------------------------------------------------------------------------
# One trial.


def _log_tail(path: str) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - LOG_TAIL_BYTES))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def failure_reason(returncode: int, log_tail: str) -> str:
    """One line saying why a trial's process failed, from its exit status and last output."""
    lines = [line.strip() for line in log_tail.splitlines() if line.strip()]
    if any("RESOURCE_EXHAUSTED" in line or "Out of memory" in line or "MemoryError" in line
           for line in lines):
        oom = next(line for line in reversed(lines) if "RESOURCE_EXHAUSTED" in line
                   or "Out of memory" in line or "MemoryError" in line)
        return f"out of memory: {oom[:300]}"
    if returncode < 0:
        name = signal.Signals(-returncode).name
        hint = " (out of memory? the kernel's OOM killer sends it)" if name == "SIGKILL" else ""
        return f"killed by {name}{hint}"
    errors = [line for line in lines if line.startswith("error:")]
    if errors:  # a UserError: the trainer's own sentence (NaN loss, bad config, ...)
        return errors[-1][len("error:"):].strip()[:500]
    exception = next((line for line in reversed(lines)
                      if line.split(":")[0].endswith(("Error", "Exception"))), None)
    last = exception or (lines[-1] if lines else "no output")
    return f"exit status {returncode}: {last[:500]}"


def _die_with_parent() -> None:
    """In the trial process: end with the thread that started it (a killed sweep leaves no
    orphan trials). Linux only; elsewhere SIGINT/SIGTERM of the sweep still stop trials."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _stop(proc: subprocess.Popen, grace_s: float = 30.0) -> None:
    """SIGTERM the trial's process group (the trainer saves a checkpoint and exits), then kill."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    except ProcessLookupError:
        pass


class _Objective:
    """What Optuna calls per trial: start the job, follow its metrics, return its value."""

    def __init__(self, cfg, workdir: str, shared: dict[str, Any], parallel: int):
        self.cfg, self.workdir = cfg, workdir
        self.space = sweep_config.flatten(cfg.space)
        self.fixed = {**shared, **sweep_config.flatten(cfg.fixed)}
        # Slots of the trials running at once on this worker: with gpus_per_trial, slot i gets
        # GPUs [i*k, (i+1)*k) of the host, so parallel trials never share an accelerator.
        self.slots: queue.SimpleQueue[int] = queue.SimpleQueue()
        for slot in range(parallel):
            self.slots.put(slot)

    def env(self, slot: int) -> dict[str, str]:
        env = dict(os.environ)
        k = self.cfg.gpus_per_trial
        if k:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(slot * k + i) for i in range(k))
        return env

    def command(self, trial_dir: str, params: dict) -> list[str]:
        overrides = {**self.fixed, **params}
        return [sys.executable, "-m", self.cfg.program, f"--config={self.cfg.config}",
                f"--workdir={trial_dir}", *shlex.split(self.cfg.args),
                *(override_arg(k, v) for k, v in overrides.items())]

    def __call__(self, trial: optuna.Trial) -> float:
        if _STOP.is_set():  # the sweep is stopping: this trial waits for the next start
            trial.set_user_attr("interrupted", True)
            raise KeyboardInterrupt("sweep stopped")
        params = {name: suggest(trial, name, spec) for name, spec in self.space.items()}
        # A retried trial keeps its workdir (and so its checkpoints): training resumes.
        trial_dir = trial.user_attrs.get("workdir") or os.path.join(
            self.workdir, "trials", f"{trial.number:04d}")
        cmd = self.command(trial_dir, params)
        record = {"workdir": trial_dir, "host": socket.gethostname(), "pid": os.getpid(),
                  "interrupted": False, "command": "python " + shlex.join(cmd[1:]),
                  "overrides": {**self.fixed, **params}}
        for key, value in record.items():
            trial.set_user_attr(key, value)
        os.makedirs(trial_dir, exist_ok=True)
        files.atomic_write_json(os.path.join(trial_dir, "trial.json"),
                                {"trial": trial.number, **record}, sort_keys=True)
        logging.info("Trial %d: %s", trial.number,
                     " ".join(override_arg(k, v)[len("--config."):] for k, v in params.items()))
        try:
            value = self.follow(trial, cmd, trial_dir)
        except (TrialFailed, optuna.TrialPruned) as e:
            logging.info("Trial %d %s: %s", trial.number,
                         "pruned" if isinstance(e, optuna.TrialPruned) else "failed", e)
            raise
        logging.info("Trial %d: %s %s = %.6g", trial.number, self.cfg.objective.split,
                     self.cfg.objective.metric, value)
        return value

    def follow(self, trial: optuna.Trial, cmd: list[str], trial_dir: str) -> float:
        slot = self.slots.get()
        try:
            return self._follow(trial, cmd, trial_dir, self.env(slot))
        finally:
            self.slots.put(slot)

    def _follow(self, trial: optuna.Trial, cmd: list[str], trial_dir: str, env: dict) -> float:
        o, start = self.cfg.objective, time.time()
        log_path = os.path.join(trial_dir, "trial.log")
        with open(log_path, "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                                    stdin=subprocess.DEVNULL, start_new_session=True,
                                    preexec_fn=_die_with_parent)
        values: dict[int, float] = {}
        records: list[dict] = []
        try:
            while True:
                exited = proc.poll() is not None  # read the metrics after this, never before
                records = metrics_lib.read_metrics(trial_dir)
                for r in records:
                    if r.get("split") != o.split or o.metric not in r or r["step"] in values:
                        continue
                    value = r[o.metric]
                    if not isinstance(value, (int, float)) or not math.isfinite(value):
                        raise TrialFailed(f"{o.split} {o.metric} is {value} at step {r['step']}")
                    values[r["step"]] = float(value)
                    trial.report(float(value), r["step"])
                    if trial.should_prune():
                        trial.set_user_attr("note", f"pruned at step {r['step']}")
                        raise optuna.TrialPruned(f"{o.metric}={value:.4g} at step {r['step']}")
                if exited:
                    break
                if _STOP.is_set():
                    trial.set_user_attr("interrupted", True)
                    raise KeyboardInterrupt("sweep stopped")
                if self.cfg.trial_timeout_s and time.time() - start > self.cfg.trial_timeout_s:
                    raise TrialFailed(f"timed out after {self.cfg.trial_timeout_s} s")
                time.sleep(self.cfg.poll_s)
        except TrialFailed as e:
            trial.set_user_attr("note", str(e))
            raise
        finally:
            _stop(proc)
            trial.set_user_attr("seconds", round(time.time() - start, 1))
            self._record_final(trial, records)
        if proc.returncode != 0:
            reason = failure_reason(proc.returncode, _log_tail(log_path))
            trial.set_user_attr("note", reason)
            raise TrialFailed(reason)
        if not values:
            reason = (f"the run wrote no {o.split} {o.metric} to metrics.jsonl; check "
                      "objective.split/metric (and that the job evaluates)")
            trial.set_user_attr("note", reason)
            raise TrialFailed(reason)
        ordered = [values[s] for s in sorted(values)]
        if o.reduce == "last":
            return ordered[-1]
        return min(ordered) if o.mode == "min" else max(ordered)

    def _record_final(self, trial: optuna.Trial, records: list[dict]) -> None:
        """The last line of the objective's split (all its metrics) and the last step reached."""
        split = [r for r in records if r.get("split") == self.cfg.objective.split]
        if split:
            trial.set_user_attr("final", {k: v for k, v in split[-1].items()
                                          if k not in ("step", "split")})
        if records:
            trial.set_user_attr("steps", max(r.get("step", 0) for r in records))


# ---------------------------------------------------------------------------------------------
# The sweep.


def _check_unchanged(cfg, workdir: str) -> None:
    """A rerun must describe the same study; budget, sampler and pruner settings may change."""
    path = os.path.join(workdir, "sweep_config.json")
    now = config_lib.to_dict(cfg)
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            before = json.load(f)
        for key in STUDY_KEYS:
            if json.dumps(before.get(key), sort_keys=True) != json.dumps(
                    json.loads(json.dumps(now.get(key))), sort_keys=True):
                raise UserError(f"sweep config key '{key}' differs from the one {workdir} was "
                                f"started with ({path}); use a new --workdir for a new study.")
    files.atomic_write_json(path, now, sort_keys=True)


def run_sweep(cfg, workdir: str, *, parallel: int = 1, storage: str = "") -> optuna.Study:
    """Runs (or resumes) the sweep until the budget is used, then writes the results."""
    sweep_config.validate(cfg)
    sweep_config.check_against_job(cfg)
    if parallel < 1:
        raise UserError(f"--parallel={parallel}: run at least 1 trial at a time.")
    os.makedirs(workdir, exist_ok=True)
    _check_unchanged(cfg, workdir)
    # Each trial's outcome is logged here in one line; Optuna would add a traceback per failure.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    study = open_study(cfg, workdir, storage)
    again = recover(study)
    if again:
        logging.info("Running interrupted trials %s again.", again)
    total = budget(cfg)
    remaining = total - counted(study)
    logging.info("Study %s: %d of %d trials done or running, %d to go.", study.study_name,
                 total - max(remaining, 0), total, max(remaining, 0))

    def stop_at_budget(study, trial):  # the budget is shared by every worker of the study
        if counted(study) >= total or _STOP.is_set():
            study.stop()

    try:
        if remaining > 0:
            objective = _Objective(cfg, workdir, share_data(cfg, workdir), parallel)
            study.optimize(objective, n_trials=remaining, n_jobs=parallel,
                           catch=(TrialFailed,), callbacks=[stop_at_budget])
    finally:
        sweep_report.write(study, cfg, workdir)
    return study


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; options look like --config.x=y.")
    f = flags.FLAGS
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # trials are logged here, one line each
    if f.report_only:
        sweep_config.validate(f.config)
        if not f.storage and not os.path.isfile(os.path.join(f.workdir, "study.db")):
            raise UserError(f"{f.workdir} holds no study (study.db); run the sweep first, or "
                            "give --storage for a study in a database.")
        study = open_study(f.config, f.workdir, f.storage)
        print(sweep_report.write(study, f.config, f.workdir))
        return

    def stop(signum, frame):  # running trials end (and will run again on the next start)
        logging.warning("Stopping the sweep (signal %d); rerun the same command to resume.",
                        signum)
        _STOP.set()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    try:
        study = run_sweep(f.config, f.workdir, parallel=f.parallel, storage=f.storage)
    except KeyboardInterrupt:
        print(f"sweep stopped; rerun the same command to resume ({f.workdir}/results.md has the "
              "trials so far)")
        return
    del study
    with open(os.path.join(f.workdir, "results.md"), encoding="utf-8") as results:
        print(results.read(), end="")
    print(f"results in {f.workdir}/ (results.md, results.csv, best_config.py, plots/)")
