"""The serving engine: continuous batching equal to the one-request decoder, no compiles after
start-up, penalties and log-probabilities checked against a full forward, /v1/completions,
input hardening and /metrics.

One server (uvicorn in a thread, a random tiny chat model of 64 positions, 4 slots, prompts
prefilled in chunks of 16) serves the module; the engine-level tests drive a second Engine of
the same shapes by hand, which reuses the server's compiled programs.
"""

import asyncio
import collections
import http.client
import json
import os
import socket
import time
import types

import httpx
import jax
import numpy as np
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

import chat_model
from data_pipelines import chat_template
from t5x_like.core import runs
from t5x_like.modeling import decoding, model
from t5x_like.serving import engine as engine_lib
from t5x_like.serving import feedback
from t5x_like.serving import metrics as metrics_lib
from t5x_like.serving import server as serve

LIMITS = serve.Limits(max_tokens_limit=48, max_n=2, body_timeout_s=1.0)
SLOTS, CHUNK = 4, 16
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = chat_model.make(str(tmp_path_factory.mktemp("model")), max_len=64)
    run = runs.load(path)
    db = os.path.join(path, feedback.DB_NAME)
    app = serve.create_app(run, db_path=db, limits=LIMITS, model_name="tiny", max_batch=SLOTS,
                           prefill_chunk=CHUNK)
    first_state = app.state.scheduler.state
    tok = run.tokenizer
    forward = jax.jit(lambda t: model.apply(run.graphdef, run.params, t))

    def log_softmax(ids: list[int]) -> np.ndarray:
        """[len(ids), V] log-probabilities of a full forward over `ids` (vocab padding masked,
        as sampling sees it)."""
        window = np.zeros((1, 64), np.int32)  # one shape: one compile
        window[0, :len(ids)] = ids
        logits = np.asarray(forward(window)[0, :len(ids)], np.float64)
        logits[:, tok.vocab_size:] = -np.inf
        return logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)

    with chat_model.serving(app) as url:
        deadline = time.monotonic() + 300
        while httpx.get(f"{url}/health").status_code != 200:
            assert time.monotonic() < deadline, "the engine did not warm up"
            time.sleep(0.2)
        yield types.SimpleNamespace(url=url, app=app, run=run, tok=tok, db=db,
                                    first_state=first_state, log_softmax=log_softmax,
                                    engine=app.state.scheduler)


def post(server, body, path="/v1/chat/completions", **kw):
    with httpx.Client(base_url=server.url, timeout=120) as http:
        return http.post(path, json=body, **kw)


def ids(server, text: str) -> list[int]:
    return [server.tok.bos_id, *server.tok.encode(text)]


# -- the engine --------------------------------------------------------------------------------


def test_health_reports_warming_then_ready_and_nothing_compiles_after(server):
    assert server.first_state == "warming"
    health = httpx.get(f"{server.url}/health").json()
    assert health["status"] == "ready" and health["batching"] == "continuous"
    # Every request of this module so far (and the engine-level ones, which run the same
    # programs) was served by programs compiled at start-up.
    assert health["compilations_since_ready"] == 0


def test_engine_greedy_equals_the_one_request_decoder_as_rows_join_and_leave(server):
    """More requests than slots, arriving while others decode, with different prompt lengths
    (one and several prefill chunks), reply lengths, seeds, stops, bans and penalties: each
    reply is token for token what Decoder.generate gives it alone; no program is compiled."""
    decoder = server.app.state.decoder
    tok = server.tok
    engine = engine_lib.Engine(decoder, slots=SLOTS, prefill_chunk=CHUNK)
    before = metrics_lib.compilations()
    engine.warm_up()  # the server's programs: nothing new to compile
    texts = ["What is 12 + 30? ", "7", "Q: What is 99 - 1? A: 98\n12 plus 3 is", "3 - 4 =",
             "Q: What is 5 + 5? A: 10\nQ: What is 7 + 1? A: 8\nQ: What is 3 + 3? A:", "1 + 1",
             "What is 1", "Q:", "12 + 8 = 20. 13 + 9 =", "9 - 2"]
    forced = tok.encode("7")[0]
    kinds = [dict(), dict(temperature=1.5, seed=4), dict(stop_strings=("=",)),
             dict(temperature=1.2, seed=5, logit_bias=((forced, 100.0),),
                  banned_sequences=((forced, forced),)),
             dict(presence_penalty=1.0, frequency_penalty=0.5), dict(top_p=0.9, top_k=20,
                                                                     temperature=1.0, seed=9)]
    requests = []
    for i, text in enumerate(texts * 2):
        prompt = ids(server, text)
        max_new = min([5, 12, 20, 30][i % 4], 64 - len(prompt))
        requests.append(engine_lib.Request(
            prompt, [decoding.Sampling(max_new_tokens=max_new, **kinds[i % len(kinds)])]))
    results = {}
    for i, r in enumerate(requests):
        r._post = lambda kind, payload, i=i: results.__setitem__(i, payload) \
            if kind == "done" else None
    pending = collections.deque(requests)
    engine.submit(pending.popleft())
    while len(results) < len(requests):  # one new request per decode call: they join midway
        if pending:
            engine.submit(pending.popleft())
        engine.step()
    assert metrics_lib.compilations() == before
    assert engine.stats["shifts"] >= 1 and engine.stats["prefill_chunks"] > len(requests)
    assert engine.stats["row_steps"] > 2 * engine.stats["steps"]  # rows shared steps
    for i, r in enumerate(requests):
        [alone] = decoder.generate([r.prompt], r.samplings)
        [got] = results[i].completions
        assert (got.tokens, got.text, got.finish_reason) == (
            alone.tokens, alone.text, alone.finish_reason), (i, texts[i % len(texts)])


def test_a_cancelled_request_leaves_at_the_next_step(server):
    decoder = server.app.state.decoder
    engine = engine_lib.Engine(decoder, slots=SLOTS, prefill_chunk=CHUNK)
    engine.warm_up()
    events = []
    r = engine_lib.Request(ids(server, "What is"), [decoding.Sampling(max_new_tokens=40)],
                           post=lambda kind, payload: events.append(kind))
    engine.submit(r)
    engine.step()  # prefill (the first token), then a decode call
    assert engine.busy == 1 and events == ["step", "step"]
    r.cancelled = True
    engine.step()
    assert engine.busy == 0 and not engine._live() and "done" not in events


# -- penalties and log-probabilities -----------------------------------------------------------


def greedy_by_hand(server, prompt, n, presence=0.0, frequency=0.0):
    """Greedy decoding from full forwards with OpenAI's penalties; (tokens, logprobs)."""
    out, lps = [], []
    for _ in range(n):
        logits = server.log_softmax(prompt + out)[-1]  # log-softmax: logits up to a constant
        counts = np.bincount(out, minlength=logits.shape[0]).astype(np.float64)
        adjusted = logits - frequency * counts - presence * (counts > 0)
        token = int(np.argmax(adjusted))
        if token == server.tok.eos_id:
            break
        out.append(token)
        lps.append(float(adjusted[token] - np.logaddexp.reduce(adjusted)))
    return out, lps


def test_penalties_match_a_hand_computation(server):
    prompt = ids(server, "12 + 8 = 20. 13 + 9 =")
    text_of = serve._TokenText(server.tok)
    plain, _ = greedy_by_hand(server, prompt, 16)
    want, want_lp = greedy_by_hand(server, prompt, 16, presence=1.5, frequency=0.7)
    assert want != plain  # the penalties change this reply
    r = post(server, {"prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 2,
                      "presence_penalty": 1.5, "frequency_penalty": 0.7},
             path="/v1/completions")
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["logprobs"]
    assert got["tokens"] == [text_of(t)[0] for t in want]
    np.testing.assert_allclose(got["token_logprobs"], want_lp, atol=1e-4)
    assert all(max(top.values()) == lp for top, lp in zip(got["top_logprobs"],
                                                         got["token_logprobs"]))


def test_chat_logprobs_equal_a_full_forward(server):
    """temperature 0: the log-probabilities of the distribution at temperature 1 (with the
    logit bias), as a full forward over the prompt and the reply so far gives them."""
    no_stop = {str(t): -100 for t in chat_template.reply_stop_ids(server.tok)}
    r = post(server, {"messages": QUESTION, "max_tokens": 10, "temperature": 0,
                      "logprobs": True, "top_logprobs": 3, "logit_bias": no_stop})
    assert r.status_code == 200, r.text
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert len(content) == r.json()["usage"]["completion_tokens"] == 10
    prompt = chat_template.prompt(server.tok, QUESTION)
    text_of = serve._TokenText(server.tok)
    banned = [int(t) for t in no_stop]
    reply = []
    for entry in content:
        lp = server.log_softmax(prompt + reply)[-1]
        lp[banned] = -np.inf
        lp -= np.logaddexp.reduce(lp)
        token = int(np.argmax(lp))
        assert entry["token"] == text_of(token)[0] and entry["bytes"] == text_of(token)[1]
        assert entry["logprob"] == pytest.approx(lp[token], abs=1e-4)
        top = np.argsort(-lp)[:3]
        assert [e["token"] for e in entry["top_logprobs"]] == [text_of(t)[0] for t in top]
        np.testing.assert_allclose([e["logprob"] for e in entry["top_logprobs"]], lp[top],
                                   atol=1e-4)
        reply.append(token)
    # The same through a stream: every token's entry arrives once, in order.
    with httpx.Client(base_url=server.url, timeout=120) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": QUESTION, "max_tokens": 10, "temperature": 0, "logprobs": True,
                "logit_bias": no_stop, "stream": True}) as s:
            chunks = [json.loads(line[6:]) for line in s.iter_lines()
                      if line.startswith("data: {")]
    streamed = [e for c in chunks for ch in c["choices"] if ch.get("logprobs")
                for e in ch["logprobs"]["content"]]
    assert [e["token"] for e in streamed] == [e["token"] for e in content]
    np.testing.assert_allclose([e["logprob"] for e in streamed],
                               [e["logprob"] for e in content], atol=1e-5)


def test_completions_echo_gives_the_prompts_log_probabilities(server):
    """What evaluation harnesses (lm-eval's local-completions) send to score a continuation:
    echo, logprobs, max_tokens 0 or 1, prompts as token ids or text."""
    prompt = ids(server, "Q: What is 5 + 5? A: 10")
    full = server.log_softmax(prompt)
    text_of = serve._TokenText(server.tok)
    r = post(server, {"prompt": [prompt, "What is 5 + 5?"], "max_tokens": 0, "echo": True,
                      "logprobs": 2, "temperature": 0}, path="/v1/completions")
    assert r.status_code == 200, r.text
    first, second = r.json()["choices"]
    lp = first["logprobs"]
    assert first["text"] == server.tok.decode(prompt) and first["finish_reason"] == "length"
    assert lp["tokens"] == [text_of(t)[0] for t in prompt]
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    np.testing.assert_allclose(lp["token_logprobs"][1:],
                               [full[i - 1, t] for i, t in enumerate(prompt) if i], atol=1e-4)
    for i in range(1, len(prompt)):
        best = np.argsort(-full[i - 1])[:2]
        assert list(lp["top_logprobs"][i]) == [text_of(t)[0] for t in best]
    assert lp["text_offset"][1] == len(lp["tokens"][0])
    assert second["index"] == 1 and second["text"] == server.tok.decode(ids(server,
                                                                             "What is 5 + 5?"))
    assert r.json()["usage"]["completion_tokens"] == 0

    # lm-eval's loglikelihood request: one greedy token after the echoed prompt.
    r = post(server, {"prompt": [prompt], "max_tokens": 1, "echo": True, "logprobs": 1,
                      "temperature": 0, "seed": 1234}, path="/v1/completions")
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["token_logprobs"]) == len(prompt) + 1
    greedy = [lp_ == max(top.values()) for lp_, top in
              zip(lp["token_logprobs"][1:], lp["top_logprobs"][1:])]
    assert greedy[-1]  # the generated token is the greedy one
    assert greedy[:-1] == [int(np.argmax(full[i - 1])) == t for i, t in enumerate(prompt) if i]


def test_the_openai_client_reads_logprobs_completions_and_refusals(server):
    c = openai.OpenAI(base_url=f"{server.url}/v1", api_key="any", max_retries=0, timeout=120)
    chat = c.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=4,
                                     temperature=0, logprobs=True, top_logprobs=2,
                                     presence_penalty=0.5, frequency_penalty=0.5)
    [choice] = chat.choices
    assert len(choice.logprobs.content) == chat.usage.completion_tokens
    assert all(len(t.top_logprobs) == 2 for t in choice.logprobs.content)
    prompt = ids(server, "What is 12 + 30?")
    text = c.completions.create(model="tiny", prompt=prompt, max_tokens=0, echo=True,
                                logprobs=1)
    [choice] = text.choices
    assert choice.logprobs.token_logprobs[0] is None
    assert len(choice.logprobs.token_logprobs) == len(prompt) == text.usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as refused:
        c.chat.completions.create(model="tiny", messages=QUESTION, tools=[{
            "type": "function", "function": {"name": "f", "parameters": {}}}])
    assert refused.value.body["param"] == "tools"


# -- input hardening ---------------------------------------------------------------------------


def raw_request(conn: http.client.HTTPConnection, body: bytes, path="/v1/chat/completions"):
    conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    return response.status, json.loads(response.read())


@pytest.mark.parametrize("body, param", [
    (b'{"messages": [{"role": "user", "content": "hi"}], "temperature": NaN}', "temperature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_p": Infinity}', "top_p"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "presence_penalty": -1e999}',
     "presence_penalty"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "logit_bias": {"5": NaN}}',
     "logit_bias.5"),
    (b'{"messages": [{"role": "user", "content": "a \\ud800 b"}]}', "messages[0].content"),
    (b'{"prompt": "x\\udfff", "max_tokens": 1}', "prompt"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "tools": [{"type": "function"}]}',
     "tools"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "response_format": '
     b'{"type": "json_object"}}', "response_format"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "temprature": 1}', "temprature"),
    (b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}', "top_logprobs"),
    (b'{"prompt": "hi", "suffix": "!"}', "suffix"),
])
def test_bad_input_gets_400_naming_it_and_the_connection_survives(server, body, param):
    conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
    path = "/v1/completions" if body.startswith(b'{"prompt"') else "/v1/chat/completions"
    status, answer = raw_request(conn, body, path)
    assert status == 400 and answer["error"]["param"] == param, answer
    sock = conn.sock
    status, answer = raw_request(conn, json.dumps({"messages": QUESTION, "max_tokens": 2})
                                 .encode())
    assert status == 200 and conn.sock is sock  # the same connection answered again
    conn.close()


def test_harmless_values_of_unsupported_parameters_are_accepted(server):
    r = post(server, {"messages": QUESTION, "max_tokens": 2, "response_format": {"type": "text"},
                      "tool_choice": "none", "user": "someone"})
    assert r.status_code == 200, r.text


def test_a_truncated_body_gets_a_prompt_408_or_400(server):
    host, port = server.url.removeprefix("http://").split(":")
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + b'{"messages": [')
        start = time.monotonic()
        answer = b""
        while chunk := s.recv(4096):  # until the server closes the connection
            answer += chunk
        waited = time.monotonic() - start
    answer = answer.decode()
    assert answer.startswith("HTTP/1.1 408") and "request_timeout" in answer, answer
    assert waited < 10  # --body_timeout_s is 1 here
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(head + b'{"messages": [')
        s.shutdown(socket.SHUT_WR)  # the client ends the body early
        answer = s.recv(4096).decode()
    assert answer == "" or answer.startswith("HTTP/1.1 400"), answer


def test_tokenizing_happens_off_the_event_loop(server, monkeypatch):
    on_loop = []
    parse = serve._parse_chat

    def spy(*args):
        try:
            asyncio.get_running_loop()
            on_loop.append(True)
        except RuntimeError:  # no event loop in this thread: a worker's
            on_loop.append(False)
        return parse(*args)

    monkeypatch.setattr(serve, "_parse_chat", spy)
    r = post(server, {"messages": [{"role": "user", "content": "12 + 34 " * 5000}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    assert on_loop == [False]


# -- streaming clients that leave, metrics -----------------------------------------------------


def test_a_streaming_client_that_disconnects_frees_its_slot(server, monkeypatch):
    engine = server.engine
    decode = engine._decode

    def slow_decode():  # a slow device: the reply would take 6 calls x 0.5 s
        time.sleep(0.5)
        decode()

    monkeypatch.setattr(engine, "_decode", slow_decode)
    cancelled = engine.stats["cancelled"]
    tokens = engine.stats["generated_tokens"]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        with http.stream("POST", "/v1/chat/completions", json={
                "messages": QUESTION, "max_tokens": 48, "temperature": 0,
                "logit_bias": {str(t): -100 for t in chat_template.reply_stop_ids(server.tok)},
                "stream": True}) as s:
            for line in s.iter_lines():  # until its first token: it holds a slot now
                if '"content": "' in line and '"content": ""' not in line:
                    break
            assert engine.busy == 1
    left = time.monotonic()
    while engine.busy:
        assert time.monotonic() - left < 2.5, "the slot was not freed"
        time.sleep(0.05)
    assert engine.stats["generated_tokens"] == tokens  # it never finished
    assert engine.stats["cancelled"] == cancelled  # it left from its slot, not the queue


def test_metrics_in_prometheus_format(server):
    before = metrics_lib.compilations()
    post(server, {"messages": QUESTION, "max_tokens": 3})
    post(server, {"messages": QUESTION * 3, "max_tokens": 20, "n": 2, "stream": True,
                  "logprobs": True, "presence_penalty": 0.5, "temperature": 1.0})
    post(server, {"prompt": ids(server, "1 + 1 = 2. " * 4), "max_tokens": 0, "echo": True,
                  "logprobs": 1}, path="/v1/completions")
    assert metrics_lib.compilations() == before  # requests never wait for a compile
    text = httpx.get(f"{server.url}/metrics").text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    for name in ("t5x_like_http_requests", "t5x_like_prompt_tokens", "t5x_like_generated_tokens",
                 "t5x_like_queue_depth", "t5x_like_slots_busy",
                 "t5x_like_time_to_first_token_seconds", "t5x_like_inter_token_latency_seconds",
                 "t5x_like_jax_compilations", "t5x_like_jax_compilations_since_ready"):
        assert name in families, name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for f in families.values() for s in f.samples}
    assert samples[("t5x_like_http_requests_total",
                    (("route", "/v1/chat/completions"), ("status", "200")))] >= 1
    assert samples[("t5x_like_time_to_first_token_seconds_count", ())] >= 1
    assert samples[("t5x_like_slots", ())] == SLOTS
    # Process-wide: this module's tests compile their own reference programs too.
    assert samples[("t5x_like_jax_compilations_total", ())] == metrics_lib.compilations()


def test_the_compilation_cache_defaults_to_a_user_cache_dir(tmp_path, monkeypatch):
    previous = jax.config.jax_compilation_cache_dir
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    try:
        jax.config.update("jax_compilation_cache_dir", None)
        assert serve.use_compilation_cache("") == str(tmp_path / "t5x_like" / "jax")
        assert os.path.isdir(tmp_path / "t5x_like" / "jax")
        assert serve.use_compilation_cache("off") is None
        assert serve.use_compilation_cache(str(tmp_path / "run")) == str(tmp_path / "run")
    finally:
        jax.config.update("jax_compilation_cache_dir", previous)
