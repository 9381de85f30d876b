"""Sample from a trained run: `python -m t5x_like.sample --workdir=runs/tiny --prompt="..."`.

Greedy (--temperature=0, the default) or temperature / top-k sampling from the latest
checkpoint. This is the simple decoder: each new token re-reads the whole window (at most
model.max_len tokens), one compiled function for any prompt length.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

from t5x_like import cli, model, runs

def make_next_token(graphdef, window: int, temperature: float, top_k: int):
    """(params, tokens [1, window], length, key) -> next token id, jitted once."""

    def next_token(params, tokens, length, key):
        logits = model.apply(graphdef, params, tokens)[0, length - 1]
        if temperature <= 0:
            return jnp.argmax(logits)
        logits = logits / temperature
        if top_k:
            kth = jax.lax.top_k(logits, top_k)[0][-1]
            logits = jnp.where(logits < kth, -jnp.inf, logits)
        return jax.random.categorical(key, logits)

    return jax.jit(next_token)


def generate(run: runs.Run, prompt_ids: list[int], *, max_new_tokens: int, temperature: float,
             top_k: int, seed: int, stop_ids: tuple[int, ...] = ()) -> list[int]:
    """Continues `prompt_ids`; the context is the last model.max_len tokens."""
    window = run.cfg.model.max_len
    step_fn = make_next_token(run.graphdef, window, temperature, top_k)
    ids = list(prompt_ids)
    out: list[int] = []
    key = jax.random.key(seed)
    for i in range(max_new_tokens):
        context = ids[-window:]
        tokens = np.zeros((1, window), np.int32)
        tokens[0, :len(context)] = context
        token = int(step_fn(run.params, tokens, len(context), jax.random.fold_in(key, i)))
        if token in stop_ids:
            break
        ids.append(token)
        out.append(token)
    return out


def main(argv):
    del argv
    f = flags.FLAGS
    run = runs.load(f.workdir, step=f.step)
    tok = run.tokenizer
    prompt_ids = [tok.bos_id, *tok.encode(f.prompt)]
    for n in range(f.num_samples):
        out = generate(run, prompt_ids, max_new_tokens=f.max_new_tokens,
                       temperature=f.temperature, top_k=f.top_k, seed=f.seed + n,
                       stop_ids=(tok.eos_id,))
        if f.num_samples > 1:
            print(f"--- sample {n + 1} (step {run.step}) ---")
        print(f.prompt + tok.decode(out))


if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    flags.DEFINE_string("workdir", None, "Run directory to sample from.", required=True)
    flags.DEFINE_string("prompt", "", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample only among the k likeliest tokens; 0 = all.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("num_samples", 1, "Independent samples to print.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    cli.run(main)
