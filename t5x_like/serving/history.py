"""Conversation history and retry-safe writes for the chat server (t5x_like/serving/server.py).

Routes (each needs the API key when the server has one):

    GET    /v1/conversations             the latest conversations: id, title, created, updated,
                                         replies (?limit=N, at most 200)
    GET    /v1/conversations/{id}        its turns as the page shows them: each assistant turn
                                         with its alternatives, their ids and feedback, and
                                         how many of the oldest turns were left out of the
                                         last request to fit the context ("dropped")
    PATCH  /v1/conversations/{id}        {"title": "..."} renames it
    DELETE /v1/conversations/{id}        deletes it with its replies and their feedback

Only ids this server issued exist: a completion naming any other conversation_id gets 404, so
a client can neither invent one nor continue one that was deleted. A completion may name the
reply it continues (extension fields parent_id, parent_index: the reply its last assistant turn
shows); the history then holds even when every earlier turn was dropped to fit the context.

Idempotency-Key (a request header, 1-200 visible ASCII characters): a client that lost the
answer to a write (a timeout, a server restart) sends the same request again with the same key
and gets the stored result instead of a second row: a completion is answered from the database
(streamed too, as one chunk, when asked), feedback returns the first row's id. The same key with
a different request is a 422; a retry while the first is still being answered is a 409.
"""

import json
import re
import secrets
import time

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from t5x_like.serving import feedback

_ID_RE = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
_KEY_RE = re.compile(r"^[\x21-\x7e]{1,200}$")
INFLIGHT_EXPIRY_S = 900.0  # a first try never seen to end stops blocking its retries then


class HttpError(Exception):
    """Refused: becomes the server's {"error": {...}} body with `status`."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


_TYPES = {400: "invalid_request_error", 404: "not_found_error", 409: "conflict_error",
          422: "invalid_request_error"}


def _error_response(e: HttpError) -> JSONResponse:
    return JSONResponse({"error": {"message": e.message, "type": _TYPES.get(e.status, "error"),
                                   "param": e.param, "code": e.code}}, status_code=e.status)


def _conversation_id(value: str) -> str:
    if not _ID_RE.match(value):
        raise HttpError(404, f"no conversation {value[:70]!r}.", code="conversation_not_found")
    return value


# -- conversations ------------------------------------------------------------------------------


def new_conversation(store: feedback.Store) -> str:
    """Issues a conversation id (recorded now, so the client may continue it)."""
    conversation_id = f"conv-{secrets.token_hex(12)}"
    store.create_conversation(conversation_id)
    return conversation_id


async def check_conversation(store: feedback.Store, conversation_id: str | None) -> None:
    """404 unless this server issued `conversation_id` (None: a new conversation)."""
    if conversation_id is not None and not await run_in_threadpool(store.has_conversation,
                                                                   conversation_id):
        raise HttpError(404, f"no conversation {conversation_id!r}: send the conversation_id a "
                        "completion of this server returned, or none to start a new one.",
                        param="conversation_id", code="conversation_not_found")


async def check_parent(store: feedback.Store, conversation_id: str | None,
                       body: dict) -> tuple[str, int] | None:
    """The extension fields parent_id / parent_index: the reply (one of this conversation's)
    that the request's last assistant turn shows. Without them the store finds it from the
    last exchange, which it cannot once every earlier turn was dropped to fit the context."""
    parent_id, index = body.get("parent_id"), body.get("parent_index", 0)
    if parent_id is None:
        return None
    if not isinstance(parent_id, str) or not _ID_RE.match(parent_id):
        raise HttpError(400, "'parent_id' must be the id of a completion.", param="parent_id")
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise HttpError(400, "'parent_index' must be a choice index (0 or more).",
                        param="parent_index")
    try:
        found = await run_in_threadpool(store.response, parent_id, index)
    except feedback.UnknownResponse as e:
        raise HttpError(404, str(e), param="parent_id") from None
    if found["conversation_id"] != conversation_id:
        raise HttpError(400, f"parent_id {parent_id!r} is not a reply of conversation "
                        f"{conversation_id!r}; send the conversation_id it belongs to.",
                        param="parent_id")
    return parent_id, index


def add_routes(app, store: feedback.Store, authorize) -> None:
    """The /v1/conversations routes, and the error handler of this module's refusals."""

    @app.exception_handler(HttpError)
    async def _refused(request, e: HttpError):
        return _error_response(e)

    @app.get("/v1/conversations")
    async def list_conversations(request: Request, limit: int = 50):
        authorize(request)
        limit = max(1, min(int(limit), 200))
        data = await run_in_threadpool(store.conversations, limit)
        return {"object": "list", "data": [{"object": "conversation", **c} for c in data]}

    @app.get("/v1/conversations/{conversation_id}")
    async def get_conversation(conversation_id: str, request: Request):
        authorize(request)
        found = await _in_store(store.conversation, _conversation_id(conversation_id))
        return {"object": "conversation", **found}

    @app.patch("/v1/conversations/{conversation_id}")
    async def rename_conversation(conversation_id: str, request: Request):
        authorize(request)
        conversation_id = _conversation_id(conversation_id)
        body = await _json_object(request)
        title = body.get("title")
        if not isinstance(title, str):
            raise HttpError(400, "'title' must be a string.", param="title")
        await _in_store(store.rename_conversation, conversation_id, title)
        return {"object": "conversation", "id": conversation_id,
                "title": " ".join(title.split())[:feedback.TITLE_CHARS]}

    @app.delete("/v1/conversations/{conversation_id}")
    async def delete_conversation(conversation_id: str, request: Request):
        authorize(request)
        counts = await _in_store(store.delete_conversation, _conversation_id(conversation_id))
        return {"object": "conversation.deleted", "id": conversation_id, "deleted": True,
                **counts}


async def _in_store(method, *args):
    """A store call off the event loop; a conversation the store does not know is a 404."""
    try:
        return await run_in_threadpool(method, *args)
    except feedback.UnknownConversation as e:
        raise HttpError(404, str(e), code="conversation_not_found") from None


async def _json_object(request: Request, limit: int = 100_000) -> dict:
    data = b""
    async for chunk in request.stream():
        data += chunk
        if len(data) > limit:
            raise HttpError(400, f"the request body is over {limit} bytes.")
    try:
        body = json.loads(data)
    except ValueError as e:
        raise HttpError(400, f"the request body is not valid JSON ({e}).",
                        code="malformed_json") from None
    if not isinstance(body, dict):
        raise HttpError(400, "the request body must be a JSON object.")
    return body


# -- idempotency --------------------------------------------------------------------------------


def idempotency_key(request: Request) -> str | None:
    key = request.headers.get("idempotency-key")
    if key is None:
        return None
    if not _KEY_RE.match(key):
        raise HttpError(400, "the Idempotency-Key header must be 1-200 visible ASCII "
                        "characters (a UUID, say).", param="Idempotency-Key")
    return key


class Attempt:
    """One try of a completion under an Idempotency-Key (or none): `replay` holds the stored
    choices when an earlier try already made them; `end()` when this try is over."""

    def __init__(self, owner: "Retries", key: str | None, body_hash: str | None,
                 replay: list[dict] | None):
        self.owner, self.key, self.body_hash, self.replay = owner, key, body_hash, replay

    def end(self) -> None:
        if self.key is not None and self.replay is None:
            self.owner._inflight.pop(self.key, None)


class Retries:
    """Idempotency-Key bookkeeping of one server: the keys being answered right now."""

    def __init__(self, store: feedback.Store):
        self.store = store
        self._inflight: dict[str, float] = {}

    async def begin(self, request: Request, body: dict) -> Attempt:
        key = idempotency_key(request)
        if key is None:
            return Attempt(self, None, None, None)
        body_hash = feedback.request_hash(body)
        try:
            replay = await run_in_threadpool(self.store.replayed_completion, key, body_hash)
        except feedback.IdempotencyConflict as e:
            raise HttpError(422, str(e), param="Idempotency-Key",
                            code="idempotency_key_reused") from None
        if replay is not None:
            return Attempt(self, key, body_hash, replay)
        now = time.monotonic()
        started = self._inflight.get(key)
        if started is not None and now - started < INFLIGHT_EXPIRY_S:
            raise HttpError(409, "a request with this Idempotency-Key is still being answered; "
                            "retry it shortly to get its result.", param="Idempotency-Key",
                            code="idempotency_key_in_use")
        self._inflight[key] = now
        return Attempt(self, key, body_hash, None)

    async def feedback_fields(self, request: Request, body: dict) -> dict:
        """The Idempotency-Key arguments of Store.add_feedback for this request."""
        key = idempotency_key(request)
        return {"idempotency_key": key,
                "body_hash": feedback.request_hash(body) if key is not None else None}


def replayed_completion(choices: list[dict], *, stream: bool, include_usage: bool = False):
    """The stored completion answered again, as the first try's client would have seen it."""
    first = choices[0]
    head = {"id": first["id"], "created": int(first["created"]), "model": first["model"],
            "system_fingerprint": f"{first['model']}-step-{first['model_step']}",
            "conversation_id": first["conversation_id"]}
    completion = sum(c["completion_tokens"] for c in choices)
    usage = {"prompt_tokens": first["prompt_tokens"], "completion_tokens": completion,
             "total_tokens": first["prompt_tokens"] + completion}
    replayed = {"Idempotent-Replayed": "true"}
    if not stream:
        return JSONResponse({**head, "object": "chat.completion", "usage": usage, "choices": [
            {"index": c["choice"], "message": {"role": "assistant", "content": c["content"]},
             "logprobs": None, "finish_reason": c["finish_reason"]} for c in choices]},
            headers=replayed)

    def event(chunk_choices, **extra):
        chunk = {**head, "object": "chat.completion.chunk", "choices": chunk_choices, **extra}
        return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"

    def events():
        yield event([{"index": c["choice"], "delta": {"role": "assistant",
                                                      "content": c["content"]},
                      "logprobs": None, "finish_reason": None} for c in choices])
        yield event([{"index": c["choice"], "delta": {}, "logprobs": None,
                      "finish_reason": c["finish_reason"]} for c in choices])
        if include_usage:
            yield event([], usage=usage)
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", **replayed})
