"""Wall time of a generation eval: the demo task's held-out exact match on a trained run.

    python -m benchmarks.eval_generation --workdir=runs/sft [--n=200] [--template=chat]
        [--batch_sizes=16,64]

For each batch size, calls evaluate.demo_accuracy twice in one process with a fresh persistent
compilation cache (JAX_COMPILATION_CACHE_DIR): the first call ("cold") compiles the decoder's
programs, the second ("warm") loads the run again and finds them in the cache, as a second
`evaluate` command would with the cache set. Also records the machine's load average, since
the numbers move with whatever else runs on the cores.
"""

import argparse
import os
import tempfile
import time

import jax

from benchmarks import common
from t5x_like import evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--template", default="chat", choices=("chat", "plain"))
    parser.add_argument("--batch_sizes", default="16,64")
    parser.add_argument("--checkpoint", default="latest")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    jax.config.update("jax_compilation_cache_dir", tempfile.mkdtemp(prefix="eval-gen-cache-"))
    rows = []
    for batch_size in [int(b) for b in args.batch_sizes.split(",")]:
        for attempt in ("cold", "warm"):
            load = os.getloadavg()[0]
            start = time.perf_counter()
            got = evaluate.demo_accuracy(args.workdir, n=args.n, checkpoint=args.checkpoint,
                                         template=args.template, batch_size=batch_size)
            seconds = time.perf_counter() - start
            rows.append({"batch_size": batch_size, "call": attempt, "n": got["n"],
                         "seconds": seconds, "examples_per_sec": got["n"] / seconds,
                         "exact_match": got["exact_match"], "load_avg_1m": load})
    common.report("eval_generation", rows, args.out,
                  {"workdir": os.path.abspath(args.workdir), "template": args.template,
                   "step": got["step"]})


if __name__ == "__main__":
    main()
