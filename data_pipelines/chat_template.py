"""The one chat renderer, used by training, inspect, evaluation, sampling, chat and serving.

A conversation is a list of messages {"role": "system" | "user" | "assistant", "content": str}
with an optional "context" (extra text attached to the turn: retrieved passages, tool output).
It is rendered by one of two templates, chosen by `data.chat_template` and recorded in the run:

- **project** (`ProjectTemplate`, the default for models trained here), as tokens:

      <bos> <|system|> You are ... <|end|> <|user|> What is 2 + 3? <|end|> <|assistant|> 5 <|end|>

  and a turn with context:  <|user|> <|context|> (the context) <|end|> (the content) <|end|>

  The markers are single reserved tokens (SentencePiece user-defined symbols). Text inside a
  message never produces a marker token: a literal "<|end|>" typed by a user is encoded byte by
  byte, so it decodes back to the same text and cannot end a turn or fake a role. A prompt for
  generation ends with <|assistant|>, and the reply is read back up to <|end|>:
  `parse(encode(m)) == m`. `PROJECT_JINJA` is the same template in Jinja (what an export ships).

- **model** (`JinjaTemplate`): a model's own Jinja template (`chat_template` in
  tokenizer_config.json, or chat_template.jinja), rendered with jinja2 in the sandbox, options
  and globals transformers gives it (trim_blocks, lstrip_blocks, its `tojson`,
  `raise_exception`, `strftime_now`, `bos_token`/`eos_token`/..., `add_generation_prompt`,
  `tools`, `documents`), so the text is byte-identical to `apply_chat_template`. Control tokens
  (added or special tokens) that appear literally inside a message are encoded as plain text,
  as transformers does with sanitize_control_tokens=True. A template that does not read a
  message's "context" gets it before the content, separated by a blank line.

Loss weights (where the loss mask is built): weights[i] = 1 when token i is a target the model
learns to produce. With loss_on="assistant" (default) those are every assistant reply and the
end-of-turn token closing it (so the model learns to stop); "last_assistant" keeps only the
final reply; "all" trains on every token after the first. For a Jinja template with
{% generation %} blocks the mask is transformers' `return_assistant_tokens_mask` (the tokens
overlapping those blocks); otherwise each reply's tokens are found by rendering prefixes of the
conversation (up to the reply with the generation prompt, and up to the end of the reply), cut
after the first stop token. A template whose prefixes are not prefixes of the whole rendering
(prefix-unstable, e.g. one that rewrites earlier turns) is refused naming the turn.

Templates travel with the tokenizer: `setup(cfg, tokenizer)` picks one and attaches it
(`use`), so every caller keeps calling `encode(tokenizer, ...)`, `prompt(tokenizer, ...)`,
`reply_stop_ids(tokenizer)`.
"""

import contextlib
import contextvars
import datetime
import functools
import json
import os
import re
from typing import Any, Sequence

import numpy as np
from absl import logging

SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
CONTEXT = "<|context|>"  # extra context attached to a turn (retrieved text, tool output)
END = "<|end|>"  # end of a turn

MARKERS = (SYSTEM, USER, ASSISTANT, CONTEXT, END)
ROLES = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT}
LOSS_ON = ("assistant", "last_assistant", "all")
CHOICES = ("auto", "project", "model")  # data.chat_template, or a path to a template
_MARKER_RE = re.compile("|".join(re.escape(m) for m in MARKERS))
RUN_FILE = "chat_template.json"  # a run's model template: source, token strings, control ids

# The project template in Jinja: renders bos_token + render(messages) (+ "<|assistant|>").
PROJECT_JINJA = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|system|>"
    "{% elif message['role'] == 'user' %}<|user|>"
    "{% elif message['role'] == 'assistant' %}<|assistant|>"
    "{% else %}{{ raise_exception('role ' + message['role'] + ' is not system, user or "
    "assistant') }}{% endif %}"
    "{% if message.get('context') %}<|context|>{{ message['context'] }}<|end|>{% endif %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] }}<|end|>"
    "{% endgeneration %}{% else %}{{ message['content'] }}<|end|>{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>{% endif %}")


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


def _check_loss_on(loss_on: str) -> None:
    if loss_on not in LOSS_ON:
        raise ValueError(f"loss_on={loss_on!r}; choose one of {LOSS_ON}")


# ---------------------------------------------------------------------------------------------
# Encoding pieces of text in the middle of a sequence.

def _encode_mid(tokenizer, text: str) -> list[int]:
    """`text` as it encodes after other text: a tokenizer with a dummy-prefix space (Llama's
    SentencePiece) would otherwise put a space in front of every piece encoded on its own
    ('Type <|end|>  to stop.'). Encoded after a newline whose ids are then removed (the trick
    transformers' encode_marked_chat uses); when the newline merges with the text, as is."""
    if not text:
        return []
    newline = tokenizer.encode("\n")
    ids = tokenizer.encode("\n" + text)
    if ids[:len(newline)] == newline:
        return ids[len(newline):]
    return tokenizer.encode(text)


def _plain(tokenizer, text: str, control_ids: frozenset) -> list[int]:
    """A control token's string as plain text (ids that are not control tokens), encoded
    mid-sequence. A tokenizer with byte-fallback pieces spells it in bytes (as the project
    always has); others encode it split in two, so that no added token matches."""
    sp = getattr(tokenizer, "sp", None)
    is_byte = getattr(tokenizer, "is_byte", None) or (sp and sp.is_byte)
    piece_to_id = getattr(tokenizer, "piece_to_id", None) or (sp and sp.piece_to_id)
    if is_byte and piece_to_id:
        ids = [piece_to_id(f"<0x{b:02X}>") for b in text.encode()]
        if all(i is not None and is_byte(i) for i in ids):
            return ids
    ids = _encode_mid(tokenizer, text)
    if not control_ids.intersection(ids):
        return ids
    if len(text) < 2:
        raise TemplateError(f"the tokenizer cannot encode {text!r} as plain text")
    return _plain(tokenizer, text[:1], control_ids) + _plain(tokenizer, text[1:], control_ids)


# ---------------------------------------------------------------------------------------------
# The project template.

class ProjectTemplate:
    """<|system|>/<|user|>/<|assistant|> ... <|end|>: reserved marker tokens, built as tokens."""

    name = "project"
    where = "the project template (<|user|>/<|assistant|> markers)"
    source = PROJECT_JINJA

    def encode_text(self, tokenizer, text: str) -> list[int]:
        """Message text -> ids, with any literal marker spelled out in plain-text tokens."""
        ids: list[int] = []
        pos = 0
        markers = frozenset(tokenizer.marker_ids.values())
        for match in _MARKER_RE.finditer(text):
            if match.start() > pos:
                ids += (tokenizer.encode(text[:match.start()]) if pos == 0
                        else _encode_mid(tokenizer, text[pos:match.start()]))
            ids += _plain(tokenizer, match.group(), markers)
            pos = match.end()
        if pos < len(text):
            ids += tokenizer.encode(text) if pos == 0 else _encode_mid(tokenizer, text[pos:])
        return ids

    def encode(self, tokenizer, messages, *, loss_on="assistant", generation_prompt=False):
        check(messages)
        _check_loss_on(loss_on)
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
                head += [m_ids[CONTEXT], *self.encode_text(tokenizer, m["context"]), end]
            body = [*self.encode_text(tokenizer, m["content"]), end]
            tokens += head + body
            weights += [1.0 if loss_on == "all" else 0.0] * len(head) + [float(learn)] * len(body)
        if generation_prompt:
            tokens.append(m_ids[ASSISTANT])
            weights.append(0.0)
        return np.asarray(tokens, np.int32), np.asarray(weights, np.float32)

    def prompt(self, tokenizer, messages) -> list[int]:
        return self.encode(tokenizer, messages, generation_prompt=True)[0].tolist()

    def end_id(self, tokenizer) -> int:
        return tokenizer.marker_ids[END]

    def stop_ids(self, tokenizer) -> tuple[int, ...]:
        return (tokenizer.eos_id, tokenizer.bos_id, *tokenizer.marker_ids.values())

    def control_tokens(self, tokenizer) -> dict[int, str]:
        out = {i: m for m, i in tokenizer.marker_ids.items()}
        for name in ("bos", "eos", "pad"):
            i = getattr(tokenizer, f"{name}_id", None)
            if i is not None and i >= 0:
                out.setdefault(i, _piece(tokenizer, i) or f"<{name}>")
        return out

    def parse(self, tokenizer, ids) -> list[dict]:
        by_id = {v: k for k, v in tokenizer.marker_ids.items()}
        role_of = {marker: role for role, marker in ROLES.items()}
        messages, i, ids = [], 0, [int(t) for t in ids]
        if ids and ids[0] == tokenizer.bos_id:
            i = 1
        if len(ids) > i and ids[-1] == tokenizer.marker_ids[ASSISTANT]:
            ids = ids[:-1]  # a generation prompt: the reply it asks for is not there yet

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

    def render(self, messages, *, add_generation_prompt: bool = False) -> str:
        check(messages)
        parts = []
        for m in messages:
            context = f"{CONTEXT}{m['context']}{END}" if m.get("context") else ""
            parts.append(f"{ROLES[m['role']]}{context}{m['content']}{END}")
        return "".join(parts) + (ASSISTANT if add_generation_prompt else "")


PROJECT = ProjectTemplate()


# ---------------------------------------------------------------------------------------------
# Jinja templates, rendered as transformers renders them.

# Private-use characters around control tokens found inside messages (transformers' own).
_LIT_START, _LIT_END = "\U000f0000", "\U000f0001"
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_GENERATION_RE = re.compile(r"\{\%-?\s*generation\s*-?\%\}")
SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                      "cls_token", "mask_token")  # what transformers passes the template


@functools.lru_cache(maxsize=16)
def _compile(source: str):
    """The template compiled in transformers' environment (chat_template_utils.py
    _cached_compile_jinja_template): same sandbox, options, filters, globals, extension."""
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.utils
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class AssistantTracker(jinja2.ext.Extension):
        """{% generation %}...{% endgeneration %}: records the character span it renders."""
        tags = {"generation"}

        def __init__(self, environment):
            super().__init__(environment)
            environment.extend(activate_tracker=self.activate_tracker)
            self._tracking = contextvars.ContextVar("assistant_tracker", default=None)

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation_support"), [], [],
                                          body).set_lineno(lineno)

        @jinja2.pass_eval_context
        def _generation_support(self, context, caller):
            rv = caller()
            if (tracking := self._tracking.get()) is not None:
                blocks, spans = tracking
                start = len("".join(blocks))
                spans.append((start, start + len(rv)))
            return rv

        @contextlib.contextmanager
        def activate_tracker(self, blocks, spans):
            token = self._tracking.set((blocks, spans))
            try:
                yield
            finally:
                self._tracking.reset(token)

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # transformers' filter: no HTML escaping (Jinja's own escapes <, >, &, ').
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    def strftime_now(format):
        return datetime.datetime.now().strftime(format)

    class TemplateDict:
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):
        # No underscore attributes on a namespace (they would reach CPython internals).
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check_name(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check_name(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(
                    f"chat templates cannot store underscore attributes ({name!r}) on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[AssistantTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    env.globals["dict"] = TemplateDict()
    env.globals["namespace"] = TemplateNamespace
    ast = env.parse(source)
    literals = {n.data for n in ast.find_all(jinja2.nodes.TemplateData)}
    literals |= {n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)}
    # message.context, message['context'], message.get('context')
    reads_context = (any(n.attr == "context" for n in ast.find_all(jinja2.nodes.Getattr))
                     or any(n.value == "context" for n in ast.find_all(jinja2.nodes.Const)))
    return env.from_string(source), "\0".join(literals), reads_context


def _plain_data(value):
    """Messages, tools and documents as plain JSON-like values (fresh copies: a template can
    never touch the caller's objects)."""
    if isinstance(value, dict):
        return {str(k): _plain_data(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain_data(v) for v in value]
    return value


class JinjaTemplate:
    """A model's own Jinja chat template.

    special_tokens: the strings transformers passes as template variables (bos_token, ...);
    added_tokens: {token string: (id, special)} of the tokenizer's added tokens, from which the
    control tokens are picked as transformers picks them (special, or written by the template).
    """

    def __init__(self, source: str, *, special_tokens: dict[str, str] | None = None,
                 added_tokens: dict[str, tuple[int, bool]] | None = None, name: str = "model",
                 where: str = "the chat template"):
        try:
            self._template, literals, self._reads_context = _compile(source)
        except ImportError:
            raise TemplateError("rendering a model's chat template needs jinja2 (pip install "
                                "'jinja2>=3.1.6')") from None
        except Exception as e:  # jinja2.TemplateSyntaxError and kin
            raise TemplateError(f"{where} is not a valid Jinja template ({e})") from None
        self.source, self.name, self.where = source, name, where
        self.special_tokens = {k: v for k, v in (special_tokens or {}).items()
                               if k in SPECIAL_TOKEN_KEYS and isinstance(v, str)}
        self.added_tokens = dict(added_tokens or {})
        self.has_generation = bool(_GENERATION_RE.search(source))
        # Control tokens, as transformers' _get_control_tokens: special added tokens, and the
        # added tokens the template writes (except whitespace tokens such as Gemma's "\n").
        self.controls = {t: i for t, (i, special) in self.added_tokens.items()
                         if special or (t in literals and not t.isspace())}
        self.control_ids = frozenset(self.controls.values())
        longest = sorted(self.controls, key=len, reverse=True)
        self._control_re = re.compile("|".join(map(re.escape, longest)) or "(?!)")
        self._marked_re = re.compile(
            f"{_LIT_START}({self._control_re.pattern}){_LIT_END}|[{_LIT_START}{_LIT_END}]")
        self._cache: dict[tuple[str, int], tuple] = {}  # per tokenizer: (it, value)
        self._turn: tuple | None = None  # _turn_tokens

    def to_json(self) -> dict:
        return {"chat_template": self.source, "special_tokens": self.special_tokens,
                "added_tokens": {t: [i, s] for t, (i, s) in self.added_tokens.items()}}

    # -- rendering -----------------------------------------------------------------------------

    def _messages(self, messages, mark: bool) -> list[dict]:
        out = []
        for m in messages:
            m = {k: _plain_data(v) for k, v in m.items() if v is not None}
            reasoning = next((m[k] for k in _REASONING_FIELDS if m.get(k) is not None), None)
            if reasoning is not None:  # transformers' _alias_reasoning_fields
                m = {"thinking": reasoning, **m, "reasoning_content": reasoning}
            if m.get("context") and not self._reads_context and isinstance(m.get("content"), str):
                m["content"] = f"{m.pop('context')}\n\n{m['content']}"
            out.append(self._mark(m) if mark else m)
        return out

    def _mark(self, obj):
        """Control tokens inside message text wrapped in private-use markers (transformers'
        mark_control_tokens), so they are encoded as plain text."""
        if isinstance(obj, str):
            obj = obj.replace(_LIT_START, "").replace(_LIT_END, "")
            return self._control_re.sub(f"{_LIT_START}\\g<0>{_LIT_END}", obj)
        if isinstance(obj, dict):
            return {k: self._mark(v) for k, v in obj.items()}
        if isinstance(obj, list):
            return [self._mark(v) for v in obj]
        return obj

    def _render(self, messages: list[dict], add_generation_prompt: bool, track: bool = False,
                tools=None, documents=None, **kwargs):
        """Already-normalized messages -> (text, generation spans or None)."""
        import jinja2

        variables = {**self.special_tokens, **_plain_data(kwargs)}
        args = dict(messages=messages, tools=_plain_data(tools), documents=_plain_data(documents),
                    add_generation_prompt=add_generation_prompt, **variables)
        try:
            if not track:
                return self._template.render(**args), None
            blocks, spans = [], []
            with self._template.environment.activate_tracker(blocks, spans):
                for block in self._template.generate(**args):
                    blocks.append(block)
            return "".join(blocks), spans
        except jinja2.TemplateError as e:
            raise TemplateError(f"{self.where} failed on this conversation: {e}") from None

    def render(self, messages, *, add_generation_prompt: bool = False, tools=None,
               documents=None, **kwargs) -> str:
        """The text `apply_chat_template(messages, tokenize=False, ...)` gives."""
        check(messages)
        text, _ = self._render(self._messages(messages, mark=False), add_generation_prompt,
                               tools=tools, documents=documents, **kwargs)
        return text

    # -- encoding ------------------------------------------------------------------------------

    def _per_tokenizer(self, what: str, tokenizer, make):
        entry = self._cache.get((what, id(tokenizer)))
        if entry is None or entry[0] is not tokenizer:  # an id may be reused after a free
            entry = self._cache[(what, id(tokenizer))] = (tokenizer, make(tokenizer))
        return entry[1]

    def _split_re(self, tokenizer) -> re.Pattern:
        """Controls that tokenizer.encode() does not turn into their id by itself (a
        SentencePiece model's control pieces such as <s>): those are split out by hand."""
        def make(tok):
            missed = sorted((t for t, i in self.controls.items() if tok.encode(t) != [i]),
                            key=len, reverse=True)
            return re.compile("(" + "|".join(map(re.escape, missed)) + ")" if missed else "(?!)")
        return self._per_tokenizer("split", tokenizer, make)

    def _encode_span(self, tokenizer, text: str, mid: bool) -> list[int]:
        parts = self._split_re(tokenizer).split(text)
        ids: list[int] = []
        for j, part in enumerate(parts):
            if j % 2:
                ids.append(self.controls[part])
            elif part:
                # After a template's control token a piece is encoded on its own, as the
                # SentencePiece models these are (Llama 2) were trained.
                ids += _encode_mid(tokenizer, part) if (mid and j == 0) else tokenizer.encode(part)
        return ids

    def _encode(self, tokenizer, marked: str) -> list[int]:
        """Rendered text (control tokens from messages marked) -> ids."""
        pieces = self._marked_re.split(marked)
        ids = self._encode_span(tokenizer, pieces[0], mid=False)
        for j, piece in enumerate(pieces[1:], start=1):
            if not piece:
                continue
            if j % 2:  # a control token typed inside a message: plain text
                ids += _plain(tokenizer, piece, self.control_ids)
            else:
                ids += self._encode_span(tokenizer, piece, mid=True)
        return ids

    def _ids(self, tokenizer, messages, generation_prompt: bool) -> list[int]:
        text, _ = self._render(self._messages(messages, mark=True), generation_prompt)
        return self._encode(tokenizer, text)

    def encode_text(self, tokenizer, text: str) -> list[int]:
        """Message text as ids, as it encodes inside a rendered conversation (roughly: the
        tokens around it may merge with its ends)."""
        ids: list[int] = []
        for j, piece in enumerate(self._marked_re.split(self._mark(text))):
            if piece:
                ids += (_plain(tokenizer, piece, self.control_ids) if j % 2
                        else _encode_mid(tokenizer, piece))
        return ids

    def prompt(self, tokenizer, messages) -> list[int]:
        check(messages)
        return self._ids(tokenizer, messages, True)

    def encode(self, tokenizer, messages, *, loss_on="assistant", generation_prompt=False):
        check(messages)
        _check_loss_on(loss_on)
        marked = self._messages(messages, mark=True)
        track = self.has_generation and loss_on != "all"
        text, spans = self._render(marked, generation_prompt, track=track)
        ids = self._encode(tokenizer, text)
        weights = np.zeros(len(ids), np.float32)
        if loss_on == "all":
            weights[1:] = 1.0
            return np.asarray(ids, np.int32), weights
        assistants = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if track:
            if loss_on == "last_assistant":
                spans = spans[-1:]
            for start, end in spans:
                if end > start:
                    lo = _boundary(self._encode(tokenizer, text[:start]), ids, end=False)
                    hi = _boundary(self._encode(tokenizer, text[:end]), ids, end=True)
                    weights[lo:hi] = 1.0
            return np.asarray(ids, np.int32), weights
        if loss_on == "last_assistant":
            assistants = assistants[-1:]
        stops = set(self.stop_ids(tokenizer))
        for i in assistants:
            start, end = self._reply_span(marked, i, text)
            lo = _boundary(self._encode(tokenizer, text[:start]), ids, end=False)
            hi = _boundary(self._encode(tokenizer, text[:end]), ids, end=True)
            # The reply ends at its end-of-turn token; what the template writes after it (a
            # newline) is never generated, so it is not learned.
            cut = next((k + 1 for k in range(lo, hi) if ids[k] in stops), hi)
            weights[lo:cut] = 1.0
        return np.asarray(ids, np.int32), weights

    def _reply_span(self, marked: list[dict], i: int, full: str) -> tuple[int, int]:
        """Characters of message i (an assistant reply with its end of turn) in `full`, from
        the prompt before it (generation prompt included) and the conversation up to it."""
        before, _ = self._render(marked[:i], True)
        upto, _ = self._render(marked[:i + 1], False)
        if not (full.startswith(upto) and upto.startswith(before)):
            what = ("the prompt before it (with the generation prompt) is not how the "
                    "conversation up to it begins" if not upto.startswith(before) else
                    "the conversation up to it is not how the whole conversation begins")
            raise TemplateError(
                f"{self.where} is not prefix-stable at message {i} (assistant): {what}, so "
                "the tokens of that reply cannot be told apart; learn only the last reply "
                "(data.loss_on=last_assistant), or use a template with {% generation %} "
                "blocks or data.chat_template=project")
        return len(before), len(upto)

    # -- replies -------------------------------------------------------------------------------

    def _turn_tokens(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(end-of-turn ids, ids that start the assistant's turn), read off a probe
        conversation: the control tokens right after a reply, and those of the generation
        prompt after the user's text."""
        if self._turn is None:
            user, reply = "\u2063u\u2063", "\u2063a\u2063"  # text no template writes itself
            msgs = [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
            end, start = (), ()
            try:
                before, _ = self._render(msgs[:1], True)
                upto, _ = self._render(msgs, False)
            except TemplateError:
                before = upto = ""
            at = upto.find(reply)
            if at >= 0 and upto.startswith(before):
                first = self._control_re.search(upto, at + len(reply))
                end = (self.controls[first.group()],) if first else ()
            u = before.find(user)
            if u >= 0:
                start = tuple(self.controls[m.group()]
                              for m in self._control_re.finditer(before, u + len(user)))
            self._turn = (end, start)
        return self._turn

    def end_id(self, tokenizer) -> int:
        end, _ = self._turn_tokens()
        return end[0] if end else tokenizer.eos_id

    def stop_ids(self, tokenizer) -> tuple[int, ...]:
        end, start = self._turn_tokens()
        extra = tuple(getattr(tokenizer, "stop_ids", ()) or ())
        return tuple(dict.fromkeys((*end, tokenizer.eos_id, *extra, *start)))

    def control_tokens(self, tokenizer) -> dict[int, str]:
        return {i: t for t, i in self.controls.items()}

    def parse(self, tokenizer, ids) -> list[dict]:
        raise TemplateError(f"{self.where} cannot be read back into messages (only the project "
                            "template can); keep the messages that made the prompt")


def _boundary(prefix: list[int], ids: list[int], *, end: bool) -> int:
    """The token index in `ids` where the text encoded as `prefix` ends. When the boundary
    falls inside a token of `ids` (the prefix alone tokenizes differently there), that token
    overlaps both sides and, as in transformers' masks, counts as inside the span."""
    if ids[:len(prefix)] == prefix:
        return len(prefix)
    k = 0  # the first token where they differ: it starts inside the prefix, ends past it
    while k < min(len(prefix), len(ids)) and ids[k] == prefix[k]:
        k += 1
    return k + 1 if end else k


# ---------------------------------------------------------------------------------------------
# Choosing a template, attaching it to the tokenizer, recording it in a run.

def _read_json(path: str) -> dict:
    from t5x_like.core.errors import UserError

    try:
        with open(path, encoding="utf-8") as f:
            value = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not readable JSON ({e}).") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object.")
    return value


def _token_string(value) -> str | None:
    if isinstance(value, dict):  # an AddedToken as tokenizer_config.json stores it
        value = value.get("content")
    return value if isinstance(value, str) else None


def _model_source(folder: str) -> tuple[str, str] | None:
    """(template source, file it came from) of a model or run folder, or None."""
    ours = os.path.join(folder, RUN_FILE)
    if os.path.isfile(ours):
        return _read_json(ours).get("chat_template"), ours
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read(), jinja
    config = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(config):
        source = _read_json(config).get("chat_template")
        if isinstance(source, list):  # named templates: the default one, as transformers picks
            source = {t.get("name"): t.get("template") for t in source
                      if isinstance(t, dict)}.get("default")
        if isinstance(source, str):
            return source, config
    return None


def _model_tokens(folder: str) -> tuple[dict[str, str], dict[str, tuple[int, bool]]]:
    """(special token strings, added tokens) from a model folder's tokenizer files."""
    ours = os.path.join(folder, RUN_FILE)
    if os.path.isfile(ours):
        saved = _read_json(ours)
        return (dict(saved.get("special_tokens", {})),
                {t: (int(i), bool(s)) for t, (i, s) in saved.get("added_tokens", {}).items()})
    specials: dict[str, str] = {}
    added: dict[str, tuple[int, bool]] = {}
    tok_json = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(tok_json):
        for t in _read_json(tok_json).get("added_tokens", []):
            added[t["content"]] = (int(t["id"]), bool(t.get("special")))
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            continue
        data = _read_json(path)
        for key in SPECIAL_TOKEN_KEYS:
            if _token_string(data.get(key)) is not None:
                specials[key] = _token_string(data[key])
        for i, t in (data.get("added_tokens_decoder") or {}).items():
            if _token_string(t) is not None:
                added.setdefault(_token_string(t), (int(i), bool(t.get("special"))))
    return specials, added


def _piece(tokenizer, i: int) -> str | None:
    """The token string of id i, through whichever interface the tokenizer has."""
    for name in ("id_to_piece", "id_to_token"):
        if hasattr(tokenizer, name):
            return getattr(tokenizer, name)(i)
    sp = getattr(tokenizer, "sp", None)
    return sp.id_to_piece(i) if sp is not None else None


def _tokenizer_specials(tokenizer, specials, added):
    """The ids of the special tokens the files name, from the tokenizer; with no files (a
    tokenizer trained here), the strings too. (Where files exist, a token they do not name is
    not a template variable, as in transformers.)"""
    from_files = bool(specials)
    for key in ("bos", "eos", "unk", "pad"):
        i = getattr(tokenizer, f"{key}_id", None)
        if i is None or i < 0:
            continue
        piece = _piece(tokenizer, i)
        if not from_files and piece is not None:
            specials.setdefault(f"{key}_token", piece)
        if piece is not None and specials.get(f"{key}_token") == piece:
            added.setdefault(piece, (i, True))
    for marker, i in (getattr(tokenizer, "marker_ids", None) or {}).items():
        added.setdefault(marker, (i, False))  # the project's markers (user-defined pieces)
    return specials, added


def load(choice: str, model_dir: str = "", tokenizer=None, *,
         key: str = "data.chat_template"):
    """The template `choice` names: "project"; "model" (the model folder's own: our run file,
    chat_template.jinja, or tokenizer_config.json's chat_template); "auto" (the model's when
    it has one, else project); or a path (a .jinja file, a tokenizer_config.json, a folder)."""
    from t5x_like.core.errors import UserError

    if choice == "project":
        return PROJECT
    folder, source_of = model_dir, model_dir
    if choice not in ("auto", "model"):
        path = os.path.expanduser(choice)
        if os.path.isdir(path):
            source_of = path
        elif os.path.isfile(path) and path.endswith(".json"):
            source_of, folder = os.path.dirname(path) or ".", model_dir or os.path.dirname(path)
        elif os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                found = (f.read(), path)
            source_of = None
        else:
            raise UserError(f"config key '{key}': {choice!r} is neither auto, project, model nor "
                            "an existing template file or model folder.")
    if source_of is not None:
        found = _model_source(source_of) if source_of else None
    if found is None or not found[0]:
        if choice == "auto":
            return PROJECT
        raise UserError(f"config key '{key}': {choice!r}, but {source_of or 'the tokenizer'} has "
                        "no chat template (chat_template.jinja or tokenizer_config.json's "
                        "chat_template); use project, or give the path of a template file.")
    specials, added = _model_tokens(folder) if folder else ({}, {})
    if tokenizer is not None:
        specials, added = _tokenizer_specials(tokenizer, specials, added)
        size = getattr(tokenizer, "vocab_size", None)
        bad = sorted(t for t, (i, _) in added.items() if size is not None and not 0 <= i < size)
        if bad:
            raise UserError(f"config key '{key}': the tokenizer files of {folder} give {bad[0]!r} "
                            f"an id outside the vocabulary of {size}; they belong to another "
                            "model.")
    try:
        return JinjaTemplate(found[0], special_tokens=specials, added_tokens=added,
                             name="model", where=found[1])
    except TemplateError as e:
        raise UserError(f"config key '{key}': {e}.") from None


def use(tokenizer, template) -> Any:
    """Attaches `template` to `tokenizer`: every function below renders with it."""
    tokenizer.template = template
    return tokenizer


def of(tokenizer):
    """The template attached to `tokenizer` (the project's when none is)."""
    return getattr(tokenizer, "template", None) or PROJECT


def model_dir_of(cfg) -> str:
    """The folder whose chat template `data.chat_template=model|auto` means: the given
    tokenizer's (init_from's, after inheriting); "" for a tokenizer trained here."""
    path = cfg.data.tokenizer
    return "" if not path else path if os.path.isdir(path) else os.path.dirname(path)


def setup(cfg, tokenizer):
    """Picks the run's template from `data.chat_template`, attaches it to `tokenizer` and
    returns it. config.json keeps the choice as given (so a resumed run compares equal);
    `install` records what it resolved to (RUN_FILE for a model template)."""
    template = load(cfg.data.get("chat_template", "auto") or "auto", model_dir_of(cfg),
                    tokenizer)
    use(tokenizer, template)
    logging.info("chat template: %s (%s)", template.name, template.where)
    return template


def install(tokenizer, workdir: str) -> None:
    """Records the attached model template in `workdir` (RUN_FILE: source, token strings and
    ids) so the run renders the same after the model folder is gone; with the project template,
    removes one an earlier start of this run left."""
    template = of(tokenizer)
    path = os.path.join(workdir, RUN_FILE)
    if template is PROJECT:
        if os.path.isfile(path):
            os.remove(path)  # ours: a start that failed before its first checkpoint
        return
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(template.to_json(), f, ensure_ascii=False, indent=1)
    os.replace(tmp, path)


def for_run(cfg, tokenizer, workdir: str):
    """Attaches a trained run's template: its config's data.chat_template ("project", or the
    model's kept in the run: RUN_FILE or the tokenizer's files; runs from before the key
    trained with the project's)."""
    choice = cfg.data.get("chat_template", "project") if "data" in cfg else "project"
    choice = choice if choice in ("project", "auto") else "model"
    use(tokenizer, load(choice, workdir, tokenizer))
    return tokenizer


# ---------------------------------------------------------------------------------------------
# The functions every caller uses: they render with the tokenizer's template.

def encode_text(tokenizer, text: str) -> list[int]:
    """Message text -> ids, with any literal marker spelled out as plain text."""
    return of(tokenizer).encode_text(tokenizer, text)


def encode(tokenizer, messages: Sequence[dict], *, loss_on: str = "assistant",
           generation_prompt: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Conversation -> (token ids, loss weights), both int32/float32 arrays of equal length.

    generation_prompt=True appends the template's generation prompt (project: "<|assistant|>")
    so the model continues with the reply.
    """
    return of(tokenizer).encode(tokenizer, messages, loss_on=loss_on,
                                generation_prompt=generation_prompt)


def prompt(tokenizer, messages: Sequence[dict]) -> list[int]:
    """Ids to feed the model so that it writes the next assistant turn."""
    return of(tokenizer).prompt(tokenizer, messages)


def end_id(tokenizer) -> int:
    """The token closing an assistant turn (project: <|end|>; a model's: <|im_end|>, ...)."""
    return of(tokenizer).end_id(tokenizer)


def reply(tokenizer, generated: Sequence[int]) -> str:
    """The assistant's text from generated ids: everything before its end of turn (or eos)."""
    stop = {end_id(tokenizer), tokenizer.eos_id}
    out = []
    for t in generated:
        if int(t) in stop:
            break
        out.append(int(t))
    return tokenizer.decode(out)


def reply_stop_ids(tokenizer) -> tuple[int, ...]:
    """Token ids that end a generated reply: the end of turn, eos, and any token that would
    start a new turn or conversation (for the decoder's stop_tokens)."""
    return of(tokenizer).stop_ids(tokenizer)


def control_tokens(tokenizer) -> dict[int, str]:
    """{id: text} of the tokens the template writes itself (markers, specials): what inspect
    shows apart from the same text typed inside a message."""
    return of(tokenizer).control_tokens(tokenizer)


def parse(tokenizer, ids: Sequence[int]) -> list[dict]:
    """Token ids of a rendered conversation -> messages (the inverse of `encode`; a trailing
    generation prompt is ignored). Project template only."""
    return of(tokenizer).parse(tokenizer, ids)


def render(messages: Sequence[dict], tokenizer=None, *, add_generation_prompt: bool = False
           ) -> str:
    """The conversation as one string: for the project template, what the tokens spell (for
    logs and docs); for a model's template, what apply_chat_template renders."""
    template = PROJECT if tokenizer is None else of(tokenizer)
    return template.render(messages, add_generation_prompt=add_generation_prompt)
