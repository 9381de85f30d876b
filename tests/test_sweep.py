"""Sweeps (t5x_like/experiments/sweep.py): trials as processes, failures, resume, pruning, results.

Most tests run a small stand-in job (FAKE_JOB below: it writes a validation loss per step, or
crashes the way it is told) so the sweep's own behaviour is checked in seconds; the grid on the
tiny config runs the real trainer.
"""

import csv
import json
import os
import runpy
import signal
import subprocess
import sys
import textwrap
import time

import ml_collections
import optuna
import pytest

from configs.sweeps import common
from t5x_like.experiments import sweep, sweep_config
from t5x_like.core.errors import UserError

from conftest import ROOT, TEST_XLA_FLAGS

FAKE_CONFIG = """
import ml_collections

def get_config():
    return ml_collections.ConfigDict(
        {"lr": 0.1, "width": 1, "steps": 6, "crash": "", "sleep_s": 0.0})
"""

# loss(step) = (lr - 0.3)^2 + width + 1/step; resumes after the last step it wrote.
FAKE_JOB = """
import json, os, runpy, sys, time

args = dict(a[2:].split("=", 1) for a in sys.argv[1:])
cfg = runpy.run_path(args["config"])["get_config"]()
for key, value in args.items():
    if key.startswith("config."):
        name = key[len("config."):]
        cfg[name] = type(cfg[name])(value)
workdir = args["workdir"]
os.makedirs(workdir, exist_ok=True)
with open(os.path.join(os.path.dirname(__file__), "calls.txt"), "a") as f:
    f.write(workdir + "\\n")
with open(os.path.join(os.path.dirname(__file__), "devices.txt"), "a") as f:
    f.write(os.environ.get("CUDA_VISIBLE_DEVICES", "-") + "\\n")
path = os.path.join(workdir, "metrics.jsonl")
done = sum(1 for _ in open(path)) if os.path.exists(path) else 0
for step in range(done + 1, cfg.steps + 1):
    if step == 2 and cfg.crash == "exception":
        raise RuntimeError("boom at step 2")
    if step == 2 and cfg.crash == "kill":
        os.kill(os.getpid(), 9)
    if step == 2 and cfg.crash == "oom":
        print("jaxlib.xla_extension.XlaRuntimeError: RESOURCE_EXHAUSTED: Out of memory while "
              "trying to allocate 1.00GiB.", file=sys.stderr)
        sys.exit(1)
    loss = (cfg.lr - 0.3) ** 2 + cfg.width + 1.0 / step
    if step == 2 and cfg.crash == "nan":
        loss = "nan"
    with open(path, "a") as f:
        f.write(json.dumps({"step": step, "split": "validation", "loss": loss}) + "\\n")
    time.sleep(cfg.sleep_s)
"""


@pytest.fixture
def fake(tmp_path, monkeypatch):
    """A sweep config over the stand-in job; the job's folder is importable by trials."""
    job_dir = tmp_path / "job"
    job_dir.mkdir()
    (job_dir / "fakejob.py").write_text(FAKE_JOB)
    (job_dir / "fake_config.py").write_text(FAKE_CONFIG)
    monkeypatch.setenv("PYTHONPATH", f"{job_dir}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
    monkeypatch.syspath_prepend(str(job_dir))  # check_against_job finds the module
    cfg = common.sweep()
    cfg.program = "fakejob"
    cfg.config = str(job_dir / "fake_config.py")
    cfg.poll_s = 0.05
    cfg.space = ml_collections.ConfigDict({"lr": common.choice(0.1, 0.3),
                                           "width": common.choice(1, 2)})
    return cfg, job_dir


def calls(job_dir) -> list[str]:
    path = job_dir / "calls.txt"
    return path.read_text().splitlines() if path.exists() else []


def trials(workdir) -> list[optuna.trial.FrozenTrial]:
    study = optuna.load_study(study_name=os.path.basename(workdir),
                              storage=sweep.storage_url(str(workdir)))
    return study.get_trials()


def loss(lr, width, step):
    return (lr - 0.3) ** 2 + width + 1.0 / step


def test_grid_runs_every_point_reports_and_resumes(fake, tmp_path):
    cfg, job_dir = fake
    cfg.gpus_per_trial = 1
    workdir = tmp_path / "sw"
    sweep.run_sweep(cfg, str(workdir), parallel=2)
    devices = (job_dir / "devices.txt").read_text().split()
    assert len(devices) == 4 and set(devices) <= {"0", "1"}  # one GPU per trial, two slots

    done = trials(workdir)
    assert len(done) == 4 and all(t.state.name == "COMPLETE" for t in done)
    assert sorted((t.params["lr"], t.params["width"]) for t in done) == [
        (0.1, 1), (0.1, 2), (0.3, 1), (0.3, 2)]
    for t in done:  # the last evaluation's loss, every evaluation reported on the way
        assert t.value == pytest.approx(loss(t.params["lr"], t.params["width"], 6))
        assert sorted(t.intermediate_values) == [1, 2, 3, 4, 5, 6]
        recorded = json.loads((workdir / "trials" / f"{t.number:04d}" / "trial.json").read_text())
        assert recorded["overrides"] == t.params

    with open(workdir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [(float(r["lr"]), int(r["width"])) for r in table] == [
        (0.3, 1), (0.1, 1), (0.3, 2), (0.1, 2)]  # best first
    assert [float(r["objective"]) for r in table] == sorted(float(r["objective"]) for r in table)
    md = (workdir / "results.md").read_text()
    assert md.count("| complete |") == 4 and "| trial | state | lr | width | objective |" in md
    best = runpy.run_path(str(workdir / "best_config.py"))["get_config"]()
    assert (best.lr, best.width, best.steps) == (0.3, 1, 6)
    assert (workdir / "plots" / "objective_vs_params.png").stat().st_size > 0
    assert (workdir / "plots" / "learning_curves.png").stat().st_size > 0

    started = calls(job_dir)
    assert len(started) == 4
    sweep.run_sweep(cfg, str(workdir), parallel=2)  # the same command again: nothing to do
    assert calls(job_dir) == started
    assert len(trials(workdir)) == 4

    cfg.space.lr = common.choice(0.1, 0.2)  # another study in the same workdir is refused
    with pytest.raises(UserError, match="'space' differs"):
        sweep.run_sweep(cfg, str(workdir))


def test_failed_trials_are_recorded_and_the_sweep_goes_on(fake, tmp_path):
    cfg, job_dir = fake
    cfg.space = ml_collections.ConfigDict(
        {"crash": common.choice("exception", "kill", "oom", "nan", "")})
    workdir = tmp_path / "sw"
    sweep.run_sweep(cfg, str(workdir))

    by_crash = {t.params["crash"]: t for t in trials(workdir)}
    assert by_crash[""].state.name == "COMPLETE"
    notes = {crash: t.user_attrs["note"] for crash, t in by_crash.items() if crash}
    assert all(by_crash[c].state.name == "FAIL" for c in notes)
    assert "RuntimeError: boom at step 2" in notes["exception"]
    assert notes["kill"].startswith("killed by SIGKILL")
    assert notes["oom"].startswith("out of memory: ") and "RESOURCE_EXHAUSTED" in notes["oom"]
    assert notes["nan"] == "validation loss is nan at step 2"
    md = (workdir / "results.md").read_text()
    assert md.count("| failed |") == 4 and "killed by SIGKILL" in md
    best = runpy.run_path(str(workdir / "best_config.py"))["get_config"]()
    assert best.crash == ""

    started = calls(job_dir)
    sweep.run_sweep(cfg, str(workdir))  # failures are results: never repeated
    assert calls(job_dir) == started


def test_pruning_stops_a_clearly_bad_trial_early(fake, tmp_path):
    cfg, job_dir = fake
    cfg.space = ml_collections.ConfigDict({"lr": common.choice(0.3, 5.0)})
    cfg.fixed = ml_collections.ConfigDict({"steps": 30, "sleep_s": 0.1})
    cfg.pruner = "median"
    cfg.prune_startup_trials = 1

    def first_point(seed):  # Optuna shuffles the grid by the seed: the good trial goes first
        study = optuna.create_study(sampler=optuna.samplers.GridSampler({"lr": [0.3, 5.0]}, seed))
        return study.ask().suggest_categorical("lr", [0.3, 5.0])

    cfg.seed = next(seed for seed in range(1, 50) if first_point(seed) == 0.3)
    workdir = tmp_path / "sw"
    sweep.run_sweep(cfg, str(workdir))

    good, bad = sorted(trials(workdir), key=lambda t: t.params["lr"])
    assert good.state.name == "COMPLETE" and max(good.intermediate_values) == 30
    assert bad.state.name == "PRUNED"
    written = (workdir / "trials" / f"{bad.number:04d}" / "metrics.jsonl").read_text()
    assert len(written.splitlines()) < 10  # its process was stopped, not left to finish
    assert "| pruned |" in (workdir / "results.md").read_text()


@pytest.mark.parametrize("stop", [signal.SIGKILL, signal.SIGTERM])
def test_an_interrupted_trial_runs_again_in_its_own_workdir(fake, tmp_path, stop):
    """SIGKILL: the sweep dies and its trial with it (no orphan); SIGTERM (or Ctrl-C): the sweep
    stops its trial and exits. Either way the next start runs that trial again."""
    cfg, job_dir = fake
    cfg.space = ml_collections.ConfigDict({"lr": common.choice(0.3)})
    cfg.fixed = ml_collections.ConfigDict({"steps": 40, "sleep_s": 0.1})
    workdir = tmp_path / "sw"
    recipe = tmp_path / "recipe.py"
    recipe.write_text(textwrap.dedent(f"""
        import ml_collections

        def get_config():
            return ml_collections.ConfigDict({cfg.to_dict()!r})
        """))
    proc = subprocess.Popen([sys.executable, "-m", "t5x_like.sweep", f"--config={recipe}",
                             f"--workdir={workdir}"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    metrics = workdir / "trials" / "0000" / "metrics.jsonl"
    deadline = time.time() + 60
    while time.time() < deadline and not (metrics.exists() and len(metrics.read_text()) > 100):
        time.sleep(0.1)
    proc.send_signal(stop)
    assert proc.wait(60) == (-9 if stop == signal.SIGKILL else 0)
    time.sleep(0.5)
    stopped_at = len(metrics.read_text().splitlines())
    assert 0 < stopped_at < 40
    time.sleep(0.5)
    assert len(metrics.read_text().splitlines()) == stopped_at

    sweep.run_sweep(cfg, str(workdir))
    assert calls(job_dir) == [str(workdir / "trials" / "0000")] * 2  # same workdir, resumed
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == list(range(1, 41))
    table = (workdir / "results.md").read_text()
    assert table.count("| complete |") == 1 and "interrupted" not in table.split("\n\n")[1]


@pytest.mark.parametrize("change, message", [
    ({"space": {"optimizer": {"lrr": common.choice(1e-3)}}},
     "'space.optimizer.lrr': configs/pretrain_tiny.py has no config key optimizer.lrr"),
    ({"space": {"optimizer": {"lr": common.uniform(1e-4, 1e-2)}}},
     "a grid takes choice\\(\\) values only"),
    ({"space": {"data": {"batch_size": common.choice("big")}}},
     "'big' does not fit config key data.batch_size"),
    ({"sampler": "tpe", "space": {"optimizer": {"lr": common.log_uniform(1e-4, 1e-2)}}},
     "'trials': is 0; sampler tpe needs a trial budget"),
    ({"space": {}}, "'space': is empty"),
])
def test_bad_sweep_configs_fail_before_any_trial(tmp_path, monkeypatch, change, message):
    monkeypatch.chdir(ROOT)
    cfg = common.sweep()
    for key, value in change.items():
        cfg[key] = ml_collections.ConfigDict(value) if isinstance(value, dict) else value
    with pytest.raises(UserError, match=message):
        sweep.run_sweep(cfg, str(tmp_path / "sw"))
    assert not (tmp_path / "sw" / "study.db").exists()


def tiny_sweep(tiny_cfg, monkeypatch, **fixed):
    """A sweep config over the real trainer with the tests' tiny model (configs/base.py plus
    tiny_cfg's differences as fixed overrides); trials get one CPU device each."""
    from configs import base

    monkeypatch.setenv("XLA_FLAGS", TEST_XLA_FLAGS)  # not the tests' 8 fake devices
    monkeypatch.chdir(ROOT)
    default = sweep_config.flatten(base.get_config())
    flat = {k: v for k, v in sweep_config.flatten(tiny_cfg).items()
            if v != default.get(k) and k != "data.cache_dir"}  # the sweep prepares the data
    flat.update(fixed)
    nested: dict = {}
    for key, value in flat.items():
        *parents, name = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[name] = value
    cfg = common.sweep()
    cfg.config = "configs/base.py"
    cfg.fixed = ml_collections.ConfigDict(nested)
    return cfg


def test_grid_on_the_tiny_config_trains_four_runs(tiny_cfg, tmp_path, monkeypatch):
    """The real trainer: 2 learning rates x 2 batch sizes, two trials at a time."""
    cfg = tiny_sweep(tiny_cfg, monkeypatch, **{"steps": 2, "checkpoint.every_steps": 100})
    cfg.space = ml_collections.ConfigDict({"optimizer": {"lr": common.choice(3e-3, 1e-2)},
                                           "data": {"batch_size": common.choice(4, 8)}})
    workdir = tmp_path / "sw"
    sweep.run_sweep(cfg, str(workdir), parallel=2)

    done = trials(workdir)
    assert [t.state.name for t in done] == ["COMPLETE"] * 4
    for t in done:
        run = workdir / "trials" / f"{t.number:04d}"
        saved = json.loads((run / "config.json").read_text())
        assert saved["optimizer"]["lr"] == t.params["optimizer.lr"]
        assert saved["data"]["batch_size"] == t.params["data.batch_size"]
        assert saved["data"]["cache_dir"] == str(workdir / "data")  # prepared once, shared
        last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
                if '"validation"' in line][-1]
        assert t.value == last["loss"] and t.user_attrs["steps"] == 2
    with open(workdir / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 4 and [float(r["objective"]) for r in table] == sorted(
        t.value for t in done)
    best = runpy.run_path(str(workdir / "best_config.py"))["get_config"]()
    winner = min(done, key=lambda t: t.value)
    assert best.optimizer.lr == winner.params["optimizer.lr"] and best.model.hidden_dim == 32


@pytest.mark.slow
def test_a_nan_loss_fails_its_trial_with_the_trainers_reason(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_sweep(tiny_cfg, monkeypatch, **{"steps": 4, "checkpoint.every_steps": 100})
    cfg.space = ml_collections.ConfigDict({"optimizer": {"lr": common.choice(1e30, 3e-3)}})
    workdir = tmp_path / "sw"
    sweep.run_sweep(cfg, str(workdir))

    by_lr = {t.params["optimizer.lr"]: t for t in trials(workdir)}
    assert by_lr[3e-3].state.name == "COMPLETE"
    assert by_lr[1e30].state.name == "FAIL"
    assert "the loss or gradients became NaN/Inf" in by_lr[1e30].user_attrs["note"]


@pytest.mark.parametrize("recipe", ["pretrain_lr_batch", "sft_search", "generate_sampling"])
def test_recipes_name_keys_their_jobs_have(recipe, monkeypatch):
    monkeypatch.chdir(ROOT)
    cfg = runpy.run_path(os.path.join(ROOT, "configs", "sweeps", f"{recipe}.py"))["get_config"]()
    sweep_config.validate(cfg)
    if not os.path.exists(cfg.config):  # the sampling recipe's evaluation suite (branch eval)
        assert recipe == "generate_sampling"
        with pytest.raises(UserError, match="configs/eval/demo.py does not exist"):
            sweep_config.check_against_job(cfg)
        return
    sweep_config.check_against_job(cfg)
