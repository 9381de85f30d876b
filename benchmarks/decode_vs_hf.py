"""Decoding throughput side by side: our KV-cache Decoder vs transformers `generate` with cache.

    python -m benchmarks.decode_vs_hf [--shape=S] [--batches=1,8,16] [--new=128] [--prompt=32]
        [--also_stacked]   # also ours with the scanned, stacked layer weights (Decoder's
                           # unstack_layers=False), to see what per-layer weights buy

The same Llama shape (benchmarks/train_step.py SHAPES) with random weights, greedy, exactly
--new tokens per row (no stop token can end a row early on either side), prompts of --prompt
tokens. New tokens per second = batch x new / wall time of the whole generate call (prefill
included), median of --repeats calls after one warm-up, ours and theirs interleaved.
"""

import argparse
import os
import sys

import jax
import numpy as np

from benchmarks import common, train_step
from t5x_like.modeling import model
from t5x_like.modeling import decoding

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _NoTextTokenizer:
    """Ids only: nothing stops a row, and no text is decoded (transformers decodes none either)."""

    eos_id = -1

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def decode(self, ids) -> str:
        return ""


def ours(cfg, batch: int, prompt: np.ndarray, new: int, unstack: bool | None = None):
    graphdef, _, _ = model.abstract_model(cfg.model)
    params = model.init_params(cfg.model, 0)
    dec = decoding.Decoder(graphdef, params, cfg.model, _NoTextTokenizer(cfg.model.vocab_size),
                           max_batch=batch, max_len=cfg.model.max_len, unstack_layers=unstack)
    prompts = [list(row) for row in prompt]
    sampling = decoding.Sampling(max_new_tokens=new)

    def run():
        out = dec.generate(prompts, sampling)
        assert all(len(c.tokens) == new for c in out)
    return run


def theirs(cfg, prompt: np.ndarray, new: int):
    import torch
    import transformers

    m = cfg.model
    hf_cfg = transformers.LlamaConfig(
        vocab_size=m.vocab_size, hidden_size=m.hidden_dim, intermediate_size=m.mlp_dim,
        num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
        num_key_value_heads=m.num_kv_heads, max_position_embeddings=m.max_len,
        tie_word_embeddings=False, attn_implementation="sdpa")
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    ids = torch.tensor(prompt)

    def run():
        with torch.inference_mode():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new,
                              min_new_tokens=new, do_sample=False, use_cache=True,
                              pad_token_id=0, eos_token_id=None)
        assert out.shape[1] == ids.shape[1] + new
    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", default="S")
    parser.add_argument("--batches", default="1,8,16")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--no_peer", action="store_true")
    parser.add_argument("--also_stacked", action="store_true")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = parser.parse_args(argv)
    if not args.no_peer:
        import torch
        import transformers
        torch.set_num_threads(os.cpu_count())
        transformers.logging.set_verbosity_error()
    cfg = train_step.config(args.shape, "float32")
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompt = np.random.default_rng(batch).integers(4, cfg.model.vocab_size,
                                                       (batch, args.prompt)).astype(np.int64)
        fns = {"ours": ours(cfg, batch, prompt, args.new)}
        if args.also_stacked:
            fns["ours_stacked"] = ours(cfg, batch, prompt, args.new, unstack=False)
        if not args.no_peer:
            fns["theirs"] = theirs(cfg, prompt, args.new)
        secs = train_step.interleaved(fns, args.repeats, warmup=1)
        row = {"shape": args.shape, "batch": batch,
               "ours_new_tok_s": batch * args.new / secs["ours"]}
        if "ours_stacked" in secs:
            row["ours_stacked_new_tok_s"] = batch * args.new / secs["ours_stacked"]
        if "theirs" in secs:
            row["theirs_new_tok_s"] = batch * args.new / secs["theirs"]
            row["ratio"] = secs["theirs"] / secs["ours"]
        rows.append(row)
    jax.clear_caches()
    common.report(f"decode_vs_hf_{args.shape}", rows, args.out,
                  {"command": "python -m benchmarks.decode_vs_hf " + " ".join(argv or sys.argv[1:]),
                   "new_tokens": args.new, "prompt_tokens": args.prompt})


if __name__ == "__main__":
    main()
