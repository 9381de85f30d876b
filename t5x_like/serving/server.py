"""The chat server: an OpenAI-compatible API, a web chat page and the feedback database.

    python -m t5x_like.serve --workdir=runs/sft [--host=127.0.0.1 --port=8000] [--api_key=...]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<key or anything>")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi"}])

Routes: POST /v1/chat/completions (messages, temperature, top_p, max_tokens, stop, n, seed,
logit_bias, presence_penalty, frequency_penalty, logprobs/top_logprobs, stream with server-sent
events; extensions: top_k, conversation_id, regenerate_of / regenerate_of_index, parent_id /
parent_index), POST /v1/completions (text or token ids continued as they are; echo and
logprobs score a prompt), GET /v1/models, POST /v1/feedback (rating, correction, problem
report, chosen), /v1/conversations, GET /health ("warming", then "ready"), GET /metrics
(Prometheus), GET / (the web chat page). A parameter the server does not implement is a 400
naming it, never ignored.

Generation: the continuous-batching engine (t5x_like/serving/engine.py) keeps --max_batch rows
decoding on the device, requests joining and leaving between steps, every program compiled at
start-up; --batching=static (and a replaced `generate`, e.g. best-of-N) gathers waiting
requests into one device batch decoded to its end by one worker thread (`Batcher`).

Every completion (each of its n choices) is stored with its prompt, sampling settings and the
model step in `<workdir>/feedback.sqlite` (t5x_like/serving/feedback.py) before the client gets its
last byte, so feedback can always name it. Safe by default: binds 127.0.0.1; with an API key
(--api_key or $T5X_LIKE_API_KEY) every /v1 route needs `Authorization: Bearer <key>` (401);
bodies over --max_request_bytes get 413, a body that stops arriving 408; more than
--max_messages messages, max_tokens over --max_tokens_limit, n over --max_n, bad fields, NaN
or infinite numbers, invalid Unicode and malformed JSON get 400; every error is a
JSON body {"error": {"message", "type", "param", "code"}} naming the field or limit, never a
stack trace (those go to the server log).
"""

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
import math
import os
import queue
import re
import secrets
import threading
import time
from typing import Any, Callable, Iterator, Sequence

from absl import logging
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from data_pipelines import chat_template
from t5x_like.modeling import decoding
from t5x_like.serving import engine as engine_lib
from t5x_like.serving import feedback
from t5x_like.serving import metrics as metrics_lib
from t5x_like.serving import history, security  # webchat: history, retries, checks
from t5x_like.core.errors import UserError

API_KEY_ENV = "T5X_LIKE_API_KEY"
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FINISH = {"stop": "stop", "length": "length", "constraint": "stop"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 405: "invalid_request_error", 408: "timeout_error",
                413: "invalid_request_error", 503: "server_busy", 500: "server_error"}


@dataclasses.dataclass(frozen=True)
class Limits:
    """What one request may ask for; each has a flag of the same name."""
    max_request_bytes: int = 1_000_000  # body size (413 beyond)
    max_messages: int = 64  # messages in one conversation
    max_tokens_limit: int = 512  # new tokens one request may ask for
    max_n: int = 4  # choices per request
    max_stop: int = 4  # stop strings per request (OpenAI's limit too)
    max_queue: int = 256  # requests waiting for the device before 503 "busy"
    body_timeout_s: float = 10.0  # a body that stops arriving this long: 408
    max_prompts: int = 16  # prompts in one /v1/completions request


class ApiError(Exception):
    """A request the server refuses: becomes {"error": {...}} with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def _error(status: int, message: str, param: str | None = None, code: str | None = None):
    return JSONResponse({"error": {"message": message, "type": _ERROR_TYPES.get(status, "error"),
                                   "param": param, "code": code}}, status_code=status)


# -- generation ---------------------------------------------------------------------------------


Requests = Sequence[tuple[list[int], list[decoding.Sampling]]]


def generate(decoder: decoding.Decoder,
             requests: Requests) -> Iterator[list[list[decoding.Completion]]]:
    """The server's generation path for one device batch.

    Each request is (prompt token ids, one Sampling per choice); yields, after every decode
    step, each request's completions so far (the last yield is final). This is the one place
    to change how replies are made: e.g. best-of-N decodes N rows per choice here, scores them
    with a reward model on the last step and yields the best; pass the new function to
    `create_app(generate=...)`. The queue fills batches up to the decoder's max_batch choices,
    so such a function decodes N times as many rows: in chunks, or from a larger decoder.
    """
    prompts = [prompt for prompt, samplings in requests for _ in samplings]
    samplings = [s for _, request_samplings in requests for s in request_samplings]
    for step in decoder.stream(prompts, samplings):
        out, start = [], 0
        for _, request_samplings in requests:
            out.append(step[start:start + len(request_samplings)])
            start += len(request_samplings)
        yield out


# -- the batching queue -------------------------------------------------------------------------


class _Job(engine_lib.Request):
    """One request's rows (n choices of one prompt), and how its results reach its handler:
    ("step", completions so far), then ("done", engine.Result) or ("error", message)."""

    def __init__(self, prompt: list[int], samplings: list[decoding.Sampling], stream: bool,
                 prompt_logprobs: int | None = None):
        super().__init__(prompt, samplings, prompt_logprobs=prompt_logprobs, steps=stream)
        self.stream = stream
        self.rows = len(samplings)
        self.max_new = max(s.max_new_tokens for s in samplings)
        self.loop = asyncio.get_running_loop()
        self.events: asyncio.Queue = asyncio.Queue()

    def post(self, kind: str, payload: Any) -> None:
        """From the worker thread to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
        except RuntimeError:  # the loop is closed: the server is shutting down
            pass


class Batcher:
    """Static batching (--batching=static, and the path of a replaced `generate`): gathers
    waiting requests into device batches; one worker thread decodes each batch to its end."""

    state = "ready"  # compiles as shapes come

    def __init__(self, decoder: decoding.Decoder, *, wait_s: float = 0.005, max_queue: int = 256,
                 generate: Callable[[decoding.Decoder, Requests], Iterator] = generate):
        self.decoder, self.wait_s, self.max_queue = decoder, wait_s, max_queue
        self.generate = generate
        self._queue: queue.Queue = queue.Queue()
        self._held: collections.deque = collections.deque()  # taken but did not fit a batch
        self._lock = threading.Lock()
        self._waiting = 0
        self._closing = False
        self.stats = collections.Counter(batches=0, requests=0, rows=0, largest_batch=0)
        self._thread = threading.Thread(target=self._run, name="decode-batcher", daemon=True)
        self._thread.start()

    def submit(self, job: _Job) -> None:
        with self._lock:
            if self._waiting >= self.max_queue:
                raise ApiError(503, f"the server has {self._waiting} requests waiting (limit "
                               "--max_queue); retry shortly.", code="server_busy")
            self._waiting += 1
        self._queue.put(job)

    def close(self, timeout: float = 10.0) -> None:
        self._queue.put(None)
        self._thread.join(timeout)

    @property
    def queued(self) -> int:
        return self._waiting - self.busy_requests

    busy = busy_requests = 0  # rows / requests of the batch decoding now

    def _fits(self, batch: list[_Job], job: _Job) -> bool:
        jobs = batch + [job]
        rows = sum(j.rows for j in jobs)
        # One batch shares one cache: its longest prompt plus its longest reply must fit.
        return (rows <= self.decoder.max_batch and max(len(j.prompt) for j in jobs)
                + max(j.max_new for j in jobs) <= self.decoder.max_len)

    def _next_batch(self) -> list[_Job] | None:
        first = self._held.popleft() if self._held else self._queue.get()
        if first is None:
            return None
        batch, skipped = [first], []
        deadline = time.monotonic() + self.wait_s
        while sum(j.rows for j in batch) < self.decoder.max_batch:
            if self._held:
                job = self._held.popleft()
            else:
                try:
                    job = self._queue.get(timeout=max(deadline - time.monotonic(), 1e-4))
                except queue.Empty:
                    break
            if job is None:
                self._closing = True
                break
            (batch if self._fits(batch, job) else skipped).append(job)
        self._held.extendleft(reversed(skipped))  # they open the next batch, in arrival order
        return batch

    def _run(self) -> None:
        while not (self._closing and not self._held):
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._decode(batch)
            finally:
                with self._lock:
                    self._waiting -= len(batch)

    def _decode(self, batch: list[_Job]) -> None:
        rows = sum(j.rows for j in batch)
        self.stats.update(batches=1, requests=len(batch), rows=rows)
        self.stats["largest_batch"] = max(self.stats["largest_batch"], rows)
        self.busy, self.busy_requests = rows, len(batch)
        try:
            last = None
            for last in self.generate(self.decoder, [(j.prompt, j.samplings) for j in batch]):
                for j, mine in zip(batch, last):
                    if j.stream:
                        j.post("step", mine)
        except Exception:  # noqa: BLE001 - logged here, a plain message to each client
            logging.exception("decoding a batch of %d rows failed", rows)
            for j in batch:
                j.post("error", "generation failed on the server; see its log.")
            return
        finally:
            self.busy = self.busy_requests = 0
        for j, mine in zip(batch, last):
            j.post("done", engine_lib.Result(mine))


# -- request parsing ----------------------------------------------------------------------------


class _NonFinite:
    """A NaN or infinite number in a body (json accepts NaN/Infinity and 1e999): refused with
    the field's name once the body is parsed."""

    def __init__(self, text: str):
        self.text = text


def _finite_float(text: str):
    value = float(text)
    return value if math.isfinite(value) else _NonFinite(text)


def _checked(value, path: str = "") -> None:
    """400 for a non-finite number or a string that is not valid Unicode (a lone surrogate,
    which JSON's \\ud800 escapes can carry), naming where it is."""
    if isinstance(value, _NonFinite):
        raise ApiError(400, f"'{path}' is {value.text}: numbers must be finite.", param=path)
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ApiError(400, f"'{path or 'body'}' is not valid Unicode (a lone surrogate at "
                           f"character {e.start}); send UTF-8 text.", param=path or None,
                           code="invalid_unicode") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _checked(key, path)
            _checked(item, f"{path}.{key}" if path else str(key))
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _checked(item, f"{path}[{i}]")


def parse_json(data: bytes) -> dict:
    try:
        body = json.loads(data, parse_float=_finite_float, parse_constant=_NonFinite)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ApiError(400, f"the request body is not valid JSON ({e}).",
                       code="malformed_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    try:
        _checked(body)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply.",
                       code="malformed_json") from None
    return body


async def _read_json(request: Request, limit: int, timeout_s: float = 10.0) -> dict:
    """The body as a JSON object: 413 past `limit` bytes, 408 when it stops arriving for
    `timeout_s` (a Content-Length larger than what is sent), 400 when the client ends it
    early or it is not valid JSON. Large bodies are parsed off the event loop."""
    too_large = ("the request body is {} bytes; this server takes at most "
                 f"{limit} (--max_request_bytes).")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "the Content-Length header is not a number.")
        if int(declared) > limit:
            raise ApiError(413, too_large.format(declared), code="request_too_large")
    data, size = [], 0
    chunks = request.stream()
    while True:
        try:
            chunk = await asyncio.wait_for(chunks.__anext__(), timeout_s)
        except StopAsyncIteration:
            break
        except asyncio.TimeoutError:
            of = f" of the {declared} its Content-Length announced" if declared else ""
            raise ApiError(408, f"the request body stopped arriving: {size} bytes{of} came, "
                           f"then nothing for {timeout_s:g} s.", code="request_timeout") from None
        except ClientDisconnect:
            raise ApiError(400, f"the request body ended after {size} bytes, before its "
                           "Content-Length.", code="incomplete_body") from None
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_large.format(f"more than {limit}"), code="request_too_large")
        data.append(chunk)
    data = b"".join(data)
    if len(data) < 65536:
        return parse_json(data)
    return await run_in_threadpool(parse_json, data)


# OpenAI parameters this server does not implement: refused by name, never ignored (the values
# in _HARMLESS ask for what the server does anyway).
_UNSUPPORTED = {
    "tools": "tool calling", "tool_choice": "tool calling", "parallel_tool_calls": "tool calling",
    "functions": "function calling", "function_call": "function calling",
    "response_format": "output formats other than text", "audio": "audio output",
    "modalities": "output other than text", "prediction": "predicted outputs",
    "web_search_options": "web search", "reasoning_effort": "reasoning settings",
    "verbosity": "verbosity settings", "metadata": "stored-completion metadata",
    "service_tier": "service tiers", "best_of": "server-side best-of (use --best_of)",
    "suffix": "insertion (suffix)"}
_HARMLESS = {("response_format", '{"type": "text"}'), ("modalities", '["text"]'),
             ("tool_choice", '"none"'), ("service_tier", '"auto"'),
             ("service_tier", '"default"'), ("best_of", "1")}
_COMMON_PARAMS = {"model", "temperature", "top_p", "top_k", "n", "max_tokens", "seed", "stop",
                  "logit_bias", "stream", "stream_options", "presence_penalty",
                  "frequency_penalty", "logprobs", "user", "store"}
_CHAT_PARAMS = _COMMON_PARAMS | {
    "messages", "max_completion_tokens", "top_logprobs",
    # extensions (the web page's): the conversation, the reply regenerated or continued
    "conversation_id", "regenerate_of", "regenerate_of_index", "parent_id", "parent_index"}
_COMPLETION_PARAMS = _COMMON_PARAMS | {"prompt", "echo"}


def _refuse_unknown(body: dict, known: set[str]) -> None:
    for name, value in body.items():
        if value is None or (name, json.dumps(value)) in _HARMLESS:
            continue
        if name in _UNSUPPORTED:
            raise ApiError(400, f"'{name}' is not supported: this server has no "
                           f"{_UNSUPPORTED[name]}; leave it out.", param=name,
                           code="unsupported_parameter")
        if name not in known:
            raise ApiError(400, f"unrecognized request argument '{name}'.", param=name,
                           code="unknown_parameter")


def _number(body: dict, name: str, default, lo, hi, *, integer: bool = False,
            lo_open: bool = False, limit_flag: str | None = None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int if integer else (int, float)):
        raise ApiError(400, f"'{name}' must be {'an integer' if integer else 'a number'}, not "
                       f"{json.dumps(value)[:40]}.", param=name)
    if limit_flag and value > hi:
        raise ApiError(400, f"'{name}' is {value}; this server allows at most {hi} "
                       f"({limit_flag}).", param=name, code="over_limit")
    if value < lo or (lo_open and value == lo) or value > hi:
        low = f"above {lo}" if lo_open else f"at least {lo}"
        raise ApiError(400, f"'{name}' is {value}; it must be {low} and at most {hi}.",
                       param=name)
    return value


def _string(body: dict, name: str, *, pattern: re.Pattern | None = None) -> str | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or (pattern is not None and not pattern.match(value)):
        what = "a string" if pattern is None else "an id of letters, digits and _.:- (1-64)"
        raise ApiError(400, f"'{name}' must be {what}.", param=name)
    return value


def _messages(body: dict, limits: Limits) -> list[dict]:
    """OpenAI messages -> the chat template's {"role", "content"} (text parts joined)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list of {role, content} objects.",
                       param="messages")
    if len(messages) > limits.max_messages:
        raise ApiError(400, f"'messages' has {len(messages)} messages; this server takes at "
                       f"most {limits.max_messages} (--max_messages).", param="messages",
                       code="over_limit")
    out = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, dict) else None
        if role not in _ROLES:
            raise ApiError(400, f"messages[{i}].role is {json.dumps(role)}; use system, "
                           "user or assistant.", param=f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):  # content parts: only text is understood
            if not all(isinstance(p, dict) and p.get("type") == "text"
                       and isinstance(p.get("text"), str) for p in content):
                raise ApiError(400, f"messages[{i}].content has a part that is not "
                               "{\"type\": \"text\", \"text\": ...}; only text is supported.",
                               param=f"messages[{i}].content")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string.",
                           param=f"messages[{i}].content")
        out.append({"role": _ROLES[role], "content": content})
    if out[-1]["role"] != "user":
        raise ApiError(400, "the last message must be the user's turn (role 'user').",
                       param="messages")
    try:
        chat_template.check(out)
    except chat_template.TemplateError as e:
        raise ApiError(400, f"messages: {e}.", param="messages") from None
    return out


def _stops(body: dict, limits: Limits) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of them.", param="stop")
    if len(stop) > limits.max_stop:
        raise ApiError(400, f"'stop' has {len(stop)} strings; at most {limits.max_stop}.",
                       param="stop", code="over_limit")
    return tuple(stop)


def _logit_bias(body: dict, vocab: int) -> tuple[tuple[int, float], ...]:
    bias = body.get("logit_bias")
    if bias is None:
        return ()
    if not isinstance(bias, dict):
        raise ApiError(400, "'logit_bias' must map token ids to numbers.", param="logit_bias")
    out = []
    for key, value in bias.items():
        if not str(key).isdigit() or int(key) >= vocab or isinstance(value, bool) \
                or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise ApiError(400, f"logit_bias[{key!r}]: keys are token ids below {vocab}, "
                           "values numbers in [-100, 100].", param="logit_bias")
        out.append((int(key), float("-inf") if value <= -100 else float(value)))
    return tuple(out)


@dataclasses.dataclass
class _Settings:
    """The sampling fields chat and text completions share."""
    temperature: float
    top_p: float
    top_k: int
    n: int
    seed: int
    stops: tuple[str, ...]
    bias: tuple[tuple[int, float], ...]
    presence: float
    frequency: float
    stream: bool
    include_usage: bool

    def samplings(self, max_tokens: int, logprobs: int = -1,
                  stop_tokens: tuple[int, ...] = ()) -> list[decoding.Sampling]:
        return [decoding.Sampling(
            max_new_tokens=max_tokens, temperature=self.temperature, top_k=self.top_k,
            top_p=self.top_p, seed=(self.seed + i) % 2 ** 31, stop_tokens=stop_tokens,
            stop_strings=self.stops, logit_bias=self.bias, presence_penalty=self.presence,
            frequency_penalty=self.frequency, logprobs=logprobs) for i in range(self.n)]

    def record(self, max_tokens: int) -> dict:
        return {"temperature": self.temperature, "top_p": self.top_p, "top_k": self.top_k,
                "max_tokens": max_tokens, "stop": list(self.stops), "n": self.n,
                "seed": self.seed, "presence_penalty": self.presence,
                "frequency_penalty": self.frequency,
                "logit_bias": {str(t): (-100 if v == float("-inf") else v)
                               for t, v in self.bias}}


def _settings(body: dict, limits: Limits, tokenizer, max_batch: int,
              default_temperature: float) -> _Settings:
    _string(body, "model")
    _string(body, "user")
    temperature = float(_number(body, "temperature", default_temperature, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True))
    top_k = _number(body, "top_k", 0, 0, tokenizer.vocab_size, integer=True)
    n_limit = min(limits.max_n, max_batch)
    n = _number(body, "n", 1, 1, n_limit, integer=True, limit_flag="--max_n")
    seed = _number(body, "seed", None, -2 ** 63, 2 ** 63 - 1, integer=True)
    # Without a seed every request samples differently; the seed used is stored, so any
    # stored response can be reproduced.
    seed = (secrets.randbelow(2 ** 31) if seed is None else seed) % 2 ** 31
    presence = float(_number(body, "presence_penalty", 0.0, -2.0, 2.0))
    frequency = float(_number(body, "frequency_penalty", 0.0, -2.0, 2.0))
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage"}:
        raise ApiError(400, "'stream_options' must be an object with at most include_usage.",
                       param="stream_options")
    if body.get("store") not in (None, True, False):
        raise ApiError(400, "'store' must be true or false.", param="store")
    return _Settings(temperature, top_p, top_k, n, seed, _stops(body, limits),
                     _logit_bias(body, tokenizer.vocab_size), presence, frequency, stream,
                     bool(options.get("include_usage")))


@dataclasses.dataclass
class _Chat:
    messages: list[dict]
    prompt: list[int]
    samplings: list[decoding.Sampling]
    record: dict  # the sampling settings stored with the response
    stream: bool
    include_usage: bool
    conversation_id: str | None
    regenerate_of: tuple[str, int] | None
    logprobs: bool = False


def _parse_chat(body: dict, limits: Limits, tokenizer, context: int, max_batch: int,
                default_temperature: float) -> _Chat:
    """Checks a chat request and tokenizes its conversation (in a worker thread: a long
    conversation takes a while)."""
    _refuse_unknown(body, _CHAT_PARAMS)
    messages = _messages(body, limits)
    settings = _settings(body, limits, tokenizer, max_batch, default_temperature)
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, name, None, 1, limits.max_tokens_limit, integer=True,
                         limit_flag="--max_tokens_limit")
    logprobs = body.get("logprobs") or False
    if not isinstance(logprobs, bool):
        raise ApiError(400, "'logprobs' must be true or false.", param="logprobs")
    top_logprobs = _number(body, "top_logprobs", None, 0, decoding.TOP_LOGPROBS, integer=True)
    if top_logprobs is not None and not logprobs:
        raise ApiError(400, "'top_logprobs' needs 'logprobs': true.", param="top_logprobs")
    conversation_id = _string(body, "conversation_id", pattern=_ID_RE)
    regen = _string(body, "regenerate_of", pattern=_ID_RE)
    regen_index = _number(body, "regenerate_of_index", 0, 0, 1 << 20, integer=True)

    prompt = chat_template.prompt(tokenizer, messages)
    room = context - len(prompt)
    if room < 1 or (max_tokens is not None and max_tokens > room):
        asked = f" and max_tokens is {max_tokens}" if max_tokens is not None else ""
        raise ApiError(400, f"the conversation is {len(prompt)} tokens{asked}: more than the "
                       f"model's context of {context} tokens; shorten the conversation or "
                       "lower max_tokens.", param="messages", code="context_length_exceeded")
    if max_tokens is None:
        max_tokens = min(limits.max_tokens_limit, room)
    # The reply ends at <|end|>; any other marker would start a turn the model must not write.
    stop_tokens = chat_template.reply_stop_ids(tokenizer)
    samplings = settings.samplings(max_tokens, (top_logprobs or 0) if logprobs else -1,
                                   stop_tokens)
    return _Chat(messages, prompt, samplings, settings.record(max_tokens), settings.stream,
                 settings.include_usage, conversation_id,
                 (regen, regen_index) if regen else None, logprobs)


@dataclasses.dataclass
class _TextCompletion:
    prompts: list[list[int]]
    samplings: list[decoding.Sampling]  # one per choice, the same for every prompt
    echo: bool
    logprobs: int | None  # alternatives per token (0-5), or None: no log-probabilities
    stream: bool
    include_usage: bool


def _prompts(body: dict, limits: Limits, tokenizer) -> list[list[int]]:
    """`prompt`: a text, a list of texts, token ids, or a list of token id lists. A text is
    continued as it is, after bos (as `sample` does); token ids are taken as they are."""
    prompt = body.get("prompt")
    vocab = tokenizer.vocab_size

    def ids(x) -> bool:
        return isinstance(x, list) and bool(x) and all(
            isinstance(t, int) and not isinstance(t, bool) for t in x)

    if isinstance(prompt, str):
        prompts = [prompt]
    elif ids(prompt):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) or ids(p)
                                                     for p in prompt):
        prompts = prompt
    else:
        raise ApiError(400, "'prompt' must be a string, a list of strings, a list of token ids "
                       "or a list of such lists (none empty).", param="prompt")
    if len(prompts) > limits.max_prompts:
        raise ApiError(400, f"'prompt' has {len(prompts)} prompts; this server takes at most "
                       f"{limits.max_prompts} per request.", param="prompt", code="over_limit")
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str):
            out.append([tokenizer.bos_id, *tokenizer.encode(p)])
        elif min(p) < 0 or max(p) >= vocab:
            raise ApiError(400, f"prompt[{i}] has a token id outside 0..{vocab - 1}.",
                           param="prompt")
        else:
            out.append(list(p))
    return out


def _parse_completion(body: dict, limits: Limits, tokenizer, context: int, max_batch: int,
                      default_temperature: float) -> _TextCompletion:
    _refuse_unknown(body, _COMPLETION_PARAMS)
    prompts = _prompts(body, limits, tokenizer)
    settings = _settings(body, limits, tokenizer, max_batch, default_temperature)
    max_tokens = _number(body, "max_tokens", 16, 0, limits.max_tokens_limit, integer=True,
                         limit_flag="--max_tokens_limit")
    echo = body.get("echo") or False
    if not isinstance(echo, bool):
        raise ApiError(400, "'echo' must be true or false.", param="echo")
    logprobs = _number(body, "logprobs", None, 0, decoding.PROMPT_TOP_LOGPROBS, integer=True)
    longest = max(len(p) for p in prompts)
    if longest + max_tokens > context:
        raise ApiError(400, f"a prompt is {longest} tokens and max_tokens is {max_tokens}: "
                       f"more than the model's context of {context} tokens.", param="prompt",
                       code="context_length_exceeded")
    samplings = settings.samplings(max_tokens, -1 if logprobs is None else logprobs)
    return _TextCompletion(prompts, samplings, echo, logprobs, settings.stream,
                           settings.include_usage)


def _visible(text: str, stops: tuple[str, ...]) -> str:
    """What a stream may send now: a tail that could begin a stop string waits for more."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[:len(text) - hold]


# -- answers ------------------------------------------------------------------------------------


class _TokenText:
    """Each token's bytes and text as the logprobs fields show them (OpenAI: `token`, `bytes`)."""

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}

    def __call__(self, token: int) -> tuple[str, list[int]]:
        if token not in self._cache:
            raw = self._bytes(token)
            self._cache[token] = (raw.decode("utf-8", errors="backslashreplace"), list(raw))
        return self._cache[token]

    def _bytes(self, token: int) -> bytes:
        tok = self.tok
        if hasattr(tok, "id_to_bytes"):  # a backend that knows its tokens' bytes
            return tok.id_to_bytes(token)
        sp = getattr(tok, "sp", None)
        if sp is None:
            return tok.decode([token]).encode("utf-8")
        if token in (tok.bos_id, tok.eos_id, tok.pad_id):
            return b""
        if sp.is_byte(token):  # byte fallback: "<0xE2>"
            return bytes([int(sp.id_to_piece(token)[3:-1], 16)])
        return sp.id_to_piece(token).replace("\u2581", " ").encode("utf-8")


def _logprob(value: float) -> float:
    """JSON has no -inf: a token the distribution excluded shows OpenAI's floor, -9999."""
    return max(float(value), -9999.0)


def _chat_logprobs(text_of: _TokenText, c: decoding.Completion, start: int = 0,
                   end: int | None = None) -> dict | None:
    """The chat API's choice.logprobs for tokens [start, end) of a completion."""
    if c.logprobs is None:
        return None

    def entry(token, lp):
        text, raw = text_of(token)
        return {"token": text, "logprob": _logprob(lp), "bytes": raw}

    return {"content": [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
                        for t, lp, top in zip(c.tokens[start:end], c.logprobs[start:end],
                                              c.top_logprobs[start:end])],
            "refusal": None}


def _text_logprobs(text_of: _TokenText, tokens: list[int], logprobs: list, top: list,
                   offset: int = 0) -> dict:
    """The completions API's choice.logprobs: tokens, token_logprobs, top_logprobs (one
    {token: logprob} per token) and text_offset."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, lp, alternatives in zip(tokens, logprobs, top):
        text = text_of(token)[0]
        out["tokens"].append(text)
        out["token_logprobs"].append(None if lp is None else _logprob(lp))
        out["top_logprobs"].append(None if alternatives is None else {
            text_of(i)[0]: _logprob(v) for i, v in alternatives})
        out["text_offset"].append(offset)
        offset += len(text)
    return out


class _Guard:
    """Counts every response by route and status (/metrics), and answers an exception that
    escapes a route with a JSON 500 without closing the connection: Starlette's own error
    handler re-raises, and uvicorn then drops the connection, which a client's connection pool
    sees as ECONNRESET on its next request."""

    ROUTES = ("/v1/chat/completions", "/v1/completions", "/v1/feedback", "/v1/models",
              "/v1/conversations", "/health", "/metrics")

    def __init__(self, app, metrics: metrics_lib.ServerMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [None]

        async def sent(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sent)
        except ClientDisconnect:  # the client left; nobody to answer
            status[0] = status[0] or 499
        except Exception:  # noqa: BLE001 - logged with its traceback; the client gets none
            logging.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
            if status[0] is None:
                await _error(500, "internal server error; the details are in the server log."
                             )(scope, receive, sent)
        finally:
            path = scope.get("path", "")
            route = next((r for r in self.ROUTES if path.startswith(r)),
                         "/" if path == "/" else "other")
            self.metrics.requests.labels(route, str(status[0] or 500)).inc()


async def _outcome(job: _Job, request: Request) -> engine_lib.Result:
    """A request's result; if its client leaves first, its rows are freed."""
    while True:
        try:
            kind, payload = await asyncio.wait_for(job.events.get(), 1.0)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                job.cancelled = True
                raise ClientDisconnect() from None
            continue
        if kind == "error":
            raise ApiError(500, payload)
        if kind == "done":
            return payload


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


def _submit(scheduler, job: _Job) -> None:
    try:
        scheduler.submit(job)
    except engine_lib.QueueFull as e:
        raise ApiError(503, f"the server has {e.args[0]} requests waiting (limit --max_queue); "
                       "retry shortly.", code="server_busy") from None


# -- the app ------------------------------------------------------------------------------------


def create_app(run, *, db_path: str, api_key: str | None = None, limits: Limits = Limits(),
               model_name: str = "t5x_like", max_batch: int = 16, batch_wait_s: float = 0.005,
               max_len: int | None = None, default_temperature: float = 0.7,
               generate: Callable[[decoding.Decoder, Requests], Iterator] | None = None,
               policy: security.Policy = security.Policy(), batching: str = "continuous",
               prefill_chunk: int = 256) -> FastAPI:
    """The FastAPI app serving `run` (from `runs.load`); its decode worker starts now.

    `policy` says which hosts and origins may drive it (t5x_like/serving/security.py).

    batching="continuous": the engine (t5x_like/serving/engine.py) compiles every program in
    its thread now (/health says "warming", then "ready"; requests wait meanwhile) and keeps
    `max_batch` rows decoding, requests joining and leaving between steps. "static": batches
    formed once and decoded to their end (the Batcher), which a replaced `generate` (one
    device batch's replies, see `generate` above; e.g. best-of-N) always uses.
    Tests drive it with `fastapi.testclient.TestClient(app)` or a uvicorn server in a thread.
    """
    if batching not in ("continuous", "static"):
        raise UserError(f"--batching={batching!r}: use continuous or static.")
    decoder = decoding.Decoder.from_run(run, max_batch=max_batch, max_len=max_len)
    store = feedback.Store(db_path)
    metrics = metrics_lib.ServerMetrics(slots=max_batch)
    if batching == "static" or generate is not None:
        scheduler = Batcher(decoder, wait_s=batch_wait_s, max_queue=limits.max_queue,
                            **({"generate": generate} if generate else {}))
    else:
        scheduler = engine_lib.Engine(decoder, prefill_chunk=prefill_chunk,
                                      max_queue=limits.max_queue, observer=metrics).start()
    metrics.attach(scheduler)
    engine = scheduler if isinstance(scheduler, engine_lib.Engine) else None
    tokenizer = run.tokenizer
    text_of = _TokenText(tokenizer)
    fingerprint = f"{model_name}-step-{run.step}"
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        scheduler.close()
        store.close()

    app = FastAPI(title="t5x_like", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.store, app.state.scheduler, app.state.decoder = store, scheduler, decoder
    app.state.metrics = metrics
    app.add_middleware(security.Middleware, policy=policy)  # webchat: Host, Origin, JSON only
    retries = history.Retries(store)  # webchat: Idempotency-Key

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        response = _error(e.status, e.message, e.param, e.code)
        if e.status == 408:  # the rest of that body may still come: this connection is done
            response.headers["Connection"] = "close"
        return response

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return _error(400, "the request does not match this route's parameters.")

    app.add_middleware(_Guard, metrics=metrics)  # 500s that keep the connection; counts

    def authorize(request: Request) -> None:
        if not api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(),
                                                                 api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>' "
                           "with the key the server was started with.", code="invalid_api_key")

    @app.get("/health")
    async def health():
        """"ready" (200) once every program is compiled; "warming" or "failed" (503) before."""
        state = scheduler.state
        body = {"status": state, "model": model_name, "step": run.step,
                "context": decoder.max_len, "max_batch": decoder.max_batch,
                "batching": "continuous" if engine else "static",
                "queued": scheduler.queued, "busy": scheduler.busy,
                "compilations_since_ready": metrics.compilations_since_ready(),
                **dict(scheduler.stats)}
        return JSONResponse(body, status_code=200 if state == "ready" else 503)

    @app.get("/metrics")
    async def prometheus_metrics():
        data, content_type = metrics.exposition()
        return Response(data, media_type=content_type)

    security.add_page_routes(app)  # webchat: / and /vendor/ with the page's CSP
    history.add_routes(app, store, authorize)  # webchat: /v1/conversations

    def model_card():
        return {"id": model_name, "object": "model", "created": started, "owned_by": "t5x_like"}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model}")
    async def model_info(model: str, request: Request):
        authorize(request)
        if model != model_name:
            raise ApiError(404, f"no model {model!r}; this server serves {model_name!r}.",
                           param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        authorize(request)
        body = await _read_json(request, limits.max_request_bytes, limits.body_timeout_s)
        chat = await run_in_threadpool(_parse_chat, body, limits, tokenizer, decoder.max_len,
                                       decoder.max_batch, default_temperature)
        # webchat: only ids this server issued; a retry with its Idempotency-Key is answered
        # from the database.
        await history.check_conversation(store, chat.conversation_id)
        parent = await history.check_parent(store, chat.conversation_id, body)
        attempt = await retries.begin(request, body)
        if attempt.replay is not None:
            return history.replayed_completion(attempt.replay, stream=chat.stream,
                                               include_usage=chat.include_usage)
        try:
            response = await _complete(request, chat, attempt, parent)
        except BaseException:
            attempt.end()
            raise
        if not chat.stream:  # a stream ends its attempt when it ends
            attempt.end()
        return response

    async def _complete(request: Request, chat: _Chat, attempt: history.Attempt,
                        parent: tuple | None):
        conversation_id = chat.conversation_id
        if chat.regenerate_of is not None:
            try:
                original = await run_in_threadpool(store.response, *chat.regenerate_of)
            except feedback.UnknownResponse as e:
                raise ApiError(404, str(e), param="regenerate_of") from None
            if original["prompt"] != chat.messages:
                raise ApiError(400, f"regenerate_of: the messages differ from those response "
                               f"{chat.regenerate_of[0]!r} answered; send the same "
                               "conversation to regenerate it.", param="messages")
            if conversation_id not in (None, original["conversation_id"]):
                raise ApiError(400, "conversation_id differs from the regenerated response's.",
                               param="conversation_id")
            conversation_id = original["conversation_id"]
        conversation_id = conversation_id or await run_in_threadpool(history.new_conversation,
                                                                     store)
        response_id = f"chatcmpl-{secrets.token_hex(12)}"
        created = int(time.time())

        def finish(completions: list[decoding.Completion]) -> list[dict]:
            """In a worker thread: store the choices before the client hears of them."""
            choices = [{"content": c.text, "finish_reason": _FINISH.get(c.finish_reason, "stop"),
                        "completion_tokens": len(c.tokens)} for c in completions]
            store.add_responses(response_id=response_id, conversation_id=conversation_id,
                                prompt=chat.messages, choices=choices, model=model_name,
                                model_step=run.step, sampling=chat.record,
                                prompt_tokens=len(chat.prompt), regenerates=chat.regenerate_of,
                                idempotency_key=attempt.key, body_hash=attempt.body_hash,
                                parent=parent)
            return choices

        async def stored(result: engine_lib.Result) -> list[dict]:
            try:
                return await run_in_threadpool(finish, result.completions)
            except Exception:  # noqa: BLE001 - logged; the client hears only that it failed
                logging.exception("storing a response failed")
                raise ApiError(500, "the response could not be stored; see the server log.")

        job = _Job(chat.prompt, chat.samplings, chat.stream)
        _submit(scheduler, job)
        head = {"id": response_id, "created": created, "model": model_name,
                "system_fingerprint": fingerprint, "conversation_id": conversation_id}

        def usage(choices):
            completion = sum(c["completion_tokens"] for c in choices)
            return {"prompt_tokens": len(chat.prompt), "completion_tokens": completion,
                    "total_tokens": len(chat.prompt) + completion}

        if not chat.stream:
            result = await _outcome(job, request)
            choices = await stored(result)
            return {**head, "object": "chat.completion", "usage": usage(choices), "choices": [
                {"index": i, "message": {"role": "assistant", "content": c["content"]},
                 "logprobs": _chat_logprobs(text_of, done), "finish_reason": c["finish_reason"]}
                for i, (c, done) in enumerate(zip(choices, result.completions))]}

        stops = chat.samplings[0].stop_strings

        def event(choices: list[dict], **extra) -> str:
            chunk = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        def delta(i: int, content: str | None = None, finish_reason=None, logprobs=None,
                  **more) -> dict:
            d = {**more, **({"content": content} if content is not None else {})}
            return {"index": i, "delta": d, "logprobs": logprobs, "finish_reason": finish_reason}

        async def events():
            try:
                async for chunk in _events():
                    yield chunk
            finally:  # also when the client leaves mid-stream: its rows are freed
                job.cancelled = True
                attempt.end()

        async def _events():
            sent = [""] * len(chat.samplings)
            told = [0] * len(chat.samplings)  # tokens whose logprobs were sent

            def news(i, c: decoding.Completion):
                lp = _chat_logprobs(text_of, c, told[i]) if chat.logprobs else None
                told[i] = len(c.tokens)
                return lp

            yield event([delta(i, "", role="assistant") for i in range(len(sent))])
            while True:
                kind, payload = await job.events.get()
                if kind == "error":
                    error = {"message": payload, "type": "server_error", "param": None,
                             "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                if kind == "step":
                    for i, c in enumerate(payload):
                        text = _visible(c.text, stops)
                        if len(text) > len(sent[i]) and text.startswith(sent[i]):
                            yield event([delta(i, text[len(sent[i]):], logprobs=news(i, c))])
                            sent[i] = text
                    continue
                try:
                    choices = await stored(payload)
                except ApiError as e:
                    error = {"message": e.message, "type": "server_error", "param": None,
                             "code": None}
                    yield f"data: {json.dumps({'error': error})}\n\n"
                    return
                for i, (c, done) in enumerate(zip(choices, payload.completions)):
                    final = c["content"]  # what is left, then why it ended
                    rest = final[len(sent[i]):] if final.startswith(sent[i]) else ""
                    lp = news(i, done)
                    if rest or (lp and lp["content"]):
                        yield event([delta(i, rest, logprobs=lp)])
                    yield event([delta(i, finish_reason=c["finish_reason"])])
                if chat.include_usage:
                    yield event([], usage=usage(choices))
                yield "data: [DONE]\n\n"
                return

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def text_completions(request: Request):
        """Text continued as is (no chat template), with the prompt's log-probabilities when
        asked (`echo` + `logprobs`, `max_tokens` 0): what evaluation harnesses score with.
        Not stored in the feedback database (there is no conversation to rate)."""
        authorize(request)
        body = await _read_json(request, limits.max_request_bytes, limits.body_timeout_s)
        req = await run_in_threadpool(_parse_completion, body, limits, tokenizer,
                                      decoder.max_len, decoder.max_batch, default_temperature)
        prompt_lp = req.logprobs if req.echo and req.logprobs is not None else None
        if engine is None and (prompt_lp is not None or req.samplings[0].max_new_tokens == 0):
            raise ApiError(400, "echo with logprobs and max_tokens 0 need the continuous "
                           "batching engine (--batching=continuous).", param="echo")
        jobs = [_Job(p, req.samplings, req.stream, prompt_logprobs=prompt_lp)
                for p in req.prompts]
        try:
            for job in jobs:
                _submit(scheduler, job)
        except ApiError:
            for job in jobs:
                job.cancelled = True
            raise
        n = len(req.samplings)
        head = {"id": f"cmpl-{secrets.token_hex(12)}", "object": "text_completion",
                "created": int(time.time()), "model": model_name,
                "system_fingerprint": fingerprint}
        prompt_texts = [tokenizer.decode(p) for p in req.prompts] if req.echo else None

        def choice(k: int, result: engine_lib.Result, j: int) -> dict:
            c = result.completions[j]
            prompt = req.prompts[k]
            text = (prompt_texts[k] if req.echo else "") + c.text
            logprobs = None
            if req.logprobs is not None:
                tokens, lps, top = list(c.tokens), list(c.logprobs), list(c.top_logprobs)
                if req.echo:
                    tokens = prompt + tokens
                    lps = result.prompt_logprobs + lps
                    top = [None if t is None else t[:req.logprobs]
                           for t in result.prompt_top_logprobs] + top
                logprobs = _text_logprobs(text_of, tokens, lps, top)
            reason = _FINISH.get(c.finish_reason, "stop")
            return {"index": k * n + j, "text": text, "logprobs": logprobs,
                    "finish_reason": reason}

        def usage(results):
            prompt = sum(len(p) * n for p in req.prompts)
            completion = sum(len(c.tokens) for r in results for c in r.completions)
            return {"prompt_tokens": prompt, "completion_tokens": completion,
                    "total_tokens": prompt + completion}

        if not req.stream:
            results = []
            try:
                for job in jobs:
                    results.append(await _outcome(job, request))
            finally:
                for job in jobs:
                    job.cancelled = True  # a finished one ignores it; the others leave
            return {**head, "choices": [choice(k, r, j) for k, r in enumerate(results)
                                        for j in range(n)], "usage": usage(results)}

        async def events():
            queue_ = asyncio.Queue()

            async def forward(k, job):
                while True:
                    kind, payload = await job.events.get()
                    await queue_.put((k, kind, payload))
                    if kind in ("done", "error"):
                        return

            tasks = [asyncio.create_task(forward(k, job)) for k, job in enumerate(jobs)]
            sent = {(k, j): 0 for k in range(len(jobs)) for j in range(n)}
            results, left = [None] * len(jobs), len(jobs)
            try:
                if req.echo:
                    for k in range(len(jobs)):
                        for j in range(n):
                            yield _sse({**head, "choices": [{
                                "index": k * n + j, "text": prompt_texts[k], "logprobs": None,
                                "finish_reason": None}]})
                while left:
                    k, kind, payload = await queue_.get()
                    if kind == "error":
                        error = {"message": payload, "type": "server_error", "param": None,
                                 "code": None}
                        yield _sse({"error": error})
                        return
                    completions = payload if kind == "step" else payload.completions
                    for j, c in enumerate(completions):
                        text = _visible(c.text, req.samplings[j].stop_strings) \
                            if kind == "step" else c.text
                        if len(text) > sent[k, j]:
                            yield _sse({**head, "choices": [{
                                "index": k * n + j, "text": text[sent[k, j]:],
                                "logprobs": None, "finish_reason": None}]})
                            sent[k, j] = len(text)
                        if kind == "done":
                            yield _sse({**head, "choices": [{
                                "index": k * n + j, "text": "", "logprobs": None,
                                "finish_reason": _FINISH.get(c.finish_reason, "stop")}]})
                    if kind == "done":
                        results[k], left = payload, left - 1
                if req.include_usage:
                    yield _sse({**head, "choices": [], "usage": usage(results)})
                yield "data: [DONE]\n\n"
            finally:
                for task in tasks:
                    task.cancel()
                for job in jobs:
                    job.cancelled = True

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @app.post("/v1/feedback")
    async def post_feedback(request: Request):
        authorize(request)
        body = await _read_json(request, limits.max_request_bytes, limits.body_timeout_s)
        response_id = _string(body, "response_id", pattern=_ID_RE)
        if response_id is None:
            raise ApiError(400, "'response_id' is required: the id of the completion "
                           "this feedback is about.", param="response_id")
        index = _number(body, "index", 0, 0, 1 << 20, integer=True)
        rating = body.get("rating")
        if rating not in (None, *feedback.RATINGS):
            raise ApiError(400, f"'rating' is {json.dumps(rating)[:40]}; use \"up\", \"down\" "
                           "or null.", param="rating")
        kind = body.get("problem_kind")
        if kind not in (None, *feedback.PROBLEM_KINDS):
            raise ApiError(400, f"'problem_kind' is {json.dumps(kind)[:40]}; use one of "
                           f"{', '.join(feedback.PROBLEM_KINDS)}.", param="problem_kind")
        chosen = body.get("chosen", False)
        if not isinstance(chosen, bool):
            raise ApiError(400, "'chosen' must be true or false.", param="chosen")
        fields = dict(response_id=response_id, choice=index, rating=rating,
                      correction=_string(body, "correction"), problem=_string(body, "problem"),
                      problem_kind=kind, chosen=chosen,
                      conversation_id=_string(body, "conversation_id", pattern=_ID_RE),
                      **await retries.feedback_fields(request, body))
        try:
            stored = await run_in_threadpool(lambda: store.add_feedback(**fields))
        except feedback.UnknownResponse as e:
            raise ApiError(404, str(e), param="response_id") from None
        except UserError as e:
            raise ApiError(400, str(e)) from None
        return {"id": stored["id"], "object": "feedback", "response_id": response_id,
                "index": index, "conversation_id": stored["conversation_id"]}

    return app


def use_compilation_cache(path: str) -> str | None:
    """JAX's persistent compilation cache in `path` ("" = the user cache dir; "off"), unless
    $JAX_COMPILATION_CACHE_DIR or the config already names one: a restarted server loads its
    programs instead of compiling them. Returns the directory used."""
    import jax

    if path == "off":
        return None
    current = jax.config.jax_compilation_cache_dir
    if current and not path:
        return current
    if not path:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"),
                                                                 ".cache")
        path = os.path.join(base, "t5x_like", "jax")
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        logging.warning("no compilation cache (%s): every start compiles anew.", e)
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    # Small programs too: a server's decode programs each compile in under a second on a GPU.
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    return path


def main(argv):
    import uvicorn
    from absl import flags

    from t5x_like.core import runs

    del argv
    f = flags.FLAGS
    api_key = f.api_key or os.environ.get(API_KEY_ENV) or None
    if f.host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        logging.warning("serving on %s without an API key: anyone who reaches this port can "
                        "use the model and write feedback; pass --api_key or set $%s.",
                        f.host, API_KEY_ENV)
    run = runs.load(f.workdir, step=f.step)
    name = f.model_name or os.path.basename(os.path.normpath(f.workdir))
    limits = Limits(max_request_bytes=f.max_request_bytes, max_messages=f.max_messages,
                    max_tokens_limit=f.max_tokens_limit, max_n=f.max_n, max_queue=f.max_queue,
                    body_timeout_s=f.body_timeout_s)
    cache = use_compilation_cache(f.compilation_cache)
    db = f.db or os.path.join(f.workdir, feedback.DB_NAME)
    extra = {}
    if f.best_of > 1 or f.reward_model:
        from t5x_like.serving import rerank
        from t5x_like.evaluation import reward_model
        if not f.reward_model:
            raise UserError(f"--best_of={f.best_of} needs --reward_model=<a task=reward run> "
                            "to pick the best reply.")
        rm = reward_model.RewardModel.load(f.reward_model, mesh=run.mesh)
        extra["generate"] = rerank.serve_generate(rm, max(f.best_of, 1))
    policy = security.Policy.from_flags(f.host, f.allowed_hosts, f.cors_origins)
    app = create_app(run, db_path=db, api_key=api_key, limits=limits, model_name=name,
                     max_batch=f.max_batch, batch_wait_s=f.batch_wait_ms / 1000,
                     max_len=f.max_len or None, default_temperature=f.temperature,
                     policy=policy, batching=f.batching, prefill_chunk=f.prefill_chunk, **extra)
    print(f"serving {name} (step {run.step}) on http://{f.host}:{f.port}/  API key: "
          f"{'required' if api_key else 'off'}; feedback -> {db}; compilation cache: "
          f"{cache or 'off'}; /health says ready once compiled", flush=True)
    try:
        uvicorn.run(app, host=f.host, port=f.port, log_level="warning")
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then re-raises Ctrl-C: not an error
        pass
    print("server stopped", flush=True)
