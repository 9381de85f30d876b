"""The chat server: an OpenAI-compatible API, a web chat page and the feedback database.

    python -m t5x_like.serve --workdir=runs/sft [--host=127.0.0.1 --port=8000] [--api_key=...]

    from openai import OpenAI
    client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="<key or anything>")
    client.chat.completions.create(model="sft", messages=[{"role": "user", "content": "Hi"}])

Routes: POST /v1/chat/completions (messages, temperature, top_p, max_tokens, stop, n, seed,
logit_bias, stream with server-sent events; extensions: top_k, conversation_id,
regenerate_of / regenerate_of_index), GET /v1/models, POST /v1/feedback (rating, correction,
problem report, chosen), GET /health, GET / (the web chat page, t5x_like/serving/web/index.html).

Requests that arrive together are decoded together: a queue in front of the one KV-cache
Decoder gathers every waiting request (up to the decoder's batch and context) into one device
batch, and a single worker thread runs one batch at a time, so the device is never shared
between two programs and a busy server gets fuller batches instead of longer queues.

Every completion (each of its n choices) is stored with its prompt, sampling settings and the
model step in `<workdir>/feedback.sqlite` (t5x_like/serving/feedback.py) before the client gets its
last byte, so feedback can always name it. Safe by default: binds 127.0.0.1; with an API key
(--api_key or $T5X_LIKE_API_KEY) every /v1 route needs `Authorization: Bearer <key>` (401);
bodies over --max_request_bytes get 413; more than --max_messages messages, max_tokens over
--max_tokens_limit, n over --max_n, bad fields and malformed JSON get 400; every error is a
JSON body {"error": {"message", "type", "param", "code"}} naming the field or limit, never a
stack trace (those go to the server log).
"""

import asyncio
import collections
import contextlib
import dataclasses
import hmac
import json
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
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from data_pipelines import chat_template
from t5x_like.modeling import decoding
from t5x_like.serving import feedback
from t5x_like.serving import history, security  # webchat: history, retries, checks
from t5x_like.core.errors import UserError

API_KEY_ENV = "T5X_LIKE_API_KEY"
_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
_FINISH = {"stop": "stop", "length": "length", "constraint": "stop"}
_ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error",
                404: "not_found_error", 405: "invalid_request_error",
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


class _Job:
    """One request's rows (n choices of one prompt), and how its results reach its handler."""

    def __init__(self, prompt: list[int], samplings: list[decoding.Sampling], stream: bool,
                 finish: Callable[[list[decoding.Completion]], Any]):
        self.prompt, self.samplings, self.stream, self.finish = prompt, samplings, stream, finish
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
    """Gathers waiting requests into device batches; one worker thread decodes them in turn."""

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
        for j, mine in zip(batch, last):
            try:
                j.post("done", j.finish(mine))
            except Exception:  # noqa: BLE001
                logging.exception("storing a response failed")
                j.post("error", "the response could not be stored; see the server log.")


# -- request parsing ----------------------------------------------------------------------------


async def _read_json(request: Request, limit: int) -> dict:
    """The body as a JSON object: 413 past `limit` bytes, 400 unless valid JSON."""
    too_large = ("the request body is {} bytes; this server takes at most "
                 f"{limit} (--max_request_bytes).")
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.isdigit():
            raise ApiError(400, "the Content-Length header is not a number.")
        if int(declared) > limit:
            raise ApiError(413, too_large.format(declared), code="request_too_large")
    data, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise ApiError(413, too_large.format(f"more than {limit}"), code="request_too_large")
        data.append(chunk)
    try:
        body = json.loads(b"".join(data))
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, absurd nesting
        raise ApiError(400, f"the request body is not valid JSON ({e}).",
                       code="malformed_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object.")
    return body


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
class _Chat:
    messages: list[dict]
    prompt: list[int]
    samplings: list[decoding.Sampling]
    record: dict  # the sampling settings stored with the response
    stream: bool
    include_usage: bool
    conversation_id: str | None
    regenerate_of: tuple[str, int] | None


def _parse_chat(body: dict, limits: Limits, tokenizer, context: int, max_batch: int,
                default_temperature: float) -> _Chat:
    messages = _messages(body, limits)
    _string(body, "model")
    temperature = float(_number(body, "temperature", default_temperature, 0.0, 2.0))
    top_p = float(_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True))
    top_k = _number(body, "top_k", 0, 0, tokenizer.vocab_size, integer=True)
    n_limit = min(limits.max_n, max_batch)
    n = _number(body, "n", 1, 1, n_limit, integer=True, limit_flag="--max_n")
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None \
        else "max_tokens"
    max_tokens = _number(body, name, None, 1, limits.max_tokens_limit, integer=True,
                         limit_flag="--max_tokens_limit")
    seed = _number(body, "seed", None, -2 ** 63, 2 ** 63 - 1, integer=True)
    stops = _stops(body, limits)
    bias = _logit_bias(body, tokenizer.vocab_size)
    stream = body.get("stream") or False
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be true or false.", param="stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object.", param="stream_options")
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
    # Without a seed every request samples differently; the seed used is stored, so any
    # stored response can be reproduced.
    seed = (secrets.randbelow(2 ** 31) if seed is None else seed) % 2 ** 31
    # The reply ends at <|end|>; any other marker would start a turn the model must not write.
    stop_tokens = chat_template.reply_stop_ids(tokenizer)
    samplings = [decoding.Sampling(max_new_tokens=max_tokens, temperature=temperature,
                                   top_k=top_k, top_p=top_p, seed=(seed + i) % 2 ** 31,
                                   stop_tokens=stop_tokens, stop_strings=stops, logit_bias=bias)
                 for i in range(n)]
    record = {"temperature": temperature, "top_p": top_p, "top_k": top_k,
              "max_tokens": max_tokens, "stop": list(stops), "n": n, "seed": seed,
              "logit_bias": {str(t): (-100 if v == float("-inf") else v) for t, v in bias}}
    return _Chat(messages, prompt, samplings, record, stream,
                 bool(options.get("include_usage")), conversation_id,
                 (regen, regen_index) if regen else None)


def _visible(text: str, stops: tuple[str, ...]) -> str:
    """What a stream may send now: a tail that could begin a stop string waits for more."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:k]):
                hold = max(hold, k)
                break
    return text[:len(text) - hold]


# -- the app ------------------------------------------------------------------------------------


def create_app(run, *, db_path: str, api_key: str | None = None, limits: Limits = Limits(),
               model_name: str = "t5x_like", max_batch: int = 16, batch_wait_s: float = 0.005,
               max_len: int | None = None, default_temperature: float = 0.7,
               generate: Callable[[decoding.Decoder, Requests], Iterator] = generate,
               policy: security.Policy = security.Policy()) -> FastAPI:
    """The FastAPI app serving `run` (from `runs.load`); its decode worker starts now.

    `policy` says which hosts and origins may drive it (t5x_like/serving/security.py).

    `generate` makes the replies of one device batch (see `generate` above).
    Tests drive it with `fastapi.testclient.TestClient(app)` or a uvicorn server in a thread.
    """
    decoder = decoding.Decoder.from_run(run, max_batch=max_batch, max_len=max_len)
    store = feedback.Store(db_path)
    batcher = Batcher(decoder, wait_s=batch_wait_s, max_queue=limits.max_queue,
                      generate=generate)
    tokenizer = run.tokenizer
    fingerprint = f"{model_name}-step-{run.step}"
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()
        store.close()

    app = FastAPI(title="t5x_like", docs_url=None, redoc_url=None, openapi_url=None,
                  lifespan=lifespan)
    app.state.store, app.state.batcher, app.state.decoder = store, batcher, decoder
    app.add_middleware(security.Middleware, policy=policy)  # webchat: Host, Origin, JSON only
    retries = history.Retries(store)  # webchat: Idempotency-Key

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return _error(e.status, e.message, e.param, e.code)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        return _error(e.status_code, str(e.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return _error(400, "the request does not match this route's parameters.")

    @app.exception_handler(Exception)
    async def _internal_error(request, e):  # logged with its traceback; the client gets none
        logging.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error(500, "internal server error; the details are in the server log.")

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
        return {"status": "ok", "model": model_name, "step": run.step,
                "context": decoder.max_len, "max_batch": decoder.max_batch,
                **dict(batcher.stats)}

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
        body = await _read_json(request, limits.max_request_bytes)
        chat = _parse_chat(body, limits, tokenizer, decoder.max_len, decoder.max_batch,
                           default_temperature)
        # webchat: only ids this server issued; a retry with its Idempotency-Key is answered
        # from the database.
        await history.check_conversation(store, chat.conversation_id)
        parent = await history.check_parent(store, chat.conversation_id, body)
        attempt = await retries.begin(request, body)
        if attempt.replay is not None:
            return history.replayed_completion(attempt.replay, stream=chat.stream,
                                               include_usage=chat.include_usage)
        try:
            response = await _complete(chat, attempt, parent)
        except BaseException:
            attempt.end()
            raise
        if not chat.stream:  # a stream ends its attempt when it ends
            attempt.end()
        return response

    async def _complete(chat: _Chat, attempt: history.Attempt, parent: tuple | None):
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
            """In the worker thread: store the choices before the client hears of them."""
            choices = [{"content": c.text, "finish_reason": _FINISH.get(c.finish_reason, "stop"),
                        "completion_tokens": len(c.tokens)} for c in completions]
            store.add_responses(response_id=response_id, conversation_id=conversation_id,
                                prompt=chat.messages, choices=choices, model=model_name,
                                model_step=run.step, sampling=chat.record,
                                prompt_tokens=len(chat.prompt), regenerates=chat.regenerate_of,
                                idempotency_key=attempt.key, body_hash=attempt.body_hash,
                                parent=parent)
            return choices

        job = _Job(chat.prompt, chat.samplings, chat.stream, finish)
        batcher.submit(job)
        head = {"id": response_id, "created": created, "model": model_name,
                "system_fingerprint": fingerprint, "conversation_id": conversation_id}

        def usage(choices):
            completion = sum(c["completion_tokens"] for c in choices)
            return {"prompt_tokens": len(chat.prompt), "completion_tokens": completion,
                    "total_tokens": len(chat.prompt) + completion}

        if not chat.stream:
            while True:
                kind, payload = await job.events.get()
                if kind == "error":
                    raise ApiError(500, payload)
                if kind == "done":
                    break
            return {**head, "object": "chat.completion", "usage": usage(payload), "choices": [
                {"index": i, "message": {"role": "assistant", "content": c["content"]},
                 "logprobs": None, "finish_reason": c["finish_reason"]}
                for i, c in enumerate(payload)]}

        stops = chat.samplings[0].stop_strings

        def event(choices: list[dict], **extra) -> str:
            chunk = {**head, "object": "chat.completion.chunk", "choices": choices, **extra}
            return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

        def delta(i: int, content: str | None = None, finish_reason=None, **more) -> dict:
            d = {**more, **({"content": content} if content is not None else {})}
            return {"index": i, "delta": d, "logprobs": None, "finish_reason": finish_reason}

        async def events():
            try:
                async for chunk in _events():
                    yield chunk
            finally:
                attempt.end()

        async def _events():
            sent = [""] * len(chat.samplings)
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
                            yield event([delta(i, text[len(sent[i]):])])
                            sent[i] = text
                    continue
                for i, c in enumerate(payload):  # done: what is left, then why it ended
                    final = c["content"]
                    rest = final[len(sent[i]):] if final.startswith(sent[i]) else ""
                    if rest:
                        yield event([delta(i, rest)])
                    yield event([delta(i, finish_reason=c["finish_reason"])])
                if chat.include_usage:
                    yield event([], usage=usage(payload))
                yield "data: [DONE]\n\n"
                return

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache",
                                          "X-Accel-Buffering": "no"})

    @app.post("/v1/feedback")
    async def post_feedback(request: Request):
        authorize(request)
        body = await _read_json(request, limits.max_request_bytes)
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
                    max_tokens_limit=f.max_tokens_limit, max_n=f.max_n, max_queue=f.max_queue)
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
                     policy=policy, **extra)
    print(f"serving {name} (step {run.step}) on http://{f.host}:{f.port}/  API key: "
          f"{'required' if api_key else 'off'}; feedback -> {db}", flush=True)
    try:
        uvicorn.run(app, host=f.host, port=f.port, log_level="warning")
    except KeyboardInterrupt:  # uvicorn shuts down cleanly, then re-raises Ctrl-C: not an error
        pass
    print("server stopped", flush=True)
