"""Sample from a trained run: `python -m t5x_like.sample --workdir=runs/tiny --prompt="..."`.

Greedy (--temperature=0, the default) or temperature / top-k / top-p sampling from the latest
checkpoint (or --step), with the KV-cache decoder of t5x_like/decoding.py. The prompt is plain
text continued as is; for chat models use `python -m t5x_like.chat`.
"""

from absl import flags

from t5x_like import cli, decoding, runs


def main(argv):
    del argv
    f = flags.FLAGS
    run = runs.load(f.workdir, step=f.step, merge=f.merge, base=f.base)
    tok = run.tokenizer
    prompt = [tok.bos_id, *tok.encode(f.prompt)]
    decoder = decoding.Decoder.from_run(run, max_batch=f.num_samples,
                                        max_len=len(prompt) + f.max_new_tokens)
    sampling = [decoding.Sampling(max_new_tokens=f.max_new_tokens, temperature=f.temperature,
                                  top_k=f.top_k, top_p=f.top_p, seed=f.seed + n)
                for n in range(f.num_samples)]
    for n, completion in enumerate(decoder.generate([prompt] * f.num_samples, sampling)):
        if f.num_samples > 1:
            print(f"--- sample {n + 1} (step {run.step}) ---")
        print(f.prompt + completion.text)


if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    flags.DEFINE_string("workdir", None, "Run directory to sample from.", required=True)
    flags.DEFINE_string("prompt", "", "Text to continue.")
    flags.DEFINE_integer("max_new_tokens", 100, "Tokens to generate.")
    flags.DEFINE_float("temperature", 0.0, "0 = greedy.")
    flags.DEFINE_integer("top_k", 0, "Sample only among the k likeliest tokens; 0 = all.")
    flags.DEFINE_float("top_p", 1.0, "Sample from the smallest set with this much probability.")
    flags.DEFINE_integer("seed", 0, "Sampling seed.")
    flags.DEFINE_integer("num_samples", 1, "Independent samples to print.")
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_bool("merge", True, "PEFT runs: fold the adapters into the weights (false: "
                      "run the base with the adapters on the side).")
    flags.DEFINE_string("base", None, "PEFT runs: the base model, if it moved since training.")
    cli.run(main)
