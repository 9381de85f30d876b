"""The train step's matmuls, one at a time: XLA's rate vs numpy's BLAS vs torch's, same shapes.

    python -m benchmarks.matmul_rates                   # shape M of benchmarks/train_step.py
    python -m benchmarks.matmul_rates --shape=S --repeats=5

Every projection of the Llama-shaped model (q, k, v, o, gate, up, down per layer, and the
output head) is three GEMMs per training step: the forward x @ w, the input gradient g @ w.T
and the weight gradient x.T @ g (contracting over all B*T tokens). This times each of them as
the model's code emits it (`jnp.dot` / `lax.dot_general` with the transposes inside the dot),
against numpy (its bundled OpenBLAS) and torch (the `transformers` peer's kernels), each timed
alone, median of --repeats. The closing line adds them up with each shape's count per step: the
seconds a step's projections take at each library's rates, the bound no model code can move.
Attention's batched score/value products are not included (the model's blocks change them).
"""

import argparse
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def projections(shape: str, vocab: int) -> list[tuple[str, int, int, int, int]]:
    """(name, tokens, d_in, d_out, count per step) of every projection of `shape`."""
    d, L, _, F, T, B = train_step.SHAPES[shape]
    n = B * T
    return [("q/k/v/o", n, d, d, 4 * L), ("gate/up", n, d, F, 2 * L), ("down", n, F, d, L),
            ("head", n, d, vocab, 1)]


def gemms(n: int, k: int, m: int):
    """The three GEMMs of x [n, k] @ w [k, m] in a training step: (name, flops, xla, np, torch
    callables); each callable blocks until its result exists."""
    import torch

    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s, dtype=np.float32) for s in ((n, k), (k, m), (n, m)))
    jx, jw, jg = map(jnp.asarray, (x, w, g))
    tx, tw, tg = map(torch.from_numpy, (x, w, g))
    fwd = jax.jit(jnp.dot)
    d_in = jax.jit(lambda g, w: jax.lax.dot_general(g, w, (((1,), (1,)), ((), ()))))
    d_w = jax.jit(lambda x, g: jax.lax.dot_general(x, g, (((0,), (0,)), ((), ()))))
    flop = 2 * n * k * m
    return [
        ("forward", flop, lambda: fwd(jx, jw).block_until_ready(), lambda: x @ w,
         lambda: tx @ tw),
        ("d_input", flop, lambda: d_in(jg, jw).block_until_ready(), lambda: g @ w.T,
         lambda: tg @ tw.T),
        ("d_weight", flop, lambda: d_w(jx, jg).block_until_ready(), lambda: x.T @ g,
         lambda: tx.T @ tg),
    ]


def alone(fn, repeats: int) -> float:
    """Median seconds of fn, timed by itself: not interleaved with the other libraries, whose
    worker threads keep spinning for a while after their call and would slow the next one."""
    time.sleep(0.2)
    return common.median(common.timed(fn, repeats=repeats, warmup=2))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="M", choices=sorted(train_step.SHAPES))
    parser.add_argument("--vocab", type=int, default=train_step.VOCAB)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(os.cpu_count())  # as in train_step.py's peer
    rows, per_step = [], {"xla": 0.0, "numpy": 0.0, "torch": 0.0}
    for name, n, k, m, count in projections(args.shape, args.vocab):
        for kind, flop, *fns in gemms(n, k, m):
            secs = {lib: alone(fn, args.repeats) for lib, fn in zip(per_step, fns)}
            rows.append({"projection": name, "gemm": kind, "shape": f"[{n},{k}]x[{k},{m}]",
                         "per_step": count,
                         **{f"{lib}_gflops": flop / s / 1e9 for lib, s in secs.items()}})
            for lib, s in secs.items():
                per_step[lib] += count * s
    path = common.report(
        "matmul_rates", rows, args.out,
        {"command": "python -m benchmarks.matmul_rates " + " ".join(argv or sys.argv[1:]),
         "shape": args.shape, "projection_seconds_per_step": per_step})
    print(f"{args.shape}: one step's projections take " + ", ".join(
        f"{lib} {s:.2f} s" for lib, s in per_step.items())
        + f" (xla / torch = {per_step['xla'] / per_step['torch']:.2f}); {path}")


if __name__ == "__main__":
    main()
