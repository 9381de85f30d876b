"""The chat server against other sites and careless retries: Host and Origin checks, JSON-only
bodies, CORS, the page's CSP, issued conversation ids, history routes and Idempotency-Key.

One server without an API key (the default, where these checks are all that stands between a
browser visiting another site and the model), a tiny random chat model, replies of 4 tokens.
"""

import hashlib
import json
import os
import re
import sqlite3

import httpx
import pytest

import chat_model
from t5x_like.core import runs
from t5x_like.serving import feedback, security
from t5x_like.serving import server as serve

LISTED = "http://tools.example:9000"
QUESTION = [{"role": "user", "content": "What is 2 + 3?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = chat_model.make(str(tmp_path_factory.mktemp("model")))
    db = os.path.join(path, feedback.DB_NAME)
    policy = security.Policy.from_flags("127.0.0.1", ["chat.example.org"], [LISTED + "/"])
    app = serve.create_app(runs.load(path), db_path=db, model_name="tiny", policy=policy,
                           limits=serve.Limits(max_tokens_limit=8))
    with chat_model.serving(app) as url:
        with httpx.Client(base_url=url, timeout=300) as http:
            yield http, db


def count(db, table):
    conn = sqlite3.connect(db)
    try:
        return conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0]
    finally:
        conn.close()


def ask(http, **extra):
    return http.post("/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 4,
                                                   "seed": 1, **extra})


@pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded",
                                          "multipart/form-data; boundary=x", None])
def test_a_body_that_is_not_declared_json_is_refused_415(server, content_type):
    http, db = server
    before = count(db, "responses")
    headers = {"Content-Type": content_type} if content_type else {}
    for path in ("/v1/chat/completions", "/v1/feedback"):
        r = http.post(path, content=json.dumps({"messages": QUESTION}).encode(),
                      headers=headers)
        assert r.status_code == 415, r.text
        assert "application/json" in r.json()["error"]["message"]
    assert count(db, "responses") == before


def test_host_must_be_this_server_a_loopback_name_an_ip_or_listed(server):
    http, _ = server
    port = str(http.base_url.port)
    for host, ok in [("attacker.example", False), (f"attacker.example:{port}", False),
                     ("127.0.0.1.attacker.example", False), (f"localhost:{port}", True),
                     (f"127.0.0.1:{port}", True), (f"[::1]:{port}", True), ("10.0.0.7", True),
                     ("chat.example.org", True), ("", False)]:
        r = http.get("/v1/models", headers={"Host": host})
        assert r.status_code == (200 if ok else 421), (host, r.text)
        if not ok:
            assert r.json()["error"]["code"] == "host_not_allowed"


def test_cors_is_off_except_for_listed_origins(server):
    http, _ = server
    preflight = {"Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "content-type"}
    r = http.options("/v1/chat/completions", headers={"Origin": "http://evil.example",
                                                      **preflight})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = http.options("/v1/chat/completions", headers={"Origin": LISTED, **preflight})
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == LISTED
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "Idempotency-Key" in r.headers["access-control-allow-headers"]
    # A request that skips the preflight (as a form or a text/plain fetch would) from another
    # site: refused before any route runs; from the listed origin: answered, with CORS headers.
    r = http.get("/v1/models", headers={"Origin": "http://localhost:1"})
    assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
    r = http.get("/v1/models", headers={"Origin": LISTED})
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == LISTED
    same = f"http://127.0.0.1:{http.base_url.port}"
    r = http.get("/v1/models", headers={"Origin": same})
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_the_page_has_a_strict_csp_and_its_libraries_are_served_from_the_package(server):
    http, _ = server
    r = http.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    csp = dict(d.strip().split(" ", 1) for d in r.headers["content-security-policy"].split(";"))
    assert csp["frame-ancestors"] == "'none'" and csp["default-src"] == "'none'"
    assert "'unsafe-inline'" not in csp["script-src"] and "'unsafe-eval'" not in csp["script-src"]
    assert r.headers["x-content-type-options"] == "nosniff"
    # Exactly the page's inline script is allowed, by its hash.
    [script] = re.findall(r"<script>(.*?)</script>", r.text, flags=re.S)
    import base64
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    assert csp["script-src"] == f"'self' 'sha256-{digest}'"
    # No request leaves this server: every src/href the page names is local.
    assert not re.findall(r"""(?:src|href)=["']?(?:https?:)?//""", r.text)
    for name in security.VENDOR_FILES:
        js = http.get(f"/vendor/{name}")
        assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
        assert js.headers["x-content-type-options"] == "nosniff"
    assert http.get("/vendor/..%2Findex.html").status_code == 404
    assert http.get("/vendor/LICENSE.marked").status_code == 404
    api = http.get("/health")
    assert api.headers["content-security-policy"].startswith("default-src 'none'")


def test_only_issued_conversation_ids_exist(server):
    http, db = server
    r = ask(http, conversation_id="conv-made-up")
    assert r.status_code == 404 and r.json()["error"]["param"] == "conversation_id"
    first = ask(http)
    assert first.status_code == 200, first.text
    conversation = first.json()["conversation_id"]
    messages = QUESTION + [{"role": "assistant", "content": first.json()["choices"][0]
                            ["message"]["content"]}, {"role": "user", "content": "And 4?"}]
    second = http.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 4,
                                                     "conversation_id": conversation})
    assert second.status_code == 200 and second.json()["conversation_id"] == conversation

    listed = http.get("/v1/conversations").json()["data"]
    assert listed[0]["id"] == conversation and listed[0]["title"] == "What is 2 + 3?"
    got = http.get(f"/v1/conversations/{conversation}").json()
    assert [t["role"] for t in got["turns"]] == ["user", "assistant"] * 2
    assert got["turns"][3]["alternatives"][0]["id"] == second.json()["id"]
    r = http.patch(f"/v1/conversations/{conversation}", json={"title": "Sums"})
    assert r.status_code == 200 and http.get("/v1/conversations").json()["data"][0]["title"] \
        == "Sums"
    assert http.delete(f"/v1/conversations/{conversation}").json()["responses"] == 2
    for r in (http.get(f"/v1/conversations/{conversation}"),
              http.delete(f"/v1/conversations/{conversation}"),
              ask(http, conversation_id=conversation)):
        assert r.status_code == 404, r.text
    assert http.get("/v1/conversations/..").status_code == 404


def test_a_retried_write_with_the_same_idempotency_key_is_answered_from_the_database(server):
    http, db = server
    before = (count(db, "responses"), count(db, "feedback"))
    key = {"Idempotency-Key": "retry-test-1"}
    body = {"messages": QUESTION, "max_tokens": 4, "temperature": 1.0}  # no seed: random
    first = http.post("/v1/chat/completions", json=body, headers=key)
    again = http.post("/v1/chat/completions", json=body, headers=key)
    assert first.status_code == again.status_code == 200
    assert again.headers["idempotent-replayed"] == "true"
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["choices"] == first.json()["choices"]
    streamed = http.post("/v1/chat/completions", json={**body, "stream": True}, headers={
        "Idempotency-Key": "retry-test-2"})
    replay = http.post("/v1/chat/completions", json={**body, "stream": True}, headers={
        "Idempotency-Key": "retry-test-2"})

    def text(r):
        chunks = [json.loads(line[6:]) for line in r.text.split("\n\n")
                  if line.startswith("data: {")]
        return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks
                       if c["choices"]), chunks[0]["id"]
    assert text(replay) == text(streamed) and replay.text.rstrip().endswith("[DONE]")
    other = http.post("/v1/chat/completions", json={**body, "max_tokens": 3}, headers=key)
    assert other.status_code == 422 and other.json()["error"]["code"] == "idempotency_key_reused"

    fb = {"response_id": first.json()["id"], "rating": "up"}
    ids = {http.post("/v1/feedback", json=fb, headers={"Idempotency-Key": "fb-1"}).json()["id"]
           for _ in range(3)}
    assert len(ids) == 1
    assert (count(db, "responses"), count(db, "feedback")) == (before[0] + 2, before[1] + 1)
    assert http.post("/v1/feedback", json=fb, headers={"Idempotency-Key": "bad key"}
                     ).status_code == 400


def test_an_empty_problem_report_is_refused(server):
    http, _ = server
    rid = ask(http).json()["id"]
    r = http.post("/v1/feedback", json={"response_id": rid, "problem_kind": "harm",
                                        "problem": " "})
    assert r.status_code == 400 and "needs 'problem'" in r.json()["error"]["message"]


def test_origin_and_host_parsing():
    same = security._same_origin
    assert same("http://127.0.0.1:8000", "http", "127.0.0.1:8000")
    assert same("http://[::1]:8000", "http", "[::1]:8000")
    assert same("https://chat.example.org", "https", "chat.example.org")  # behind a TLS proxy
    assert not same("http://localhost:3000", "http", "localhost:8000")  # another local port
    assert not same("https://127.0.0.1:8000", "http", "127.0.0.1:8000")
    assert not same("null", "http", "127.0.0.1:8000")
    policy = security.Policy.from_flags("0.0.0.0", ["chat.example.org"])
    assert not security.host_allowed(policy, "0.0.0.0.attacker.example")
    assert security.host_allowed(policy, "192.168.1.5:8000")
    assert security.host_allowed(policy, "Chat.Example.org.:8000")
    assert not security.host_allowed(policy, "0.0.0.0:8000.attacker.example")
    assert security.host_allowed(security.Policy.from_flags("myhost", ["*"]), "any.example")
    with pytest.raises(Exception, match="--cors_origins: 'tools.example' is not an origin"):
        security.Policy.from_flags("127.0.0.1", (), ["tools.example"])
