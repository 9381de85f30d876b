"""Decode speed of the KV-cache decoder: tokens/s at batch 1 and 16, for the tiny and 125M configs.

    python -m benchmarks.decode [--configs=configs/pretrain_tiny.py,configs/llama_125m.py] \
        [--batches=1,16] [--prompt_len=32] [--new_tokens=64] [--repeats=3] [--dtype=float32]

Times `Decoder.generate` exactly as the server calls it: the jitted prefill, then one jitted step
per new token, with the host choosing each row's token among the device's candidates (stops,
constraints, detokenization). Rows sample (temperature 0.8, top-p 0.95, their own seeds) with
the end-of-reply tokens banned through the logit bias, so every row makes exactly --new_tokens
tokens. Parameters are random (speed does not depend on their values); the config's model
sizes, vocabulary and compute dtype are kept, and the tokenizer is a small SentencePiece model
trained on the synthetic task (pieces past it are masked, as padded vocab rows are).

Reported per (config, batch), timed inside each run (so load drift between runs cannot skew
one against the other): `prefill_ms` (until the first new token of every row), `ms_per_step`
and `decode_tok_s` (the tokens after the first, over the time after it: the steady rate),
`total_tok_s` (all new tokens of all rows / the whole call: what clients see). Medians of
--repeats after one warm-up run that compiles both programs.
"""

import argparse
import os
import runpy
import sys
import tempfile
import time

import jax
import numpy as np

from benchmarks import common
from data_pipelines import chat_template, synthetic
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.modeling import model
from t5x_like.core import config as config_lib
from t5x_like.modeling import decoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

DEFAULT_CONFIGS = "configs/pretrain_tiny.py,configs/llama_125m.py"


def small_tokenizer(directory: str):
    texts = [synthetic.text_document(i) for i in range(200)]
    texts += [chat_template.render(synthetic.dialogue(i)) for i in range(200)]
    return tokenizer_lib.train(texts, os.path.join(directory, "tokenizer.model"), vocab_size=400)


def build_decoder(config_path: str, tok, max_batch: int, dtype: str = ""):
    cfg = runpy.run_path(os.path.join(ROOT, config_path))["get_config"]()
    if dtype:
        cfg.model.dtype = dtype
    cfg = config_lib.resolve(cfg, tok.vocab_size)
    graphdef, _, _ = model.abstract_model(cfg.model)
    params = model.init_params(cfg.model, seed=0)
    count = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    return decoding.Decoder(graphdef, params, cfg.model, tok, max_batch=max_batch), cfg, count


def measure(decoder, tok, batch: int, prompt_len: int, new_tokens: int, repeats: int) -> dict:
    rng = np.random.default_rng(batch)
    prompts = [[tok.bos_id, *rng.integers(10, tok.vocab_size, prompt_len - 1).tolist()]
               for _ in range(batch)]
    ban = tuple((t, float("-inf")) for t in chat_template.reply_stop_ids(tok))

    sampling = [decoding.Sampling(max_new_tokens=new_tokens, temperature=0.8, top_p=0.95,
                                  seed=i, logit_bias=ban) for i in range(batch)]

    def run_once() -> tuple[float, float]:
        """(seconds to the first token: prefill + its sampling, seconds for the rest)."""
        start = time.perf_counter()
        stream = decoder.stream(prompts, sampling)
        next(stream)
        first = time.perf_counter()
        *_, done = stream
        assert all(len(c.tokens) == new_tokens for c in done), "a row stopped early"
        return first - start, time.perf_counter() - first

    run_once()  # warm-up: compiles the prefill and the step
    firsts, rests = zip(*(run_once() for _ in range(repeats)))
    first, rest = common.median(firsts), common.median(rests)
    return {"batch": batch, "prefill_ms": 1e3 * first,
            "ms_per_step": 1e3 * rest / (new_tokens - 1),
            "total_tok_s": batch * new_tokens / common.median(
                [a + b for a, b in zip(firsts, rests)]),
            "decode_tok_s": batch * (new_tokens - 1) / rest}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", default=DEFAULT_CONFIGS,
                        help="comma-separated config files (relative to the repository)")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompt_len", type=int, default=32)
    parser.add_argument("--new_tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="",
                        help="compute dtype for every config (default: each config's own); "
                        "the results go to decode_<dtype>.json then")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    load_before = os.getloadavg()[0]  # on a shared machine, how busy it was
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = small_tokenizer(tmp)
        for path in args.configs.split(","):
            decoder, cfg, count = build_decoder(path, tok, max(batches), args.dtype)
            for batch in batches:
                row = measure(decoder, tok, batch, args.prompt_len, args.new_tokens,
                              args.repeats)
                rows.append({"config": os.path.basename(path), "params_M": count / 1e6,
                             "dtype": cfg.model.dtype, **row})
                print(rows[-1], flush=True)
    print(f"prompt {args.prompt_len} tokens, {args.new_tokens} new tokens per row, "
          f"median of {args.repeats}")
    common.report(f"decode_{args.dtype}" if args.dtype else "decode", rows, args.out,
                  {"configs": args.configs, "prompt_len": args.prompt_len,
                   "new_tokens": args.new_tokens, "repeats": args.repeats,
                   "load_avg_1min": [load_before, os.getloadavg()[0]],
                   "command": "python -m benchmarks.decode " + " ".join(sys.argv[1:])})


if __name__ == "__main__":
    main()
