"""The one chat template, used by training, evaluation, sampling and serving.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}
with an optional "context" (extra text attached to the turn: retrieved passages, tool output).
As tokens:

    <bos> <|system|> You are ... <|end|> <|user|> What is 2 + 3? <|end|> <|assistant|> 5 <|end|>

and a turn with context:  <|user|> <|context|> (the context) <|end|> (the content) <|end|>

The markers are single reserved tokens (SentencePiece user-defined symbols). Text inside a
message never produces a marker token: a literal "<|end|>" typed by a user is encoded byte by
byte, so it decodes back to the same text and cannot end a turn or fake a role.

Loss weights (where the loss mask is built): weights[i] = 1 when token i is a target the model
learns to produce. With loss_on="assistant" (default) those are every assistant turn's content
and its closing <|end|> (so the model learns to stop); "last_assistant" keeps only the final
assistant turn; "all" trains on every token after <bos>. A prompt for generation ends with
<|assistant|>, and the reply is read back up to <|end|>: `parse(encode(m)) == m`.
"""

import re
from typing import Sequence

import numpy as np

SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
CONTEXT = "<|context|>"  # extra context attached to a turn (retrieved text, tool output)
END = "<|end|>"  # end of a turn

MARKERS = (SYSTEM, USER, ASSISTANT, CONTEXT, END)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
LOSS_ON = ("assistant", "last_assistant", "all")
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS))


class TemplateError(ValueError):
    """A conversation the template cannot represent (unknown role, bad order, no content)."""


def check(messages: Sequence[dict]) -> None:
    """Raises TemplateError unless `messages` is a valid conversation."""
    if not messages:
        raise TemplateError("the conversation has no messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise TemplateError(f"message {i} has role {m.get('role') if isinstance(m, dict) else m!r};"
                                f" use one of {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str):
            raise TemplateError(f"message {i} ({m['role']}) has no string 'content'")
        if m["role"] == "system" and i != 0:
            raise TemplateError(f"message {i} is a system message; only the first may be")
        if "context" in m and not isinstance(m["context"], str):
            raise TemplateError(f"message {i} has a non-string 'context'")


def encode_text(tokenizer, text: str) -> list[int]:
    """Message text -> ids, with any literal marker spelled out in byte tokens."""
    ids: list[int] = []
    pos = 0
    for match in _MARKER_RE.finditer(text):
        ids += tokenizer.encode(text[pos:match.start()]) if match.start() > pos else []
        ids += [tokenizer.sp.piece_to_id(f"<0x{b:02X}>") for b in match.group().encode()]
        pos = match.end()
    if pos < len(text):
        ids += tokenizer.encode(text[pos:])
    return ids


def encode(tokenizer, messages: Sequence[dict], *, loss_on: str = "assistant",
           generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Conversation -> (token ids, loss weights), both int32/float32 arrays of equal length.

    generation_prompt=True appends "<|assistant|>" so the model continues with the reply.
    """
    check(messages)
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r}; choose one of {LOSS_ON}")
    m_ids = tokenizer.marker_ids
    end = m_ids[END]
    last_assistant = max((i for i, m in enumerate(messages) if m["role"] == "assistant"),
                         default=-1)
    tokens, weights = [tokenizer.bos_id], [0.0]
    for i, m in enumerate(messages):
        learn = loss_on == "all" or (m["role"] == "assistant" and (
            loss_on == "assistant" or i == last_assistant))
        head = [m_ids[ROLES[m["role"]]]]
        if m.get("context"):
            head += [m_ids[CONTEXT], *encode_text(tokenizer, m["context"]), end]
        body = [*encode_text(tokenizer, m["content"]), end]
        tokens += head + body
        weights += [1.0 if loss_on == "all" else 0.0] * len(head) + [float(learn)] * len(body)
    if generation_prompt:
        tokens.append(m_ids[ASSISTANT])
        weights.append(0.0)
    return np.asarray(tokens, np.int32), np.asarray(weights, np.float32)


def prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids to feed the model so that it writes the next assistant turn."""
    return encode(tokenizer, messages, generation_prompt=True)[0].tolist()


def reply(tokenizer, generated: Sequence[int]) -> str:
    """The assistant's text from generated ids: everything before <|end|> (or eos)."""
    stop = {tokenizer.marker_ids[END], tokenizer.eos_id}
    out = []
    for t in generated:
        if int(t) in stop:
            break
        out.append(int(t))
    return tokenizer.decode(out)


def reply_stop_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end a generated reply: <|end|>, eos, and any marker or <bos> that would
    start a new turn or conversation (for the decoder's stop_tokens)."""
    return (tokenizer.eos_id, tokenizer.bos_id, *tokenizer.marker_ids.values())


def parse(tokenizer, ids: Sequence[int]) -> list[dict]:
    """Token ids of a rendered conversation -> messages (the inverse of `encode`)."""
    by_id = {v: k for k, v in tokenizer.marker_ids.items()}
    role_of = {marker: role for role, marker in ROLES.items()}
    messages, i, ids = [], 0, [int(t) for t in ids]
    if ids and ids[0] == tokenizer.bos_id:
        i = 1

    def until_end(j):
        k = j
        while k < len(ids) and ids[k] != tokenizer.marker_ids[END]:
            k += 1
        return tokenizer.decode(ids[j:k]), k + 1

    while i < len(ids):
        marker = by_id.get(ids[i])
        if marker not in role_of:
            raise TemplateError(f"token {i} ({ids[i]}) is not a role marker")
        message = {"role": role_of[marker]}
        i += 1
        if i < len(ids) and by_id.get(ids[i]) == CONTEXT:
            message["context"], i = until_end(i + 1)
        message["content"], i = until_end(i)
        messages.append(message)
    return messages


def render(messages: Sequence[dict]) -> str:
    """The conversation as one readable string (what the tokens spell, for logs and docs)."""
    check(messages)
    parts = []
    for m in messages:
        context = f"{CONTEXT}{m['context']}{END}" if m.get("context") else ""
        parts.append(f"{ROLES[m['role']]}{context}{m['content']}{END}")
    return "".join(parts)
