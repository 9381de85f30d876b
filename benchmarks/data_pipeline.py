"""Input pipeline throughput vs what the train step consumes.

    python -m benchmarks.data_pipeline [--source=text:../shared/data/pretrain/tinyshakespeare.txt]
        [--batch_size=16] [--max_len=256] [--batches=200] [--worker_count=0]

Prepares the source once (TFDS + tokenizer, cached in --cache), then pulls --batches training
batches through the real grain pipeline (read, tokenize, shift, pack with segment ids, batch)
exactly as the trainer builds it, and reports tokens/s. Beside it: the train step's
consumption for the same batch shape from benchmarks/results/train_step.json (if measured), and
the headroom (pipeline / step). A pipeline slower than the step stalls training: raise
data.worker_count.
"""

import argparse
import json
import os
import sys
import time

from benchmarks import common
from configs import base
from data_pipelines import pipeline
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.training import trainer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--source",
                        default="text:" + os.path.join(os.path.dirname(ROOT), "shared", "data",
                                                       "pretrain", "tinyshakespeare.txt"))
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_len", type=int, default=256)
    parser.add_argument("--vocab_size", type=int, default=8192)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--worker_count", type=int, default=0)
    parser.add_argument("--cache", default="/tmp/t5x_like-bench-data")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)

    cfg = base.get_config()
    cfg.data.source, cfg.data.cache_dir = args.source, args.cache
    cfg.data.vocab_size, cfg.data.batch_size = args.vocab_size, args.batch_size
    cfg.model.max_len = args.max_len
    prepared = trainer.prepare_data(cfg, args.cache)
    tokenizer = tokenizer_lib.Tokenizer(prepared.tokenizer_path)
    encode = pipeline.text_encoder(tokenizer, prepared.text_field)
    source = prepared.data_source(cfg.data.train_split, kind="text")
    it = iter(pipeline.make_dataset(source, encode, batch_size=args.batch_size,
                                    max_len=args.max_len, seed=0, train=True,
                                    worker_count=args.worker_count))
    next(it)  # start-up (workers, first reads) is not throughput
    start = time.perf_counter()
    real = 0
    for _ in range(args.batches):
        batch = next(it)
        real += int((batch["segment_ids"] > 0).sum())
    secs = time.perf_counter() - start
    slots = args.batches * args.batch_size * args.max_len
    row = {"source": args.source.split("/")[-1], "batch": args.batch_size, "seq": args.max_len,
           "workers": args.worker_count, "pipeline_tok_s": slots / secs,
           "fill": real / slots}
    step = os.path.join(args.out, "train_step.json")
    if os.path.exists(step):
        with open(step) as f:
            rows = json.load(f)["rows"]
        from benchmarks.train_step import SHAPES
        for r in rows:
            _, _, _, _, T, B = SHAPES[r["shape"]]
            if (T, B) == (args.max_len, args.batch_size) and r["dtype"] == "float32":
                row["train_step_tok_s"] = r["ours_tok_s"]
                row["headroom"] = row["pipeline_tok_s"] / r["ours_tok_s"]
    common.report("data_pipeline", [row], args.out,
                  {"command": "python -m benchmarks.data_pipeline " + " ".join(argv or sys.argv[1:])})


if __name__ == "__main__":
    main()
