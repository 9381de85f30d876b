"""Compile time of the train step vs depth, layers scanned (one compiled layer) or unrolled.

    python -m benchmarks.compile_time [--depths=4,24] [--shape=S]

Each row traces, lowers and compiles the real jitted train step (lm.compile_steps) of the
shape with that many layers, in a fresh JAX cache (the persistent compilation cache is off, so
nothing is reused between rows). Target: 24 scanned layers compile in at most 1.5x the time of 4.
"""

import argparse
import os
import sys
import time

import jax

from benchmarks import common, train_step
from t5x_like.training import state as state_lib
from t5x_like.training.tasks import lm
from t5x_like.modeling import partitioning

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def compile_seconds(cfg) -> float:
    mesh = partitioning.make_mesh(cfg.mesh)
    with jax.set_mesh(mesh):
        spec = state_lib.state_spec(cfg, mesh)
        step_fn, _ = lm.compile_steps(cfg, spec, mesh)
        B, T = cfg.data.batch_size, cfg.model.max_len
        batch = {k: jax.ShapeDtypeStruct((B, T), "float32" if k == "weights" else "int32")
                 for k in ("inputs", "targets", "weights", "segment_ids", "positions")}
        start = time.perf_counter()
        step_fn.lower(spec.abstract, batch).compile()
        return time.perf_counter() - start


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", default="4,24")
    parser.add_argument("--shape", default="S")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_compilation_cache", False)
    rows = []
    for scan in (True, False):
        for depth in (int(d) for d in args.depths.split(",")):
            cfg = train_step.config(args.shape, "float32")
            cfg.model.num_layers, cfg.model.scan_layers = depth, scan
            jax.clear_caches()
            rows.append({"layers": depth, "scan_layers": scan,
                         "compile_s": compile_seconds(cfg)})
    for scan in (True, False):
        mine = [r for r in rows if r["scan_layers"] == scan]
        for r in mine:
            r["vs_shallowest"] = r["compile_s"] / mine[0]["compile_s"]
    common.report("compile_time", rows, args.out,
                  {"command": "python -m benchmarks.compile_time " + " ".join(argv or sys.argv[1:])})


if __name__ == "__main__":
    main()
