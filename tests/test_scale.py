"""Scale-out: two processes equal one, launchers' dry runs, and the sizing planner."""

import os
import shlex
import subprocess
import sys

import pytest

from conftest import ROOT, TEST_XLA_FLAGS
from t5x_like.core import metrics as metrics_lib

TINY = ["--config=configs/base.py", "--config.model.hidden_dim=32", "--config.model.num_layers=2",
        "--config.model.num_heads=4", "--config.model.num_kv_heads=2", "--config.model.mlp_dim=64",
        "--config.model.max_len=32", "--config.data.batch_size=8",
        "--config.data.synthetic_docs=400", "--config.data.vocab_size=400",
        "--config.log_every_steps=1", "--config.eval.every_steps=0", "--config.eval.steps=0",
        "--config.optimizer.schedule=constant", "--config.optimizer.warmup_steps=0",
        "--config.data.num_shards=2", "--config.mesh.data=2", "--config.mesh.fsdp=2"]


def env(devices):
    return {**os.environ,
            "XLA_FLAGS": f"{TEST_XLA_FLAGS} --xla_force_host_platform_device_count={devices}",
            "DEVICES_PER_PROCESS": str(devices),
            "JAX_COMPILATION_CACHE_DIR": "/tmp/t5x_like_test_jax_cache",
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}


def losses(workdir, split="train"):
    return [(r["step"], r["loss"]) for r in metrics_lib.read_metrics(str(workdir))
            if r["split"] == split]


def _copy_run(src, dst, step):
    """A workdir holding only `src`'s checkpoint `step` (as if the run had stopped there)."""
    os.makedirs(dst / "checkpoints")
    for name in ("config.json", "tokenizer.model"):
        subprocess.run(["cp", str(src / name), str(dst)], check=True)
    subprocess.run(["cp", "-r", str(src / "checkpoints" / str(step)), str(dst / "checkpoints")],
                   check=True)


def test_two_processes_match_one_and_checkpoints_cross_process_counts(tmp_path):
    cache = f"--config.data.cache_dir={tmp_path / 'cache'}"
    single, multi, back = tmp_path / "single", tmp_path / "multi", tmp_path / "back"
    common = [*TINY, cache, "--config.steps=6", "--config.checkpoint.every_steps=2",
              "--config.eval.every_steps=2"]
    # Reference: one process with 4 devices and 2 data shards, 6 steps.
    subprocess.run([sys.executable, "-m", "t5x_like.train", *common, f"--workdir={single}"],
                   cwd=ROOT, env=env(4), check=True, capture_output=True, timeout=600)
    want = dict(losses(single))
    want_eval = dict(losses(single, "validation"))

    # Two processes with 2 devices each resume the one-process checkpoint of step 2 and train
    # to step 4: the same global batches (each process reads its shard), the same losses.
    _copy_run(single, multi, 2)
    run = subprocess.run(["bash", "launch/local_multiprocess.sh", "2", *common,
                          "--config.steps=4", f"--workdir={multi}"],
                         cwd=ROOT, env=env(2), capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(os.listdir(multi / "logs")) == ["process_0.log", "process_1.log"]
    got = dict(losses(multi))
    assert sorted(got) == [3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step
    # Whole-split evaluation does not depend on how processes divide the split.
    assert dict(losses(multi, "validation"))[4] == pytest.approx(want_eval[4], rel=1e-5)

    # And the checkpoint both processes wrote at step 4 resumes in one process.
    _copy_run(multi, back, 4)
    subprocess.run([sys.executable, "-m", "t5x_like.train", *common, f"--workdir={back}"],
                   cwd=ROOT, env=env(4), check=True, capture_output=True, timeout=600)
    got = dict(losses(back))
    assert sorted(got) == [5, 6]
    for step in (5, 6):
        assert got[step] == pytest.approx(want[step], rel=1e-5), step


def test_multiprocess_launcher_reports_a_failing_process(tmp_path):
    run = subprocess.run(
        ["bash", "launch/local_multiprocess.sh", "2", *TINY, "--config.model.num_heads=3",
         f"--workdir={tmp_path}"], cwd=ROOT, env=env(1), capture_output=True, text=True,
        timeout=300)
    assert run.returncode == 2
    assert "process 0 failed (exit 2)" in run.stderr or "process 1 failed (exit 2)" in run.stderr
    assert "model.num_kv_heads" in run.stderr


def dry_run(script, *args):
    result = subprocess.run(["bash", f"launch/{script}", *args], cwd=ROOT, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_tpu_pod_dry_run_prints_every_command():
    out = dry_run("tpu_pod.sh", "--tpu=pod1", "--zone=us-east5-a", "--accelerator=v5p-8",
                  "--project=proj", "--dry-run", "--", "--config=configs/llama_1b.py",
                  "--workdir=gs://bucket/runs/1b", "--config.data.source=text:gs://b/*.txt")
    commands = [line[2:] for line in out.splitlines() if line.startswith("+ ")]
    assert commands[0].startswith("gcloud compute tpus tpu-vm create pod1 --zone=us-east5-a "
                                  "--project=proj --accelerator-type=v5p-8")
    assert commands[1].startswith("git archive")
    assert "scp" in commands[2] and "--worker=all" in commands[2]
    install, train = shlex.split(commands[3]), shlex.split(commands[4])
    assert "--worker=all" in install and "pip install" in install[-1]
    assert "--worker=all" in train
    remote = train[-1].split("=", 1)[1]  # --command=<what every worker runs>
    assert "python -m t5x_like.train --config=configs/llama_1b.py --workdir=gs://bucket/runs/1b" \
        in remote
    # The glob reaches the workers intact (quoted for their shell), and each logs to its own file.
    assert shlex.split(remote.split("-m t5x_like.train")[1].split("2>&1")[0])[-1] == \
        "--config.data.source=text:gs://b/*.txt"
    assert "worker-$(hostname).log" in remote


def test_slurm_dry_run_prints_the_batch_script():
    out = dry_run("gpu_slurm.sh", "--nodes=4", "--gpus-per-node=8", "--partition=a3",
                  "--dry-run", "--", "--config=configs/llama_1b.py", "--workdir=/shared/r")
    assert "#SBATCH --nodes=4" in out and "#SBATCH --ntasks-per-node=1" in out
    assert "#SBATCH --gpus-per-node=8" in out and "#SBATCH --partition=a3" in out
    assert "srun --output=logs/%x-%j-%N.log .venv/bin/python -m t5x_like.train " \
           "--config=configs/llama_1b.py --workdir=/shared/r" in out
    assert out.rstrip().splitlines()[-1].startswith("+ sbatch launch_logs/t5x_like-")


def test_launchers_reject_missing_arguments():
    for script in ("tpu_pod.sh", "gpu_slurm.sh", "local_multiprocess.sh"):
        result = subprocess.run(["bash", f"launch/{script}"], cwd=ROOT, capture_output=True,
                                text=True, timeout=60)
        assert result.returncode == 2 and "usage" in result.stderr


def plan_cmd(*args, devices=8):
    result = subprocess.run([sys.executable, "-m", "t5x_like.plan", *args], cwd=ROOT,
                            env={**os.environ, "XLA_FLAGS": ""}, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_plan_sizes_a_7b_model_without_allocating_it():
    out = plan_cmd("--config=configs/llama_7b.py", "--topology=v5p-64", "--compile=false")
    assert "parameters            6.738 B" in out
    assert "mesh {'data': 1, 'fsdp': 32, 'expert': 1, 'sequence': 1, 'tensor': 1}" in out
    # 6.74e9 float32 parameters over 32 devices: 0.784 GiB each, plus the replicated norm
    # scales (1 MiB); Adam moments twice that.
    assert "params    0.79 GiB" in out and "optimizer 1.57 GiB" in out
    assert "layers/w_down" in out and "(32, 11008, 128)" in out


def test_plan_compiles_the_real_step(tmp_path):
    out = plan_cmd("--config=configs/pretrain_tiny.py", "--topology=custom", "--devices=4",
                   "--hbm_gib=1", "--config.mesh.data=2", "--config.mesh.fsdp=2")
    assert "compiled train step, per device" in out and "fits" in out
    bad = subprocess.run([sys.executable, "-m", "t5x_like.plan", "--config=configs/llama_1b.py",
                          "--topology=v5p-8", "--config.mesh.tensor=3"], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "mesh (" in bad.stderr and "does not divide the 4" in bad.stderr
