"""The chat server: the official `openai` client against it, concurrency, limits and errors.

One server (uvicorn in a thread, a random-initialized tiny chat model, the continuous-batching
engine, which compiles its programs at start-up) serves the module. The engine's own tests
(penalties, logprobs, /v1/completions, input hardening, /metrics) are in test_engine.py.
"""

import asyncio
import concurrent.futures
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import types

import httpx
import jax
import openai
import pytest

import chat_model
from conftest import ROOT
from data_pipelines import chat_template
from t5x_like.modeling import decoding
from t5x_like.serving import feedback
from t5x_like.core import runs
from t5x_like.serving import server as serve

KEY = "test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]
LIMITS = serve.Limits(max_request_bytes=20_000, max_messages=8, max_tokens_limit=16, max_n=4)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = chat_model.make(str(tmp_path_factory.mktemp("model")))
    run = runs.load(path)
    db = os.path.join(path, feedback.DB_NAME)
    app = serve.create_app(run, db_path=db, api_key=KEY, limits=LIMITS, model_name="tiny")
    # A random model may end a reply at once; tests that need text ban the end markers.
    no_stop = {str(t): -100 for t in chat_template.reply_stop_ids(run.tokenizer)}
    with chat_model.serving(app) as url:
        yield types.SimpleNamespace(url=url, app=app, db=db, run=run, path=path, no_stop=no_stop)


def client(server, key=KEY):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=300)


def rows(db, sql, args=()):
    conn = sqlite3.connect(db)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, args)]
    finally:
        conn.close()


def test_openai_client_non_streaming(server):
    c = client(server)
    assert [m.id for m in c.models.list()] == ["tiny"]
    out = c.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0)
    assert out.object == "chat.completion" and out.model == "tiny"
    assert out.id.startswith("chatcmpl-")
    [choice] = out.choices
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens == len(chat_template.prompt(server.run.tokenizer, QUESTION))
    assert 1 <= out.usage.completion_tokens <= 8
    again = c.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == choice.message.content  # greedy
    [row] = rows(server.db, "SELECT * FROM responses WHERE id = ?", (out.id,))
    assert row["content"] == choice.message.content and row["model"] == "tiny"
    assert row["model_step"] == 0 and json.loads(row["prompt"]) == QUESTION
    sampling = json.loads(row["sampling"])
    assert sampling["temperature"] == 0 and sampling["max_tokens"] == 8 and sampling["n"] == 1
    conversation = out.model_extra["conversation_id"]
    assert row["conversation_id"] == conversation
    assert rows(server.db, "SELECT id FROM conversations WHERE id = ?", (conversation,))

    # n choices with a seed: reproducible, each stored as its own row.
    kw = dict(model="tiny", messages=QUESTION, max_tokens=8, temperature=1.5, seed=7, n=3)
    a, b = c.chat.completions.create(**kw), c.chat.completions.create(**kw)
    assert [ch.index for ch in a.choices] == [0, 1, 2]
    assert [ch.message.content for ch in a.choices] == [ch.message.content for ch in b.choices]
    assert len({ch.message.content for ch in a.choices}) > 1
    stored = rows(server.db, "SELECT choice, sampling FROM responses WHERE id = ? ORDER BY choice",
                  (a.id,))
    assert [r["choice"] for r in stored] == [0, 1, 2]
    assert json.loads(stored[0]["sampling"])["seed"] == 7


def test_openai_client_streaming(server):
    c = client(server)
    kw = dict(model="tiny", messages=QUESTION, max_tokens=8, temperature=0,
              logit_bias=server.no_stop)
    chunks = list(c.chat.completions.create(**kw, stream=True,
                                            stream_options={"include_usage": True}))
    assert {ch.id for ch in chunks} == {chunks[0].id}
    assert all(ch.object == "chat.completion.chunk" for ch in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    finishes = [ch.choices[0].finish_reason for ch in chunks
                if ch.choices and ch.choices[0].finish_reason]
    assert len(finishes) == 1 and finishes[0] in ("stop", "length")
    assert chunks[-1].usage.completion_tokens >= 1
    assert len([ch for ch in chunks if ch.choices and ch.choices[0].delta.content]) >= 2
    plain = c.chat.completions.create(**kw)
    assert text == plain.choices[0].message.content and plain.usage.completion_tokens == 8
    [row] = rows(server.db, "SELECT content FROM responses WHERE id = ?", (chunks[0].id,))
    assert row["content"] == text


def test_stop_strings_cut_the_reply_in_both_modes(server):
    c = client(server)
    kw = dict(model="tiny", messages=QUESTION, max_tokens=16, temperature=0,
              logit_bias=server.no_stop)
    free = c.chat.completions.create(**kw).choices[0].message.content
    start = next(i for i in range(2, len(free) - 1) if "\ufffd" not in free[i:i + 2])
    stop = free[start:start + 2]
    want = free[:free.index(stop)]
    cut = c.chat.completions.create(**kw, stop=[stop]).choices[0]
    assert cut.message.content == want and cut.finish_reason == "stop"
    streamed = "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        **kw, stop=stop, stream=True) if ch.choices)
    assert streamed == want  # a stream never sends the start of a stop string it later cuts


def test_concurrent_clients_all_answered_and_every_feedback_row_present(server):
    before = dict(server.app.state.scheduler.stats)

    def one_client(k):
        answered = []
        with httpx.Client(base_url=server.url, headers=AUTH, timeout=300) as http:
            for i in range(20):
                body = {"model": "tiny", "max_tokens": 4, "temperature": 0.8, "seed": 100 * k + i,
                        "messages": [{"role": "user", "content": f"What is {k} + {i}?"}]}
                if i % 2:
                    with http.stream("POST", "/v1/chat/completions",
                                     json={**body, "stream": True}) as r:
                        assert r.status_code == 200
                        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
                    assert events[-1] == "[DONE]"
                    first = json.loads(events[0])
                    rid, conversation = first["id"], first["conversation_id"]
                    content = "".join(json.loads(e)["choices"][0]["delta"].get("content", "")
                                      for e in events[:-1] if json.loads(e)["choices"])
                else:
                    r = http.post("/v1/chat/completions", json=body)
                    assert r.status_code == 200, r.text
                    rid, conversation = r.json()["id"], r.json()["conversation_id"]
                    content = r.json()["choices"][0]["message"]["content"]
                rating = "up" if (k + i) % 3 else "down"
                fb = http.post("/v1/feedback", json={"response_id": rid, "rating": rating,
                                                     "conversation_id": conversation})
                assert fb.status_code == 200, fb.text
                answered.append((rid, content, rating, fb.json()["id"]))
        return answered

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(16) as pool:
        answered = [a for batch in pool.map(one_client, range(16)) for a in batch]
    elapsed = time.perf_counter() - start
    assert len(answered) == 320 and len({a[0] for a in answered}) == 320

    ids = [a[0] for a in answered]
    marks = ",".join("?" * len(ids))
    stored = {r["id"]: r for r in rows(
        server.db, f"SELECT id, content FROM responses WHERE id IN ({marks})", ids)}
    assert {rid: content for rid, content, _, _ in answered} == {
        rid: r["content"] for rid, r in stored.items()}
    fb_rows = rows(server.db, f"SELECT id, response_id, rating FROM feedback "
                              f"WHERE response_id IN ({marks})", ids)
    assert sorted((r["response_id"], r["rating"], r["id"]) for r in fb_rows) == sorted(
        (rid, rating, fid) for rid, _, rating, fid in answered)

    stats = server.app.state.scheduler.stats
    requests = stats["requests"] - before["requests"]
    calls = stats["device_calls"] - before["device_calls"]
    steps = stats["steps"] - before["steps"]
    tokens = stats["row_steps"] - before["row_steps"]
    assert requests == 320
    assert tokens > 2 * steps  # rows of different requests shared decode steps
    print(f"\n320 requests from 16 clients in {elapsed:.1f}s: {calls} device calls, "
          f"{tokens / steps:.1f} tokens per decode step")


class FakeDecoder:
    """Records the batches it is given; replies with the row count of the batch."""

    max_batch, max_len = 8, 64

    def __init__(self):
        self.batches = []

    def stream(self, prompts, samplings):
        self.batches.append([len(p) for p in prompts])
        yield [decoding.Completion([1], f"batch of {len(prompts)}", "length") for _ in prompts]


def test_requests_that_arrive_together_share_a_batch_that_fits():
    decoder = FakeDecoder()
    batcher = serve.Batcher(decoder, wait_s=0.3)

    async def ask(prompt_len, max_new, n=1):
        job = serve._Job([1] * prompt_len, [decoding.Sampling(max_new_tokens=max_new)] * n,
                         False)
        batcher.submit(job)
        while True:
            kind, payload = await job.events.get()
            if kind == "done":
                return [c.text for c in payload.completions]

    async def main():
        # Five requests at once share a batch; a long prompt cannot share their cache (50 +
        # 50 new tokens > 64 positions) and 4 more rows overflow the 8 rows: both wait for
        # the next batch, where they fit together.
        return await asyncio.gather(*[ask(10, 50) for _ in range(5)], ask(50, 10),
                                    ask(10, 10, n=4))

    results = asyncio.run(main())
    batcher.close()
    assert decoder.batches == [[10] * 5, [50] + [10] * 4]
    assert results == [["batch of 5"]] * 5 + [["batch of 5"]] + [["batch of 5"] * 4]
    assert batcher.stats["batches"] == 2 and batcher.stats["requests"] == 7


def test_the_generation_path_is_one_function_a_server_can_replace():
    """A best-of-N-style generate: decodes N rows per choice, keeps one per choice."""
    decoder = FakeDecoder()

    def best_of_three(decoder, requests):
        wide = [(prompt, [s for s in samplings for _ in range(3)]) for prompt, samplings in requests]
        *_, final = serve.generate(decoder, wide)  # no partial replies: a choice is made at the end
        yield [[max(c[k:k + 3], key=lambda x: len(x.text)) for k in range(0, len(c), 3)]
               for c in final]

    batcher = serve.Batcher(decoder, wait_s=0.3, generate=best_of_three)

    async def ask(n):
        job = serve._Job([1] * 4, [decoding.Sampling(max_new_tokens=4)] * n, False)
        batcher.submit(job)
        while (event := await job.events.get())[0] != "done":
            pass
        return [c.text for c in event[1].completions]

    async def main():
        return await asyncio.gather(ask(1), ask(1))

    results = asyncio.run(main())
    batcher.close()
    assert decoder.batches == [[4] * 6]  # 2 choices x 3 candidates in one device batch
    assert results == [["batch of 6"], ["batch of 6"]]


def post(server, body=None, *, path="/v1/chat/completions", headers=AUTH, **kw):
    with httpx.Client(base_url=server.url, timeout=300) as http:
        if body is not None:
            kw["json"] = body
        elif "content" in kw:  # raw bytes, declared JSON (other types get 415)
            headers = {**headers, "Content-Type": "application/json"}
        return http.post(path, headers=headers, **kw)


@pytest.mark.parametrize("kw, status, says", [
    (dict(content=b"{not json"), 400, "not valid JSON"),
    (dict(content=b"[1, 2]"), 400, "must be a JSON object"),
    (dict(body={"model": "tiny"}), 400, "'messages' must be a non-empty list"),
    (dict(body={"messages": [{"role": "robot", "content": "hi"}]}), 400, "messages[0].role"),
    (dict(body={"messages": [{"role": "user", "content": 3}]}), 400, "messages[0].content"),
    (dict(body={"messages": [{"role": "assistant", "content": "hi"}]}), 400, "last message"),
    (dict(body={"messages": [{"role": "user", "content": "a"}, {"role": "system", "content": "b"},
                             {"role": "user", "content": "c"}]}), 400, "only the first may be"),
    (dict(body={"messages": QUESTION, "temperature": "hot"}), 400, "'temperature' must be a"),
    (dict(body={"messages": QUESTION, "temperature": 9}), 400, "'temperature' is 9"),
    (dict(body={"messages": QUESTION, "top_p": 0}), 400, "'top_p' is 0"),
    (dict(body={"messages": QUESTION, "max_tokens": 17}), 400, "at most 16 (--max_tokens_limit)"),
    (dict(body={"messages": QUESTION, "max_tokens": 2.5}), 400, "'max_tokens' must be an integer"),
    (dict(body={"messages": QUESTION * 9}), 400, "at most 8 (--max_messages)"),
    (dict(body={"messages": QUESTION, "n": 5}), 400, "at most 4 (--max_n)"),
    (dict(body={"messages": QUESTION, "stop": 3}), 400, "'stop' must be"),
    (dict(body={"messages": QUESTION, "stream": "yes"}), 400, "'stream' must be"),
    (dict(body={"messages": QUESTION, "logit_bias": {"x": 1}}), 400, "logit_bias"),
    (dict(body={"messages": [{"role": "user", "content": "12 + 34 " * 300}]}), 400,
     "more than the model's context of 128 tokens"),
    (dict(body={"messages": [{"role": "user", "content": "x" * 30_000}]}), 413,
     "at most 20000 (--max_request_bytes)"),
    (dict(content=iter([b"x" * 8_000] * 4)), 413, "(--max_request_bytes)"),  # chunked, no length
    (dict(body={"messages": QUESTION}, headers={}), 401, "API key"),
    (dict(body={"messages": QUESTION}, headers={"Authorization": "Bearer wrong"}), 401, "API key"),
    (dict(body={"response_id": "chatcmpl-nope", "rating": "up"}, path="/v1/feedback"), 404,
     "no response 'chatcmpl-nope'"),
    (dict(body={"rating": "up"}, path="/v1/feedback"), 400, "'response_id' is required"),
    (dict(content=b"{", path="/v1/feedback"), 400, "not valid JSON"),
    (dict(body={"messages": QUESTION}, path="/v1/nothing"), 404, "Not Found"),
    (dict(body={"messages": QUESTION, "regenerate_of": "chatcmpl-nope"}), 404, "no response"),
])
def test_bad_requests_get_documented_status_codes(server, kw, status, says):
    r = post(server, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert says in error["message"] and error["type"]
    assert "Traceback" not in r.text and 'File "' not in r.text


def test_a_full_queue_answers_503(server, monkeypatch):
    monkeypatch.setattr(server.app.state.scheduler, "max_queue", 0)  # as if 256 were waiting
    r = post(server, {"messages": QUESTION, "max_tokens": 4})
    assert r.status_code == 503, r.text
    assert "(limit --max_queue)" in r.json()["error"]["message"]
    assert r.json()["error"]["code"] == "server_busy"


def test_feedback_is_checked_against_the_stored_response(server):
    out = client(server).chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4)
    for body, status, says in [
            ({"response_id": out.id, "rating": "meh"}, 400, "'rating'"),
            ({"response_id": out.id}, 400, "says nothing"),
            ({"response_id": out.id, "index": 1, "rating": "up"}, 404, "with index 1"),
            ({"response_id": out.id, "rating": "up", "conversation_id": "conv-other"}, 400,
             "belongs to conversation"),
            ({"response_id": out.id, "problem": "wrong", "problem_kind": "rude"}, 400,
             "'problem_kind'")]:
        r = post(server, body, path="/v1/feedback")
        assert r.status_code == status and says in r.json()["error"]["message"], r.text
    r = post(server, {"response_id": out.id, "problem": "made up a number",
                      "problem_kind": "error", "correction": "5"}, path="/v1/feedback")
    assert r.status_code == 200
    [row] = rows(server.db, "SELECT * FROM feedback WHERE id = ?", (r.json()["id"],))
    assert (row["problem"], row["problem_kind"], row["correction"], row["rating"]) == (
        "made up a number", "error", "5", None)
    assert row["conversation_id"] == out.model_extra["conversation_id"]


def test_routes_without_a_key_and_with_a_wrong_one(server):
    with httpx.Client(base_url=server.url) as http:
        health = http.get("/health")
        assert health.status_code == 200 and health.json()["model"] == "tiny"
        assert http.get("/v1/models").status_code == 401
        assert http.get("/").status_code == 200  # the page itself; its calls carry the key
    with pytest.raises(openai.AuthenticationError):
        client(server, key="wrong").chat.completions.create(model="tiny", messages=QUESTION)


def test_internal_errors_never_reach_the_client_as_a_traceback(server, monkeypatch):
    def broken(**kw):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(server.app.state.store, "add_responses", broken)
    r = post(server, {"messages": QUESTION, "max_tokens": 4})
    assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    r = post(server, {"messages": QUESTION, "max_tokens": 4, "stream": True})
    assert '"error"' in r.text and "[DONE]" not in r.text
    with pytest.raises(openai.APIError):
        list(client(server).chat.completions.create(model="tiny", messages=QUESTION,
                                                    max_tokens=4, stream=True))
    for text in (r.text,):
        assert "secret internal detail" not in text and "Traceback" not in text


def test_regenerate_records_the_alternative_and_the_loop_exports_it(server, tmp_path):
    # 16 tokens, as short as the other tests' prompts: no new shapes to compile.
    ask = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "7?"}]
    body = {"messages": ask, "max_tokens": 6, "temperature": 1.5, "seed": 1,
            "logit_bias": server.no_stop}
    first = post(server, body).json()
    second = post(server, {**body, "seed": 2, "regenerate_of": first["id"]}).json()
    assert second["conversation_id"] == first["conversation_id"]
    [row] = rows(server.db, "SELECT * FROM responses WHERE id = ?", (second["id"],))
    assert (row["regenerates_id"], row["regenerates_choice"]) == (first["id"], 0)
    other = post(server, {**body, "messages": QUESTION, "regenerate_of": first["id"]})
    assert other.status_code == 400 and "messages differ" in other.json()["error"]["message"]

    def say(response, **kw):
        assert post(server, {"response_id": response["id"], **kw},
                    path="/v1/feedback").status_code == 200

    assert first["choices"][0]["message"]["content"] != second["choices"][0]["message"]["content"]
    # The random model's replies run into max_tokens and hold broken UTF-8 (U+FFFD), which the
    # export leaves out (tests/test_feedback.py): here they are made finished, clean replies.
    conn = sqlite3.connect(server.db)
    with conn:
        conn.execute("UPDATE responses SET finish_reason = 'stop', content = "
                     "replace(content, char(65533), '?') WHERE id IN (?, ?)",
                     (first["id"], second["id"]))
    a, b = (conn.execute("SELECT content FROM responses WHERE id = ?", (r["id"],)).fetchone()[0]
            for r in (first, second))
    conn.close()
    out = tmp_path / "pref.jsonl"
    say(second, chosen=True)  # what the page sends when the user goes on with this one
    before = feedback.export(server.db, str(out), "preference")
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert {"prompt": ask, "chosen": b, "rejected": a} in records
    say(first, rating="down")
    say(second, rating="up")
    after = feedback.export(server.db, str(out), "preference")
    assert after["regenerated"] == before["regenerated"] - 1  # now counted as rated...
    assert after["duplicates"] == before["duplicates"] + 1  # ...and deduplicated
    assert after["written"] == before["written"]
    sft = tmp_path / "sft.jsonl"
    feedback.export(server.db, str(sft), "sft")
    sft_records = [json.loads(line) for line in sft.read_text().splitlines()]
    assert {"messages": ask + [{"role": "assistant", "content": b}]} in sft_records


def test_serve_command_starts_answers_and_stops(server, tmp_path):
    port = chat_model.free_port()
    env = dict(os.environ, JAX_PLATFORMS="cpu", T5X_LIKE_API_KEY="env-key",
               # Share this session's compilation cache: the subprocess compiles nothing new.
               JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    proc = subprocess.Popen(
        [sys.executable, "-m", "t5x_like.serve", f"--workdir={server.path}", f"--port={port}",
         f"--db={tmp_path / 'cli.sqlite'}", "--max_tokens_limit=16"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        url = f"http://127.0.0.1:{port}"
        chat_model.wait_until_ready(proc, url, 240)
        c = openai.OpenAI(base_url=f"{url}/v1", api_key="env-key", max_retries=0, timeout=300)
        out = c.chat.completions.create(model=os.path.basename(server.path), messages=QUESTION,
                                        max_tokens=4)
        assert out.model == os.path.basename(server.path) and out.choices[0].message.content
        assert httpx.get(f"{url}/v1/models").status_code == 401  # the env key is required
    finally:
        proc.send_signal(signal.SIGINT)
        output = proc.communicate(timeout=60)[0]
    assert proc.returncode == 0, output[-3000:]
    assert f"on http://127.0.0.1:{port}/" in output and "API key: required" in output
    assert rows(str(tmp_path / "cli.sqlite"), "SELECT id FROM responses") == [{"id": out.id}]
