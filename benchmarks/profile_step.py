"""Where a train step's time goes: XLA's own per-op timings of one step, summed by kind.

    python -m benchmarks.profile_step --shape=M                 # ours, float32
    python -m benchmarks.profile_step --shape=S --dtype=bfloat16 --top=40

Runs one step of benchmarks/train_step.py's model under jax.profiler with XLA's per-thunk trace
events on (`--xla_cpu_enable_xprof_traceme`, set here before JAX starts), then prints the
executed ops grouped by kind (the op name without its number: `ynn_fusion` = matmuls handed to
YNNPACK, `dot` = XLA's own dots, `wrapped_broadcast` = materialized zeros, ...), with their
share of the step. The raw trace stays under --trace_dir for Perfetto (ui.perfetto.dev).
This is how the attention blocks, the 2-D projections and the max-based accuracy in the model
and loss were found (BENCHMARKS.md).
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                           + " --xla_cpu_enable_xprof_traceme=true").strip()

import jax  # noqa: E402

from benchmarks import train_step  # noqa: E402

# Profiler bookkeeping, not ops: left out of the table.
_NOT_OPS = ("ThunkExecutor", "$", "SlinkyThreadPool", "PjitFunction", "CommonPjRt", "end: ")


def op_times(trace_dir: str) -> dict[str, float]:
    """Milliseconds per op kind in the newest Perfetto trace under trace_dir."""
    path = sorted(glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True),
                  key=os.path.getmtime)[-1]
    with gzip.open(path) as f:
        events = json.load(f)
    events = events["traceEvents"] if isinstance(events, dict) else events
    kinds: dict[str, float] = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X" and not e["name"].startswith(_NOT_OPS):
            kinds[re.sub(r"[._]\d+$", "", e["name"])] += e.get("dur", 0) / 1e3
    return kinds


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="S", choices=sorted(train_step.SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--unrolled", action="store_true", help="model.scan_layers=False")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--trace_dir", default="/tmp/t5x_like_profile")
    args = parser.parse_args(argv)
    cfg = train_step.config(args.shape, args.dtype)
    cfg.model.scan_layers = not args.unrolled
    ours = train_step.Ours(cfg)
    for _ in range(2):
        ours.step()
    start = time.perf_counter()
    ours.step()
    wall_ms = (time.perf_counter() - start) * 1e3
    with jax.profiler.trace(args.trace_dir, create_perfetto_trace=True):
        ours.step()
    kinds = op_times(args.trace_dir)
    total = sum(kinds.values())
    print(f"shape {args.shape} {args.dtype}: step {wall_ms:.0f} ms unprofiled, "
          f"{total:.0f} ms in ops when profiled")
    print(f"{'ms':>9} {'share':>6}  op kind")
    for kind, ms in sorted(kinds.items(), key=lambda kv: -kv[1])[:args.top]:
        print(f"{ms:9.1f} {ms / total:6.1%}  {kind}")


if __name__ == "__main__":
    main()
