"""Chat records -> training examples for SFT: the stored messages, rendered by the one chat
template (which builds the loss mask), and the policy for conversations longer than the model.

Records are `{"messages": <JSON list of {"role", "content"[, "context"]}>}`. A conversation
longer than max_len + 1 tokens follows `data.on_long`:

    truncate  keep the longest prefix of whole messages that fits (default); a conversation
              whose first assistant turn does not fit is dropped
    drop      drop the conversation
    split     keep every token: the pipeline cuts it into pieces of max_len (later pieces lose
              the earlier context; pieces with nothing to learn are dropped)

Truncated and dropped conversations are counted in `counts` (the trainer logs them as
sft_truncated / sft_dropped), each conversation once however often it is encoded (probes,
epochs, prefetch: two truncated conversations read 28 times were reported as 28). A record that
is not a valid conversation stops the run with a message naming it.

Messages are rendered by the tokenizer's chat template (chat_template.setup: the project's or
the model's own), so the same encoder serves every template.
"""

import collections
import hashlib
import json

import numpy as np

from data_pipelines import chat_template
from t5x_like.core.errors import UserError

ON_LONG = ("truncate", "drop", "split")


def messages_of(record: dict) -> list[dict]:
    raw = record["messages"]
    raw = raw.decode("utf-8") if isinstance(raw, bytes) else raw
    try:
        messages = json.loads(raw) if isinstance(raw, str) else raw
        chat_template.check(messages)
    except (json.JSONDecodeError, chat_template.TemplateError) as e:
        raise UserError(f"a chat record is not a valid conversation ({e}): {str(raw)[:200]!r}; "
                        "fix the source data (fields role/content) and prepare it again.") from None
    return messages


def _fits(tokenizer, messages, loss_on, limit):
    try:
        tokens, weights = chat_template.encode(tokenizer, messages, loss_on=loss_on)
    except chat_template.TemplateError as e:  # the template cannot render or mask this one
        raise UserError(f"config key 'data.chat_template': {e}; in the conversation "
                        f"{json.dumps(messages, ensure_ascii=False)[:200]}.") from None
    return len(tokens) <= limit, tokens, weights


def encoder(tokenizer, *, loss_on: str, max_len: int, on_long: str,
            counts: collections.Counter | None = None):
    """record -> {"tokens", "weights"} (empty arrays for a dropped conversation)."""
    limit = max_len + 1  # max_len positions of (input, target) pairs
    empty = {"tokens": np.zeros(0, np.int32), "weights": np.zeros(0, np.float32)}
    counts = counts if counts is not None else collections.Counter()

    counted: set[tuple[str, bytes]] = set()  # (kind, digest) of conversations already counted

    def count(kind: str, record: dict) -> None:
        raw = record["messages"]
        if not isinstance(raw, (bytes, str)):
            raw = json.dumps(raw)
        if isinstance(raw, str):
            raw = raw.encode()
        key = (kind, hashlib.blake2b(raw, digest_size=8).digest())
        if key not in counted:
            counted.add(key)
            counts[kind] += 1

    def encode(record: dict) -> dict:
        messages = messages_of(record)
        fits, tokens, weights = _fits(tokenizer, messages, loss_on, limit)
        if fits or on_long == "split":
            return {"tokens": tokens, "weights": weights}
        if on_long == "drop":
            count("dropped", record)
            return empty
        # The longest prefix of whole messages that fits (length grows with the prefix, so a
        # binary search needs log2(messages) encodings).
        lo, hi, best = 1, len(messages) - 1, None
        while lo <= hi:
            mid = (lo + hi) // 2
            fits, tokens, weights = _fits(tokenizer, messages[:mid], loss_on, limit)
            if fits:
                best, lo = (tokens, weights), mid + 1
            else:
                hi = mid - 1
        if best is None or not best[1].any():  # not even the first assistant turn fits
            count("dropped", record)
            return empty
        count("truncated", record)
        return {"tokens": best[0], "weights": best[1]}

    return encode
