"""Held-out exact-match accuracy of chat runs on the demo task (SFT vs DPO vs RL), greedy.

    python -m benchmarks.preference_demo --runs=runs/sft,runs/dpo,runs/rl [--n=200] \
        [--times=runs/dpo=182,runs/rl=240]

For each run: the first --n validation preference prompts of the embedded arithmetic task
(synthetic.answer_pair(i, "validation"): questions never seen in training, half with the
system prompt), one greedy reply each with the KV-cache decoder, scored by synthetic.check_answer
(the reply's first integer equals the answer). Also the training wall time of each run when
given (--times, seconds), since they come from the shell that ran them. Writes
benchmarks/results/preference_demo.json.
"""

import argparse
import os
import time

from benchmarks import common
from data_pipelines import chat_template, synthetic
from t5x_like.core import runs
from t5x_like.modeling import decoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def exact_match(workdir: str, n: int) -> tuple[float, list[str]]:
    run = runs.load(workdir)
    tok = run.tokenizer
    decoder = decoding.Decoder.from_run(run, max_batch=64, max_len=run.cfg.model.max_len)
    questions, prompts = [], []
    for i in range(n):
        pair = synthetic.answer_pair(i, "validation")
        questions.append(pair["prompt"][-1]["content"])
        prompts.append(chat_template.prompt(tok, pair["prompt"]))
    greedy = decoding.Sampling(max_new_tokens=8, stop_tokens=(tok.marker_ids[chat_template.END],))
    outs = decoder.generate(prompts, greedy)
    ok = sum(synthetic.check_answer(q, o.text) for q, o in zip(questions, outs))
    return ok / n, [f"{q} -> {o.text!r}" for q, o in list(zip(questions, outs))[:3]]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", required=True, help="comma-separated workdirs")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--times", default="", help="workdir=seconds,... of training")
    args = parser.parse_args()
    times = dict(part.split("=") for part in args.times.split(",") if part)
    rows = []
    for workdir in args.runs.split(","):
        start = time.perf_counter()
        accuracy, examples = exact_match(workdir, args.n)
        rows.append({"run": workdir, "exact_match": accuracy, "prompts": args.n,
                     "train_s": float(times.get(workdir, "nan")),
                     "eval_s": time.perf_counter() - start})
        print(workdir, *examples, sep="\n  ")
    common.report("preference_demo", rows, os.path.join(ROOT, "benchmarks", "results"))


if __name__ == "__main__":
    main()
