"""Sample from a trained run: `python -m t5x_like.sample --workdir=runs/tiny --prompt="..."`.

Greedy (--temperature=0, the default) or temperature / top-k / top-p sampling from the latest
checkpoint (or --checkpoint=best|<step>, alias --step), with the KV-cache decoder of
t5x_like/modeling/decoding.py. The prompt is plain text continued as is; for chat models use
`python -m t5x_like.chat`. Prompt and reply stay within the model's context (model.max_len).
"""

from absl import flags, logging

from t5x_like.core import cli
from t5x_like.modeling import decoding
from t5x_like.core import runs
from t5x_like.core.errors import UserError


def fit_prompt(tokens: list[int], bos: int, context: int, max_new_tokens: int, *,
               truncate: bool = False) -> tuple[list[int], int]:
    """[bos, *tokens] and the tokens to generate, within `context` positions: a prompt with no
    room is refused (with `truncate`: cut to its last tokens); a reply that would run past the
    context is shortened, with a warning."""
    if max_new_tokens >= context:
        raise UserError(f"--max_new_tokens={max_new_tokens} leaves no room for a prompt in the "
                        f"model's context of {context} tokens (model.max_len); lower it.")
    keep = context - max_new_tokens - 1  # prompt tokens that fit beside bos and the reply
    if len(tokens) + 1 >= context or (truncate and len(tokens) > keep):
        if not truncate:
            raise UserError(f"the prompt has {len(tokens):,} tokens but the model's context "
                            f"(model.max_len) is {context}; shorten it, or pass "
                            f"--truncate_prompt to keep its last {keep} tokens.")
        logging.warning("Prompt truncated to its last %d of %d tokens (model context %d, "
                        "--max_new_tokens=%d).", keep, len(tokens), context, max_new_tokens)
        tokens = tokens[len(tokens) - keep:]
    room = context - len(tokens) - 1
    if max_new_tokens > room:
        logging.warning("Generating at most %d tokens: the prompt (%d tokens) leaves no more of "
                        "the model's context of %d (model.max_len).", room, len(tokens), context)
    return [bos, *tokens], min(max_new_tokens, room)


def checkpoint_step(workdir: str, which: str) -> int | None:
    """--checkpoint=latest|best|<step> -> the step to load (None: the latest)."""
    which = (which or "latest").strip()
    if which == "latest":
        return None
    from t5x_like import evaluate  # local: evaluate imports the eval suites

    return evaluate.checkpoint_step(workdir, which)


def main(argv):
    del argv
    f = flags.FLAGS
    cli.check_sampling_flags(temperature=f.temperature, top_p=f.top_p, top_k=f.top_k,
                             max_new_tokens=f.max_new_tokens, num_samples=f.num_samples)
    run = runs.load(f.workdir, step=checkpoint_step(f.workdir, f.checkpoint), merge=f.merge,
                    base=f.base)
    tok = run.tokenizer
    prompt, max_new = fit_prompt(tok.encode(f.prompt), tok.bos_id, run.cfg.model.max_len,
                                 f.max_new_tokens, truncate=f.truncate_prompt)
    if not tok.add_bos:  # e.g. Qwen's tokenizer: its model never sees bos, transformers adds none
        prompt = prompt[1:]
    decoder = decoding.Decoder.from_run(run, max_batch=f.num_samples,
                                        max_len=len(prompt) + max_new)
    sampling = [decoding.Sampling(max_new_tokens=max_new, temperature=f.temperature,
                                  top_k=f.top_k, top_p=f.top_p, seed=f.seed + n)
                for n in range(f.num_samples)]
    for n, completion in enumerate(decoder.generate([prompt] * f.num_samples, sampling)):
        if f.num_samples > 1:
            print(f"--- sample {n + 1} (step {run.step}) ---")
        print(f.prompt + completion.text)


if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    flags.DEFINE_string("workdir", None, "Run directory to sample from.", required=True)
    flags.DEFINE_string("prompt", "", "Text to continue.")
    cli.define_sampling_flags(max_new_tokens=100)
    flags.DEFINE_integer("num_samples", 1, "Independent samples to print.")
    flags.DEFINE_string("checkpoint", "latest", "latest, best, or a step number (as evaluate).")
    flags.DEFINE_alias("step", "checkpoint")
    flags.DEFINE_bool("truncate_prompt", False, "Keep the end of a prompt too long for the "
                      "model's context instead of refusing it.")
    flags.DEFINE_bool("merge", True, "PEFT runs: fold the adapters into the weights (false: "
                      "run the base with the adapters on the side).")
    flags.DEFINE_string("base", None, "PEFT runs: the base model, if it moved since training.")
    cli.run(main)
