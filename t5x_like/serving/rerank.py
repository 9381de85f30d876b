"""Best-of-N: sample N replies, keep the one a reward model scores highest.

    decoder = decoding.Decoder.from_run(runs.load("runs/sft"), max_batch=32)
    rm = reward_model.RewardModel.load("runs/rm")
    [best] = best_of_n(decoder, rm, [[{"role": "user", "content": "What is 12 + 7?"}]], n=8,
                       sampling=decoding.Sampling(temperature=1.0, max_new_tokens=16))
    best.text, best.score, best.scores      # the chosen reply, its score, all N scores

Serving: `serve.create_app(run, ..., generate=serve_generate(reward_model, n))` makes every
reply of the server the best of n (serve.py's `generate` hook). The N samples of a prompt differ only in their seeds (sampling.seed + k), so a request is
reproducible; with temperature 0 all N would be the same reply.
"""

import dataclasses
from typing import Sequence

import numpy as np

from data_pipelines import chat_template
from t5x_like.modeling import decoding


@dataclasses.dataclass
class Choice:
    text: str  # the best reply
    completion: decoding.Completion
    score: float  # its reward
    scores: list[float]  # every sample's reward, in sample order
    index: int  # which sample won


def best_of_n(decoder: decoding.Decoder, reward_model, prompts: Sequence[list[dict]], n: int,
              sampling: decoding.Sampling = decoding.Sampling(temperature=1.0)) -> list[Choice]:
    """For each prompt (messages ending with a user turn), the best of `n` sampled replies by
    `reward_model.score(prompts, replies)` (reward_model.RewardModel or any such scorer)."""
    if n < 1:
        raise ValueError(f"n={n}; best-of-N needs at least one sample")
    tok = decoder.tokenizer
    stops = tuple(sampling.stop_tokens) or chat_template.reply_stop_ids(tok)
    ids = [chat_template.prompt(tok, p) for p in prompts]
    grouped_ids = [p for p in ids for _ in range(n)]
    grouped_msgs = [p for p in prompts for _ in range(n)]
    runs = [dataclasses.replace(sampling, seed=sampling.seed + k, stop_tokens=stops)
            for _ in prompts for k in range(n)]
    completions = decoder.generate(grouped_ids, runs)
    scores = np.asarray(reward_model.score(grouped_msgs, [c.text for c in completions]),
                        np.float32).reshape(len(prompts), n)
    out = []
    for i, row in enumerate(scores):
        k = int(np.argmax(row))
        c = completions[i * n + k]
        out.append(Choice(c.text, c, float(row[k]), [float(s) for s in row], k))
    return out


def serve_generate(reward_model, n: int):
    """Best-of-N as the server's generation path: `serve.create_app(run, ...,
    generate=serve_generate(rm, n))` answers every choice with the best of `n` samples (seeds
    sampling.seed + k). Replies come whole (one yield at the end): a stream cannot show a reply
    before the reward model has seen all N."""
    if n < 1:
        raise ValueError(f"n={n}; best-of-N needs at least one sample")

    def generate(decoder: decoding.Decoder, requests):
        tok = decoder.tokenizer
        rows = [(prompt, dataclasses.replace(s, seed=s.seed + k))
                for prompt, samplings in requests for s in samplings for k in range(n)]
        completions = decoder.generate([p for p, _ in rows], [s for _, s in rows])
        # The prompts come as ids: read back into messages (project template only).
        messages = [chat_template.parse(tok, p) for p, _ in rows]
        scores = np.asarray(reward_model.score(messages, [c.text for c in completions]),
                            np.float32).reshape(-1, n)
        best = [completions[i * n + int(np.argmax(row))] for i, row in enumerate(scores)]
        out, start = [], 0
        for _, samplings in requests:
            out.append(best[start:start + len(samplings)])
            start += len(samplings)
        yield out

    return generate
