"""The three record schemas of prepared datasets, and turning each input format into one of them.

Every prepared record is a dict of strings (stored as TFDS Text features):

    text        {"text": str}
    chat        {"messages": JSON string of [{"role": "system"|"user"|"assistant", "content": str,
                                              optional "context": str}]}
    preference  {"prompt": JSON string of messages ending with a user turn,
                 "chosen": str, "rejected": str}

Later stages (chat SFT, preference tuning) read these field names; the chat template that turns
messages into tokens lives elsewhere (chat_template.py). Here, messages are only checked and
normalized. `text_view` is the plain text of any record (message contexts and contents joined
by newlines): what cleaning filters, deduplication, statistics and tokenizer training look at.
A turn's `context` (retrieved passages, tool output: README's chat format) is text of the
record like its content: kept, cleaned, counted.

A record that cannot be normalized raises `BadRecord`; the reader turns it into a UserError
naming file and line, or skips and counts it (`data.on_bad_record`).
"""

import json
import re

KINDS = ("text", "chat", "preference")
FIELDS = {"text": ("text",), "chat": ("messages",), "preference": ("prompt", "chosen", "rejected")}
ROLES = ("system", "user", "assistant")


class BadRecord(ValueError):
    """A record that does not fit its format; the message says what is wrong, in a few words."""


def text_view(record: dict, kind: str) -> str:
    """The record's plain text: what filters, dedup, stats and tokenizer training see."""
    if kind == "text":
        return record["text"]
    if kind == "chat":
        return "\n".join(_texts(record["messages"]))
    return "\n".join([*_texts(record["prompt"]), record["chosen"],
                      record["rejected"]])


def encode(record: dict, kind: str) -> dict[str, str]:
    """In-memory record (messages as lists) -> stored record (messages as JSON strings)."""
    if kind == "text":
        return {"text": record["text"]}
    if kind == "chat":
        return {"messages": json.dumps(record["messages"], ensure_ascii=False)}
    return {"prompt": json.dumps(record["prompt"], ensure_ascii=False),
            "chosen": record["chosen"], "rejected": record["rejected"]}


def decode(stored: dict, kind: str) -> dict:
    """Stored record (bytes or str values, as TFDS returns them) -> in-memory record."""
    def s(value):
        return value.decode("utf-8") if isinstance(value, bytes) else value
    if kind == "text":
        return {"text": s(stored["text"])}
    if kind == "chat":
        return {"messages": json.loads(s(stored["messages"]))}
    return {"prompt": json.loads(s(stored["prompt"])), "chosen": s(stored["chosen"]),
            "rejected": s(stored["rejected"])}


def _string(obj: dict, key: str, where: str = "") -> str:
    if key not in obj:
        raise BadRecord(f"no field {key!r}{where} (fields: {', '.join(sorted(obj)) or 'none'})")
    value = obj[key]
    if not isinstance(value, str):
        raise BadRecord(f"field {key!r}{where} is {type(value).__name__}, not a string")
    return value


def _object(obj) -> dict:
    if not isinstance(obj, dict):
        raise BadRecord(f"a JSON {type(obj).__name__}, not an object")
    return obj


def _texts(messages: list[dict]) -> list[str]:
    """Every text of the messages, in order: each turn's context (if any), then its content."""
    return [t for m in messages for t in ((m["context"],) if "context" in m else ())
            + (m["content"],)]


def messages(value) -> list[dict[str, str]]:
    """Checks a messages list: roles from ROLES, string contents (and contexts, where given),
    at least one user turn."""
    if isinstance(value, str):  # already stored as a JSON string
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise BadRecord(f"messages are not valid JSON ({e.msg})") from None
    if not isinstance(value, list) or not value:
        raise BadRecord("messages must be a non-empty list of {role, content} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict):
            raise BadRecord(f"message {i} is not an object")
        role = _string(m, "role", f" in message {i}")
        if role not in ROLES:
            raise BadRecord(f"message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        message = {"role": role, "content": _string(m, "content", f" in message {i}")}
        if m.get("context") is not None:
            message["context"] = _string(m, "context", f" in message {i}")
        out.append(message)
    if not any(m["role"] == "user" for m in out):
        raise BadRecord("messages have no user turn")
    return out


def from_field(obj, field: str) -> dict:
    """JSON(L) text records: the string in `field`."""
    return {"text": _string(_object(obj), field)}


def from_alpaca(obj) -> list[dict]:
    """Alpaca {instruction, input, output} -> one user/assistant chat.

    Self-Instruct seed tasks ({instruction, instances: [{input, output}, ...]}) give one chat
    per instance. The input, when present, follows the instruction after a blank line.
    """
    obj = _object(obj)
    instruction = _string(obj, "instruction")
    if "instances" in obj and "output" not in obj:
        instances = obj["instances"]
        if not isinstance(instances, list) or not instances:
            raise BadRecord("field 'instances' must be a non-empty list")
    else:
        instances = [obj]
    out = []
    for i, inst in enumerate(instances):
        where = f" in instance {i}" if inst is not obj else ""
        inst = _object(inst)
        given = inst.get("input", "")
        if not isinstance(given, str):
            raise BadRecord(f"field 'input'{where} is {type(given).__name__}, not a string")
        user = instruction.strip() + ("\n\n" + given.strip() if given.strip() else "")
        out.append({"messages": [{"role": "user", "content": user},
                                 {"role": "assistant", "content": _string(inst, "output", where)}]})
    return out


def from_chat(obj, field: str = "messages") -> dict:
    """{field: [{role, content[, context]}, ...]} as given."""
    obj = _object(obj)
    if field not in obj:
        raise BadRecord(f"no field {field!r} (fields: {', '.join(sorted(obj)) or 'none'})")
    return {"messages": messages(obj[field])}


_SGD_ROLES = {"USER": "user", "SYSTEM": "assistant"}


def from_sgd(obj) -> dict:
    """Schema-Guided Dialogue {turns: [{speaker: USER|SYSTEM, utterance}, ...]} -> chat.

    The SGD "SYSTEM" is the dialogue agent, so its turns are the assistant's; frames
    (slot annotations) are not needed for chat and are dropped.
    """
    obj = _object(obj)
    turns = obj.get("turns")
    if not isinstance(turns, list) or not turns:
        raise BadRecord("field 'turns' must be a non-empty list of {speaker, utterance}")
    out = []
    for i, turn in enumerate(turns):
        turn = _object(turn)
        speaker = _string(turn, "speaker", f" in turn {i}")
        if speaker not in _SGD_ROLES:
            raise BadRecord(f"turn {i} has speaker {speaker!r}; SGD speakers are USER and SYSTEM")
        out.append({"role": _SGD_ROLES[speaker],
                    "content": _string(turn, "utterance", f" in turn {i}")})
    return {"messages": messages(out)}


_HH_TURN = re.compile(r"\n\n(Human|Assistant): ")


def parse_hh(conversation: str) -> list[dict[str, str]]:
    """"\\n\\nHuman: ...\\n\\nAssistant: ..." (the hh-rlhf form) -> messages."""
    parts = _HH_TURN.split(conversation)
    if parts[0].strip() or len(parts) < 3:
        raise BadRecord("conversation does not start with '\\n\\nHuman: '")
    roles = {"Human": "user", "Assistant": "assistant"}
    return [{"role": roles[who], "content": text} for who, text in zip(parts[1::2], parts[2::2])]


def from_preference(obj) -> dict:
    """Preference pairs in either form -> {prompt messages, chosen, rejected}.

    hh-rlhf: {"chosen": conversation, "rejected": conversation}, both the whole dialogue; they
    must share every turn but the last assistant reply, which becomes chosen/rejected.
    Explicit: {"prompt": str | messages, "chosen": str, "rejected": str}.
    """
    obj = _object(obj)
    chosen, rejected = _string(obj, "chosen"), _string(obj, "rejected")
    if "prompt" in obj:
        prompt = obj["prompt"]
        if isinstance(prompt, str) and not prompt.lstrip().startswith("["):
            prompt = [{"role": "user", "content": prompt}]
        prompt = messages(prompt)
    else:
        a, b = parse_hh(chosen), parse_hh(rejected)
        if a[-1]["role"] != "assistant" or b[-1]["role"] != "assistant":
            raise BadRecord("chosen and rejected must each end with an Assistant reply")
        if a[:-1] != b[:-1]:
            raise BadRecord("chosen and rejected do not share the conversation before the "
                            "last reply")
        prompt, chosen, rejected = messages(a[:-1]), a[-1]["content"], b[-1]["content"]
    if prompt[-1]["role"] != "user":
        raise BadRecord("the prompt must end with a user turn")
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def pieces(record: dict, kind: str) -> list[str]:
    """Every piece of text of the record: the text, each message, each reply."""
    if kind == "text":
        return [record["text"]]
    if kind == "chat":
        return _texts(record["messages"])
    return [*_texts(record["prompt"]), record["chosen"], record["rejected"]]


def map_contents(record: dict, kind: str, fn) -> dict:
    """Applies fn to every piece of text of the record (text, message contents and contexts,
    replies)."""
    if kind == "text":
        return {"text": fn(record["text"])}
    def each(messages):
        return [{**m, "content": fn(m["content"]),
                 **({"context": fn(m["context"])} if "context" in m else {})} for m in messages]

    if kind == "chat":
        return {"messages": each(record["messages"])}
    return {"prompt": each(record["prompt"]), "chosen": fn(record["chosen"]),
            "rejected": fn(record["rejected"])}


def has_empty_part(record: dict, kind: str) -> bool:
    """True when cleaning left a piece of the record empty (a blank prompt turn or reply).

    A chat's blank assistant reply is kept: training on it teaches the model to end its turn
    there (the reply is just the end-of-turn token). A blank system or user turn is not: there
    is nothing to answer. A blank context is not rendered, so it does not count."""
    if kind == "text":
        return not record["text"].strip()
    if kind == "chat":
        return any(not m["content"].strip() for m in record["messages"]
                   if m["role"] != "assistant")
    return (any(not m["content"].strip() for m in record["prompt"])
            or not record["chosen"].strip() or not record["rejected"].strip())
