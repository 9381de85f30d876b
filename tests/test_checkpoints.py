"""Checkpoints: exact resume after SIGKILL, SIGTERM, resharding, init_from, damage, NaN, export."""

import glob
import json
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from conftest import ROOT
from t5x_like import checkpoints, config as config_lib, export, partitioning, runs, trainer
from t5x_like import metrics as metrics_lib
from t5x_like.errors import UserError

TINY = ["--config.model.hidden_dim=32", "--config.model.num_layers=2",
        "--config.model.num_heads=4", "--config.model.num_kv_heads=2",
        "--config.model.mlp_dim=64", "--config.model.max_len=32", "--config.data.batch_size=8",
        "--config.data.synthetic_docs=400", "--config.data.vocab_size=400",
        "--config.log_every_steps=1", "--config.eval.every_steps=0", "--config.eval.steps=1",
        "--config.optimizer.warmup_steps=2", "--config.model.dropout=0.1"]


def train_cmd(workdir, cache, *extra):
    return [sys.executable, "-m", "t5x_like.train", "--config=configs/base.py",
            f"--workdir={workdir}", f"--config.data.cache_dir={cache}", *TINY, *extra]


def env():
    # Subprocesses share one persistent compilation cache: only the first run compiles.
    return {**os.environ, "JAX_COMPILATION_CACHE_DIR": os.environ.get(
        "T5X_LIKE_TEST_JAX_CACHE", "/tmp/t5x_like_test_jax_cache"),
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def train_losses(workdir):
    return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(str(workdir))
            if r["split"] == "train"]


def logged(step, workdir):
    return any(s == step for s, _ in train_losses(workdir))


def final_params(workdir):
    run = runs.load(str(workdir))
    return run.step, jax.device_get(run.params)


def wait_for(predicate, proc, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"training ended before the kill point: {proc.stderr.read()}")
        time.sleep(0.05)
    raise AssertionError("kill point never reached")


def test_sigkill_at_any_point_then_resume_is_bit_identical(tmp_path):
    cache = tmp_path / "cache"
    extra = ["--config.steps=12", "--config.checkpoint.every_steps=3"]
    straight = tmp_path / "straight"
    subprocess.run(train_cmd(straight, cache, *extra), cwd=ROOT, env=env(), check=True,
                   capture_output=True, timeout=600)
    want_losses, (want_step, want_params) = train_losses(straight), final_params(straight)
    assert [s for s, _ in want_losses] == list(range(1, 13))

    ckpt = lambda w: glob.glob(str(w / "checkpoints" / "*"))
    kill_points = {
        "before the first checkpoint": lambda w: logged(2, w),
        "while a checkpoint is being written": lambda w: any(
            "tmp" in os.path.basename(p) for p in ckpt(w)) and logged(6, w),
        "between checkpoints": lambda w: logged(8, w),
    }
    for name, point in kill_points.items():
        workdir = tmp_path / name.replace(" ", "_")
        proc = subprocess.Popen(train_cmd(workdir, cache, *extra), cwd=ROOT, env=env(),
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_for(lambda: point(workdir), proc)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
        subprocess.run(train_cmd(workdir, cache, *extra), cwd=ROOT, env=env(), check=True,
                       capture_output=True, timeout=600)
        # Every step exactly once (nothing replayed or skipped), losses bit-identical.
        assert train_losses(workdir) == want_losses, name
        step, params = final_params(workdir)
        assert step == want_step
        jax.tree.map(np.testing.assert_array_equal, params, want_params)


def test_sigterm_saves_the_current_step_and_exits_cleanly(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.Popen(
        train_cmd(workdir, tmp_path / "cache", "--config.steps=100000",
                  "--config.checkpoint.every_steps=50000"),
        cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: logged(3, workdir), proc)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err[-3000:]
    stopped = int(out.split("preempted at step ")[1].split(":")[0])
    assert stopped >= 3
    assert checkpoints.Checkpointer(str(workdir / "checkpoints")).latest_step() == stopped


def _state_on(cfg, mesh):
    with jax.set_mesh(mesh):
        spec = trainer.state_spec(cfg, mesh)
        return spec, trainer.init_state(cfg, spec)


@pytest.fixture
def tiny_resolved(tiny_cfg):
    tiny_cfg.model.num_kv_heads = 4
    return config_lib.resolve(tiny_cfg, 300)


def test_restore_onto_other_meshes_gives_the_saved_values(tiny_resolved, tmp_path):
    cfg = tiny_resolved
    mesh_of = lambda **axes: partitioning.make_mesh(
        ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, **axes}),
        jax.devices()[:int(np.prod(list(axes.values()) or [1]))])
    spec, state = _state_on(cfg, mesh_of(data=2, fsdp=2, tensor=2))
    ckpt = checkpoints.Checkpointer(str(tmp_path / "ckpt"), async_save=False)
    ckpt.save(0, state)
    ckpt.close()
    saved = jax.device_get(state)
    for mesh in (mesh_of(data=8), mesh_of(fsdp=4, tensor=2), mesh_of()):
        with jax.set_mesh(mesh):
            target = trainer.state_spec(cfg, mesh).abstract
            restored = checkpoints.Checkpointer(str(tmp_path / "ckpt")).restore(0, target)
        for leaf, want in zip(jax.tree.leaves(restored), jax.tree.leaves(saved)):
            np.testing.assert_array_equal(np.asarray(leaf), want)
        assert restored["params"]["layers"]["wq"].sharding.mesh.shape == mesh.shape


def test_keep_last_n_and_best_k(tmp_path):
    ckpt = checkpoints.Checkpointer(str(tmp_path), max_to_keep=1, keep_best_by="loss",
                                    keep_best=1, best_mode="min", async_save=False)
    state = {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.ones(3)},
             "opt_state": {"m": jnp.zeros(3)}}
    for step, loss in zip(range(1, 6), [3.0, 1.0, 2.0, 4.0, 5.0]):
        ckpt.save(step, state, metrics={"loss": loss})
    ckpt.close()
    assert sorted(int(p) for p in os.listdir(tmp_path) if p.isdigit()) == [2, 5]


def _run(cfg, workdir):
    return trainer.train_and_evaluate(cfg.copy_and_resolve_references(), str(workdir))


def test_init_from_starts_at_step_zero_with_the_parameters(tiny_cfg, tmp_path):
    _run(tiny_cfg, tmp_path / "pretrain")
    pre_step, pre_params = final_params(tmp_path / "pretrain")

    child = tiny_cfg.copy_and_resolve_references()
    child.init_from = str(tmp_path / "pretrain")
    child.steps = 1
    child.optimizer.lr = 1e-30  # one (vanishingly small) step: parameters barely move
    child.data.vocab_size = 1000  # would train another tokenizer; init_from's is inherited
    _run(child, tmp_path / "child")
    assert [r["step"] for r in metrics_lib.read_metrics(str(tmp_path / "child"))
            if r["split"] == "train"] == [1]
    step, params = final_params(tmp_path / "child")
    assert step == 1
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6), params, pre_params)
    assert (open(tmp_path / "child" / "tokenizer.model", "rb").read()
            == open(tmp_path / "pretrain" / "tokenizer.model", "rb").read())
    # Pointing at one checkpoint of the run works too.
    assert checkpoints.locate(str(tmp_path / "pretrain" / "checkpoints" / str(pre_step))) == (
        str(tmp_path / "pretrain"), pre_step)

    bigger = child.copy_and_resolve_references()
    bigger.model.num_layers = 3
    with pytest.raises(UserError, match=r"model.num_layers: 2 in .*pretrain/config.json, 3 in"):
        _run(bigger, tmp_path / "bigger")
    nowhere = child.copy_and_resolve_references()
    nowhere.init_from = str(tmp_path / "missing")
    with pytest.raises(UserError, match="neither a t5x_like run or model directory"):
        _run(nowhere, tmp_path / "nowhere")


def test_damaged_latest_checkpoint_falls_back_to_the_previous(tiny_cfg, tmp_path, caplog):
    _run(tiny_cfg, tmp_path)  # 4 steps, checkpoints at 2 and 4
    files = [p for p in glob.glob(str(tmp_path / "checkpoints" / "4" / "params" / "**" / "*"),
                                  recursive=True) if os.path.isfile(p)]
    biggest = max(files, key=os.path.getsize)
    with open(biggest, "r+b") as f:
        f.truncate(os.path.getsize(biggest) // 2)
    longer = tiny_cfg.copy_and_resolve_references()
    longer.steps = 6
    _run(longer, tmp_path)
    assert "cannot be restored" in caplog.text and "checkpoints/4" in caplog.text
    assert glob.glob(str(tmp_path / "checkpoints" / "damaged-4-*"))
    steps = [r["step"] for r in metrics_lib.read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert steps == [2, 3, 4, 5, 6] or steps == [2, 4, 6]  # resumed after step 2
    assert final_params(tmp_path)[0] == 6


def _poison_step(monkeypatch, poisoned_step):
    """Makes the batch of one step carry NaN loss weights (as a corrupt record would)."""
    real = trainer.global_batch
    calls = {"n": 0}

    def poisoned(local, mesh):
        calls["n"] += 1
        if calls["n"] == poisoned_step:
            local = dict(local, weights=np.full_like(local["weights"], np.nan))
        return real(local, mesh)

    monkeypatch.setattr(trainer, "global_batch", poisoned)


def test_nan_batch_is_skipped(tiny_cfg, tmp_path, monkeypatch):
    tiny_cfg.optimizer.on_nonfinite = "skip"
    tiny_cfg.log_every_steps = 1
    _poison_step(monkeypatch, 3)
    _run(tiny_cfg, tmp_path)
    train = {r["step"]: r for r in metrics_lib.read_metrics(str(tmp_path)) if r["split"] == "train"}
    assert [train[s]["nonfinite_steps"] for s in (1, 2, 3, 4)] == [0, 0, 1, 1]
    _, params = final_params(tmp_path)
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_nan_batch_stops_the_run(tiny_cfg, tmp_path, monkeypatch):
    tiny_cfg.optimizer.on_nonfinite = "stop"
    _poison_step(monkeypatch, 3)
    with pytest.raises(UserError, match="step 3: the loss or gradients became NaN/Inf"):
        _run(tiny_cfg, tmp_path)
    _, params = final_params(tmp_path)  # the step-2 checkpoint, finite
    assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_export_writes_a_loadable_model_directory(tiny_cfg, tmp_path):
    _run(tiny_cfg, tmp_path / "run")
    out = export.export(str(tmp_path / "run"), str(tmp_path / "model"), dtype="bfloat16")
    assert sorted(os.listdir(out)) == ["checkpoints", "config.json", "tokenizer.model"]
    assert json.loads(open(os.path.join(out, "config.json")).read())["model"]["param_dtype"] == \
        "bfloat16"
    model_dir = runs.load(out)
    run = runs.load(str(tmp_path / "run"))
    assert model_dir.step == run.step == 4
    for a, b in zip(jax.tree.leaves(model_dir.params), jax.tree.leaves(run.params)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b.astype(jnp.bfloat16)))
    assert not os.listdir(out + "/checkpoints/4").count("train")  # parameters only
    with pytest.raises(UserError, match="already exists"):
        export.export(str(tmp_path / "run"), out)
    # The exported directory is a valid init_from (bfloat16 weights into a float32 run).
    child = tiny_cfg.copy_and_resolve_references()
    child.init_from = out
    child.steps = 2
    _run(child, tmp_path / "child")
    assert final_params(tmp_path / "child")[0] == 2
