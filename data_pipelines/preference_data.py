"""Preference records -> training pairs, and chat records -> prompts for online RL.

A preference record `{"prompt": messages ending with a user turn, "chosen": str,
"rejected": str}` becomes one example holding two rows, [0] = prompt + chosen and
[1] = prompt + rejected, each rendered by the one chat template with the loss on the reply
(its content and closing <|end|>, chat_template loss_on="last_assistant"):

    inputs, targets, weights, segment_ids, positions   [2, max_len]  as pipeline.FEATURES

The two rows of a pair stay in one example, so a batch [B, 2, max_len] keeps every pair on one
device. Rows are right-padded (weight 0, segment 0); a pair longer than max_len + 1 tokens
loses its oldest tokens (left truncation keeps the replies, which are what the pair compares)
and is counted as truncated; a pair whose replies are identical after rendering is dropped.

For RL, a chat record's prompt is its messages up to the last user turn (the later assistant
reply is what the policy writes itself): `prompt_messages`.
"""

import collections
import json

import grain
import numpy as np

from data_pipelines import chat_template
from t5x_like.core.errors import UserError

PAIR_FEATURES = ("inputs", "targets", "weights", "segment_ids", "positions")


def _text(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else value


def pair_messages(record: dict) -> tuple[list[dict], str, str]:
    """(prompt messages, chosen, rejected) of a stored or in-memory preference record."""
    prompt = record["prompt"]
    try:
        prompt = json.loads(_text(prompt)) if isinstance(prompt, (str, bytes)) else prompt
        chat_template.check(prompt)
    except (json.JSONDecodeError, chat_template.TemplateError) as e:
        raise UserError(f"a preference record's prompt is not a valid conversation ({e}): "
                        f"{str(record['prompt'])[:200]!r}; fix the source data and prepare it "
                        "again.") from None
    return prompt, _text(record["chosen"]), _text(record["rejected"])


def row(tokens: np.ndarray, weights: np.ndarray, max_len: int) -> dict:
    """One rendered sequence -> a right-padded row of (inputs, targets, weights, ...)."""
    n = len(tokens) - 1
    out = {"inputs": np.zeros(max_len, np.int32), "targets": np.zeros(max_len, np.int32),
           "weights": np.zeros(max_len, np.float32)}
    out["inputs"][:n], out["targets"][:n] = tokens[:-1], tokens[1:]
    out["weights"][:n] = weights[1:]
    out["segment_ids"] = (np.arange(max_len) < n).astype(np.int32)
    out["positions"] = np.where(out["segment_ids"] > 0, np.arange(max_len), 0).astype(np.int32)
    return out


def encode_reply(tokenizer, prompt: list[dict], reply: str, max_len: int):
    """(tokens, weights, truncated) of prompt + reply, at most max_len + 1 tokens."""
    messages = [*prompt, {"role": "assistant", "content": reply}]
    tokens, weights = chat_template.encode(tokenizer, messages, loss_on="last_assistant")
    limit = max_len + 1
    if len(tokens) <= limit:
        return tokens, weights, False
    return tokens[-limit:], weights[-limit:], True


def pair_encoder(tokenizer, *, max_len: int, counts: collections.Counter | None = None):
    """record -> {feature: [2, max_len]} (chosen row, rejected row), or None to drop it."""
    counts = counts if counts is not None else collections.Counter()

    def encode(record: dict) -> dict | None:
        prompt, chosen, rejected = pair_messages(record)
        rows, cut = [], False
        for reply in (chosen, rejected):
            tokens, weights, truncated = encode_reply(tokenizer, prompt, reply, max_len)
            cut |= truncated
            rows.append(row(tokens, weights, max_len))
        if all((rows[0][k] == rows[1][k]).all() for k in ("inputs", "targets")):
            counts["dropped"] += 1
            return None
        counts["truncated"] += int(cut)
        return {k: np.stack([rows[0][k], rows[1][k]]) for k in PAIR_FEATURES}

    return encode


def pair_dataset(source, encode, *, batch_size: int, seed: int, train: bool,
                 process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of pairs [batch, 2, max_len] for one process (or data shard). Train: shuffled,
    repeated forever, full batches; evaluation: one pass, the last batch may be short."""
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if train:
        ds = ds.shuffle(seed=seed).repeat()
    it = ds.map(encode).to_iter_dataset().filter(lambda x: x is not None)
    return it.batch(batch_size, drop_remainder=train)


def prompt_messages(messages: list[dict]) -> list[dict]:
    """A conversation's messages before its last user turn's reply (what RL prompts with)."""
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    if last_user < 0:
        raise UserError(f"a chat record has no user turn to prompt with: {messages!r:.200}")
    return list(messages[:last_user + 1])


def prompt_encoder(tokenizer, *, max_len: int, counts: collections.Counter | None = None):
    """Chat record -> {"prompt": [max_len] right-padded ids, "prompt_len": int} for RL (the
    generation prompt ends with <|assistant|>), or None (dropped, counted) when it is longer
    than max_len: the reply needs the rest of the model's positions."""
    from data_pipelines import chat_data

    counts = counts if counts is not None else collections.Counter()

    def encode(record: dict) -> dict | None:
        ids = chat_template.prompt(tokenizer, prompt_messages(chat_data.messages_of(record)))
        if len(ids) > max_len:
            counts["dropped"] += 1
            return None
        out = np.zeros(max_len, np.int32)
        out[:len(ids)] = ids
        return {"prompt": out, "prompt_len": np.int32(len(ids))}

    return encode


def prompt_dataset(source, encode, *, batch_size: int, seed: int, train: bool,
                   process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
    """Batches of RL prompts for one process; like pair_dataset."""
    ds = grain.MapDataset.source(source)[process_index::process_count]
    if train:
        ds = ds.shuffle(seed=seed).repeat()
    it = ds.map(encode).to_iter_dataset().filter(lambda x: x is not None)
    return it.batch(batch_size, drop_remainder=train)
