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
from t5x_like import export
from t5x_like.training import checkpoints
from t5x_like.core import config as config_lib
from t5x_like.modeling import partitioning
from t5x_like.core import runs
from t5x_like.training import trainer
from t5x_like.training import batches as batches_lib
from t5x_like.training import state as state_lib
from t5x_like.core import metrics as metrics_lib
from t5x_like.core.errors import EnvironmentFailure, UserError

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
        spec = state_lib.state_spec(cfg, mesh)
        return spec, state_lib.init_state(cfg, spec)


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
            target = state_lib.state_spec(cfg, mesh).abstract
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
    # 4 KB of random bytes over the parameters: restored unchecked, they resumed with loss=nan
    # and made `sample` fail with "IndexError: piece id is out of range".
    _scribble(_biggest_params_file(str(tmp_path / "checkpoints" / "4")))
    with pytest.raises(checkpoints.DamagedCheckpoint,  # sample, evaluate, export, init_from
                       match=r"checkpoints/4 is damaged: params/\S+ does not match the checksum "
                             r"recorded when it was written; .*\(steps here: 2\)"):
        runs.load(str(tmp_path))
    assert runs.load(str(tmp_path), step=2).step == 2
    longer = tiny_cfg.copy_and_resolve_references()
    longer.steps = 6
    _run(longer, tmp_path)
    assert "does not match the checksum" in caplog.text and "checkpoints/4" in caplog.text
    assert glob.glob(str(tmp_path / "checkpoints" / "damaged-4-*"))
    steps = [r["step"] for r in metrics_lib.read_metrics(str(tmp_path)) if r["split"] == "train"]
    assert steps == [2, 3, 4, 5, 6] or steps == [2, 4, 6]  # resumed after step 2
    assert all(np.isfinite(loss) for _, loss in train_losses(tmp_path))
    assert final_params(tmp_path)[0] == 6


def _poison_step(monkeypatch, poisoned_step):
    """Makes the batch of one step carry NaN loss weights (as a corrupt record would)."""
    real = batches_lib.global_batch
    calls = {"n": 0}

    def poisoned(local, mesh):
        calls["n"] += 1
        if calls["n"] == poisoned_step:
            local = dict(local, weights=np.full_like(local["weights"], np.nan))
        return real(local, mesh)

    monkeypatch.setattr(batches_lib, "global_batch", poisoned)


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


# ---------------------------------------------------------------------------------------------
# Seals (integrity.json), damaged checkpoints, failed writes.


def _small_state(n=4096):
    return {"step": jnp.zeros((), jnp.int32), "params": {"w": jnp.arange(n, dtype=jnp.float32)},
            "opt_state": {"m": jnp.ones(n)}}


def _abstract(state):
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                        state)


def _biggest_params_file(step_dir):
    files = [p for p in glob.glob(os.path.join(step_dir, "params", "**", "*"), recursive=True)
             if os.path.isfile(p)]
    return max(files, key=os.path.getsize)


def _scribble(path, nbytes=4096):
    """Overwrites `nbytes` in the middle of `path` with random bytes (the file keeps its size)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(max(0, size // 2 - nbytes // 2))
        f.write(np.random.default_rng(0).bytes(min(nbytes, size)))


def test_checkpoints_are_sealed_and_damage_is_named(tmp_path, caplog):
    directory = checkpoints.checkpoint_dir(str(tmp_path))
    state = _small_state()
    ckpt = checkpoints.Checkpointer(directory, async_save=True)
    for step in (1, 2, 3):
        ckpt.save(step, state)
    ckpt.close()  # seals the last one too
    for step in (1, 2, 3):
        manifest = json.load(open(os.path.join(directory, str(step), "integrity.json")))
        assert any(f.startswith("params/") for f in manifest["files"])
        assert any(f.startswith("train/") for f in manifest["files"])
    target = _abstract(state)

    # 4 KB of random bytes in a params file: named at restore, never restored as garbage.
    bad = _biggest_params_file(os.path.join(directory, "3"))
    _scribble(bad)
    rel = os.path.relpath(bad, os.path.join(directory, "3"))
    with pytest.raises(checkpoints.DamagedCheckpoint,
                       match=rf"checkpoint {directory}/3 is damaged: {rel} does not match the "
                             r"checksum.*pick another checkpoint \(steps here: 1, 2\)"):
        checkpoints.restore_params(str(tmp_path), target["params"])
    params, step = checkpoints.restore_params(str(tmp_path), target["params"], step=2)
    assert step == 2
    np.testing.assert_array_equal(params["w"], np.arange(4096, dtype=np.float32))
    # A truncated file: its size differs.
    bad2 = _biggest_params_file(os.path.join(directory, "2"))
    with open(bad2, "r+b") as f:
        f.truncate(os.path.getsize(bad2) - 1)
    with pytest.raises(checkpoints.DamagedCheckpoint, match=r"/2 is damaged: .* bytes where"):
        checkpoints.Checkpointer(directory).restore(2, target)

    # Resuming moves damaged checkpoints aside and takes the newest intact one.
    ckpt = checkpoints.Checkpointer(directory)
    restored = ckpt.restore_newest_valid(target)
    ckpt.close()
    assert int(restored["step"]) == 0 and sorted(
        n.split("-")[1] for n in os.listdir(directory) if n.startswith("damaged-")) == ["2", "3"]
    assert "does not match the checksum" in caplog.text

    # Every checkpoint damaged: one error, nothing deleted, and a rerun refuses too.
    _scribble(_biggest_params_file(os.path.join(directory, "1")))
    for _ in range(2):
        ckpt = checkpoints.Checkpointer(directory)
        with pytest.raises(UserError, match=r"every checkpoint in .* is damaged \(kept, moved "
                                            r"aside as damaged-1-\d+, damaged-2-\d+, damaged-3-"):
            ckpt.restore_newest_valid(target)
        ckpt.close()
    assert sorted(n.split("-")[1] for n in os.listdir(directory)) == ["1", "2", "3"]


def test_unsealed_checkpoint_restores_with_one_warning(tmp_path, caplog):
    directory = str(tmp_path / "checkpoints")
    state = _small_state()
    ckpt = checkpoints.Checkpointer(directory, async_save=False)
    ckpt.save(5, state)
    ckpt.close()
    os.remove(os.path.join(directory, "5", "integrity.json"))  # as an older t5x_like wrote it
    for _ in range(2):
        params, step = checkpoints.restore_params(str(tmp_path), _abstract(state)["params"])
        assert step == 5
    np.testing.assert_array_equal(params["w"], np.arange(4096, dtype=np.float32))
    assert caplog.text.count("has no integrity.json") == 1


@pytest.fixture
def file_size_limit():
    """set(nbytes): writes past nbytes fail with EFBIG (File too large) as on a full disk, in
    this process only and without mounting anything; restored afterwards."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of a kill
    yield lambda nbytes: resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    signal.signal(signal.SIGXFSZ, previous)


@pytest.mark.parametrize("async_save", [True, False])
def test_failed_save_is_one_error_and_keeps_the_last_good_checkpoint(
        tmp_path, file_size_limit, async_save):
    directory = str(tmp_path / "checkpoints")
    state = _small_state(1 << 20)  # 4 MB arrays, over the limit below
    ckpt = checkpoints.Checkpointer(directory, async_save=async_save, max_to_keep=1)
    ckpt.save(1, state)
    ckpt.wait()
    file_size_limit(1 << 20)
    want = (rf"cannot write checkpoint {directory}/2: File too large \(disk full\?\); training "
            rf"stopped, the last good checkpoint, {directory}/1, is intact")
    with pytest.raises(EnvironmentFailure, match=want) as failure:
        ckpt.save(2, state)  # a synchronous save fails here,
        ckpt.save(3, state)  # an asynchronous one at the next save (or wait, or close)
    assert failure.value.exit_code == 1
    ckpt.close()  # already reported: no second error
    file_size_limit(-1)  # (RLIM_INFINITY)
    assert sorted(n for n in os.listdir(directory) if n.isdigit()) == ["1"]  # max_to_keep=1 kept it
    # (TensorStore may still be finishing the failed save's other writes in this process: a
    # rerun, a new process, removes its temporary folder; the test below.)
    params, step = checkpoints.restore_params(str(tmp_path), _abstract(state)["params"])
    assert step == 1  # verified against its seal
    np.testing.assert_array_equal(params["w"], np.arange(1 << 20, dtype=np.float32))


def test_unwritable_workdir_is_one_error_before_any_work(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "prepare_data", lambda *a: pytest.fail("prepared data"))
    with pytest.raises(EnvironmentFailure, match="cannot write to the workdir /proc/x/run: No such "
                                                 "file or directory; choose a --workdir"):
        _run(tiny_cfg, "/proc/x/run")
    (tmp_path / "file").write_text("mine")
    with pytest.raises(UserError, match="is a file, not a folder"):
        _run(tiny_cfg, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "mine"
    result = subprocess.run(train_cmd("/proc/x/run", tmp_path / "cache"), cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        "error: cannot write to the workdir /proc/x/run: No such file or directory; choose a "
        "--workdir on a writable disk."]
    assert "Traceback" not in result.stderr


# Runs `python -m t5x_like.train ARGS` with writes past LIMIT bytes failing (EFBIG, as on a
# full disk) from the save of step FAIL_AT on, once the earlier saves have committed.
_FULL_DISK_TRAIN = """
import resource, runpy, signal, sys
from t5x_like.training import checkpoints
fail_at, limit = int(sys.argv.pop(1)), int(sys.argv.pop(1))
real_save = checkpoints.Checkpointer.save
def save(self, step, *args, **kwargs):
    if step == fail_at:
        self.wait()
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
    return real_save(self, step, *args, **kwargs)
checkpoints.Checkpointer.save = save
runpy.run_module("t5x_like.train", run_name="__main__", alter_sys=True)
"""


def test_disk_full_stops_training_with_one_error_line_and_a_rerun_resumes(tmp_path):
    workdir, cache = tmp_path / "run", tmp_path / "cache"
    extra = ["--config.steps=8", "--config.checkpoint.every_steps=2"]
    cmd = train_cmd(workdir, cache, *extra)
    full = subprocess.run([cmd[0], "-c", _FULL_DISK_TRAIN, "4", "32768", *cmd[3:]], cwd=ROOT,
                          env=env(), capture_output=True, text=True, timeout=600)
    assert full.returncode == 1, full.stderr[-3000:]
    errors = [line for line in full.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: cannot write checkpoint {workdir}/checkpoints/4: File too large (disk full?); "
        f"training stopped, the last good checkpoint, {workdir}/checkpoints/2, is intact"), errors
    assert "Traceback" not in full.stderr and "final validation" not in full.stdout
    assert max(s for s, _ in train_losses(workdir)) == 6  # stopped at the next save
    steps = [n for n in os.listdir(workdir / "checkpoints") if n.isdigit()]
    assert steps == ["2"] and os.path.isfile(workdir / "checkpoints" / "2" / "integrity.json")

    rerun = subprocess.run(cmd, cwd=ROOT, env=env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "final validation" in rerun.stdout
    assert [s for s, _ in train_losses(workdir)] == list(range(1, 9))  # resumed after step 2
    assert not [n for n in os.listdir(workdir / "checkpoints") if "tmp" in n]
