"""Cost of checkpointing to the training step: async vs synchronous Orbax saves.

    python -m benchmarks.checkpoint_overhead [--steps=60] [--every=10] [--config=configs/pretrain_tiny.py]

Runs the real jitted train step of the config (synthetic batches, so only the step and the save
are timed) for --steps steps three ways: never saving, saving every --every steps asynchronously,
and saving synchronously. Overhead = extra wall time per step relative to never saving.
"""

import argparse
import os
import runpy
import shutil
import tempfile
import time

import jax
import numpy as np

from benchmarks import common
from t5x_like.training import batches as batches_lib
from t5x_like.training import state as state_lib
from t5x_like.training.tasks import lm
from t5x_like.training import checkpoints
from t5x_like.core import config as config_lib
from t5x_like.modeling import partitioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def synthetic_batch(cfg, rng):
    B, T = cfg.data.batch_size, cfg.model.max_len
    tokens = rng.integers(4, cfg.model.vocab_size, (B, T + 1)).astype(np.int32)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "weights": np.ones((B, T), np.float32), "segment_ids": np.ones((B, T), np.int32),
            "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()}


def run(cfg, steps: int, every: int, mode: str) -> float:
    """Seconds per step over `steps` steps, saving every `every` steps in `mode`."""
    mesh = partitioning.make_mesh(cfg.mesh)
    rng = np.random.default_rng(0)
    batches = [batches_lib.global_batch(synthetic_batch(cfg, rng), mesh) for _ in range(4)]
    directory = tempfile.mkdtemp(prefix="ckpt-bench-")
    try:
        with jax.set_mesh(mesh):
            spec = state_lib.state_spec(cfg, mesh)
            step_fn, _ = lm.compile_steps(cfg, spec, mesh)
            state = state_lib.init_state(cfg, spec)
            for i in range(3):  # compile and warm up
                state, m = step_fn(state, batches[i])
            jax.block_until_ready(m)
            ckpt = (checkpoints.Checkpointer(directory, max_to_keep=2, async_save=mode == "async")
                    if mode != "none" else None)
            start = time.perf_counter()
            for i in range(1, steps + 1):
                state, m = step_fn(state, batches[i % len(batches)])
                if ckpt and i % every == 0:
                    ckpt.save(i, state)
            jax.block_until_ready(m)
            if ckpt:
                ckpt.close()  # waits for the last save: its cost is counted
            return (time.perf_counter() - start) / steps
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=os.path.join(ROOT, "configs", "pretrain_tiny.py"))
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--every", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    cfg = runpy.run_path(args.config)["get_config"]()
    cfg = config_lib.resolve(cfg, tokenizer_vocab=1024)
    modes = ("none", "async", "sync")
    samples = {mode: [] for mode in modes}
    for _ in range(args.repeats):  # interleaved, so drift in machine load hits every mode
        for mode in modes:
            samples[mode].append(run(cfg, args.steps, args.every, mode))
    times = {mode: common.median(samples[mode]) for mode in modes}
    rows = [{"mode": mode, "ms_per_step": 1e3 * t,
             "overhead_pct": 100.0 * (t - times["none"]) / times["none"]}
            for mode, t in times.items()]
    print(f"{os.path.basename(args.config)}: save every {args.every} of {args.steps} steps, "
          f"median of {args.repeats}")
    common.report("checkpoint_overhead", rows, args.out,
                  {"config": args.config, "steps": args.steps, "every": args.every})


if __name__ == "__main__":
    main()
