"""The feedback loop under load, a kill -9 included: what the database and its export hold.

    python -m benchmarks.feedback_load [--workdir=runs/sft] [--conversations=200] [--turns=3]
        [--clients=16] [--max_tokens=24] [--kill_after=150] [--out=/tmp/feedback_load]

Serves --workdir (default: a tiny random chat model built in --out, whose replies are noise:
many run into max_tokens and many hold U+FFFD, which is what the export must leave out) with
`python -m t5x_like.serve`, and has --clients threads hold --conversations conversations of
--turns turns through the API, as the page does (conversation_id, parent_id, an
Idempotency-Key per write). After each reply a simulated user rates it up or down, corrects
it, reports it (with text, or, as the old page let people, with a kind alone: refused now), or
says nothing. After --kill_after completions the server is killed with SIGKILL and started
again; clients whose requests were cut retry them under the same key, so a reply the server had
stored comes back from the database instead of being stored twice.

Writes <out>/load.json: requests, retries, retries answered from the database, refused empty
reports, rows per table, completions per Idempotency-Key (must be 1), and the counts of the
sft and preference exports (written, and left out by reason).
"""

import argparse
import concurrent.futures
import json
import os
import random
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_model(path: str) -> str:
    """A random-initialized chat model directory (as tests/chat_model.py makes)."""
    from configs import base
    from data_pipelines import chat_template, synthetic
    from data_pipelines import tokenizer as tokenizer_lib
    from t5x_like.core import config as config_lib
    from t5x_like.modeling import model
    from t5x_like.training import checkpoints

    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    os.makedirs(path, exist_ok=True)
    texts = [synthetic.text_document(i) for i in range(200)]
    texts += [chat_template.render(synthetic.dialogue(i)) for i in range(200)]
    tok = tokenizer_lib.train(texts, os.path.join(path, "tokenizer.model"), vocab_size=400)
    cfg = base.get_config()
    cfg.model.update(dict(hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                          max_len=256))
    cfg = config_lib.resolve(cfg, tok.vocab_size)
    config_lib.save_json(cfg, os.path.join(path, "config.json"))
    checkpoints.save_params(path, 0, model.init_params(cfg.model, 0))
    return path


class Server:
    def __init__(self, workdir: str, db: str, log: str, max_tokens: int):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.cmd = [sys.executable, "-m", "t5x_like.serve", f"--workdir={workdir}",
                    f"--port={self.port}", f"--db={db}", f"--max_tokens_limit={max_tokens}",
                    "--max_batch=16"]
        self.log = open(log, "ab")
        self.proc = None
        self.up = threading.Event()

    def start(self) -> None:
        self.proc = subprocess.Popen(self.cmd, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=ROOT)
        deadline = time.time() + 300
        while time.time() < deadline:
            try:
                urllib.request.urlopen(self.url + "/health", timeout=5).read()
                self.up.set()
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"the server exited; see {self.log.name}")
                time.sleep(0.5)
        raise RuntimeError("the server did not start")

    def kill(self) -> None:
        self.up.clear()
        self.proc.send_signal(signal.SIGKILL)  # no shutdown, no flush: as a crash would
        self.proc.wait()

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(60)
        self.log.close()


class Client:
    """POSTs JSON with an Idempotency-Key; retries a dropped connection under the same key."""

    def __init__(self, server: Server, stats):
        self.server, self.stats, self.lock = server, stats, threading.Lock()

    def count(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.stats[key] = self.stats.get(key, 0) + n

    def post(self, path: str, body: dict) -> tuple[int, dict, bool]:
        key = uuid.uuid4().hex
        data = json.dumps(body).encode()
        for attempt in range(60):
            self.server.up.wait(300)
            req = urllib.request.Request(self.server.url + path, data, method="POST", headers={
                "Content-Type": "application/json", "Idempotency-Key": key})
            try:
                with urllib.request.urlopen(req, timeout=300) as r:
                    replayed = r.headers.get("Idempotent-Replayed") == "true"
                    self.count("requests")
                    if attempt:
                        self.count("retried_requests")
                    if replayed:
                        self.count("answered_from_database")
                    return r.status, json.loads(r.read()), replayed
            except urllib.error.HTTPError as e:
                if e.code == 409:  # the first try is still being answered
                    time.sleep(0.5)
                    continue
                self.count("requests")
                return e.code, json.loads(e.read() or b"{}"), False
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                self.count("connection_errors")
                time.sleep(0.5)
        raise RuntimeError(f"{path}: no answer after 60 tries")


def conversation(client: Client, rng: random.Random, i: int, turns: int, max_tokens: int,
                 on_completion) -> None:
    from data_pipelines import synthetic
    messages, conversation_id, parent = [], None, None
    for t in range(turns):
        question = synthetic.dialogue(1000 * i + t)[-2]["content"]  # its user turn
        messages.append({"role": "user", "content": question})
        body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.9}
        if conversation_id:
            body.update(conversation_id=conversation_id, parent_id=parent)
        status, reply, _ = client.post("/v1/chat/completions", body)
        if status == 400 and "context" in json.dumps(reply):
            return  # the conversation outgrew the context: the page would drop turns
        if status != 200:
            raise RuntimeError(f"completion: {status} {reply}")
        on_completion()
        conversation_id, parent = reply["conversation_id"], reply["id"]
        text = reply["choices"][0]["message"]["content"]
        messages.append({"role": "assistant", "content": text})
        roll = rng.random()
        fb = {"response_id": reply["id"], "conversation_id": conversation_id}
        if roll < 0.35:
            fb["rating"] = "up"
        elif roll < 0.55:
            fb["rating"] = "down"
        elif roll < 0.65:
            fb.update(rating="down", correction=f"A better answer to turn {t}.")
        elif roll < 0.72:
            fb.update(problem="it makes no sense", problem_kind="error")
        elif roll < 0.78:
            fb.update(problem_kind="other")  # an empty report, as the old form sent
        else:
            continue
        status, answer, _ = client.post("/v1/feedback", fb)
        if status == 400 and "problem_kind" in fb and "problem" not in fb:
            client.count("empty_reports_refused")
        elif status != 200:
            raise RuntimeError(f"feedback: {status} {answer}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", default="")
    parser.add_argument("--conversations", type=int, default=200)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max_tokens", type=int, default=24)
    parser.add_argument("--kill_after", type=int, default=150)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="/tmp/feedback_load")
    args = parser.parse_args()
    from t5x_like.serving import feedback

    os.makedirs(args.out, exist_ok=True)
    workdir = args.workdir or tiny_model(os.path.join(args.out, "model"))
    db = os.path.join(args.out, "feedback.sqlite")
    for stale in (db, db + "-wal", db + "-shm"):
        if os.path.exists(stale):
            os.remove(stale)
    server = Server(workdir, db, os.path.join(args.out, "server.log"), args.max_tokens)
    server.start()
    stats: dict = {}
    client = Client(server, stats)
    done = [0]
    lock = threading.Lock()

    def on_completion():
        with lock:
            done[0] += 1
            if done[0] == args.kill_after:
                stats["killed_at_completion"] = done[0]
                server.kill()
                threading.Thread(target=server.start, daemon=True).start()

    start = time.time()
    with concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
        jobs = [pool.submit(conversation, client, random.Random(args.seed * 7919 + i), i,
                            args.turns, args.max_tokens, on_completion)
                for i in range(args.conversations)]
        for job in jobs:
            job.result()
    stats["seconds"] = round(time.time() - start, 1)
    server.up.wait(300)
    server.stop()

    conn = sqlite3.connect(db)
    stats["rows"] = {t: conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]
                     for t in ("conversations", "responses", "feedback", "idempotency")}
    stats["completions_per_key_max"] = conn.execute(
        "SELECT COALESCE(MAX(c), 0) FROM (SELECT COUNT(*) c FROM responses r JOIN idempotency i "
        "ON i.target = r.id AND i.route = 'completion' GROUP BY i.key)").fetchone()[0]
    stats["finish_reasons"] = dict(conn.execute(
        "SELECT finish_reason, COUNT(*) FROM responses GROUP BY finish_reason").fetchall())
    stats["replies_with_U+FFFD"] = conn.execute(
        "SELECT COUNT(*) FROM responses WHERE instr(content, char(65533)) > 0").fetchone()[0]
    conn.close()
    for fmt in ("sft", "preference"):
        stats[f"export_{fmt}"] = feedback.export(db, os.path.join(args.out, f"{fmt}.jsonl"), fmt)
    with open(os.path.join(args.out, "load.json"), "w") as f:
        json.dump(stats, f, indent=2)
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
