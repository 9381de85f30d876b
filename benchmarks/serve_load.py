"""The server under load: static batching vs the continuous-batching engine, in one run.

    python -m benchmarks.serve_load [--config=configs/pretrain_tiny.py] [--max_len=640] \
        [--clients=16] [--requests=6] [--time_limit_s=300] [--max_tokens_limit=256] \
        [--modes=static,continuous] [--out=benchmarks/results]

For each mode a real server process (`python -m t5x_like.serve --batching=<mode>`) serves a
chat model with the config's sizes (random weights, a small SentencePiece tokenizer with the
chat markers, --max_len positions so 400-token prompts fit) on 127.0.0.1, and --clients
threads each send --requests chat completions one after another: prompts of about 10, 40,
100, 200 and 400 tokens, max_tokens 8 ("short"), 128 ("long") or omitted (up to
--max_tokens_limit, or what the context leaves), streamed or not, seeded, the same sequence in
both modes. The end-of-reply tokens are banned (logit_bias -100): a random model would end
some replies at once, so every reply makes all its tokens and long ones are long. Clients start
no new request after --time_limit_s. Static batching runs as the server did before the
engine, without a persistent compilation cache; the engine gets a fresh cache directory, so
its start-up compiles everything (`startup_s`), and a second start with the same directory
measures a warm restart (`restart_s`).

Reported per mode: latency p50/p95/max of all requests and of the short ones (the target:
short p95 at most 3x short p50 while long ones run), client-side time to first token of the
streamed ones, generated tokens/s over the load's wall time (the target: the engine at least
2x static), and the server's compilations during the load (from /metrics; the target: 0 for
the engine). The load average before each mode is recorded: other work on the machine skews
the numbers.
"""

import argparse
import concurrent.futures
import json
import os
import random
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

import httpx

from benchmarks import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PROMPT_TOKENS = (10, 40, 100, 200, 400)
MAX_TOKENS = (8, 128, None)  # short, long, omitted
KIND = {8: "short", 128: "long", None: "omitted"}


def build_model(config_path: str, directory: str, max_len: int) -> str:
    """A chat model directory (what `runs.load` reads) with the config's sizes."""
    from data_pipelines import chat_template, synthetic
    from data_pipelines import tokenizer as tokenizer_lib
    from t5x_like.core import config as config_lib
    from t5x_like.modeling import model
    from t5x_like.training import checkpoints

    os.makedirs(directory, exist_ok=True)
    texts = [synthetic.text_document(i) for i in range(400)]
    texts += [chat_template.render(synthetic.dialogue(i)) for i in range(400)]
    tok = tokenizer_lib.train(texts, os.path.join(directory, "tokenizer.model"),
                              vocab_size=1024)
    cfg = runpy.run_path(os.path.join(ROOT, config_path))["get_config"]()
    cfg.model.max_len = max_len
    cfg = config_lib.resolve(cfg, tok.vocab_size)
    config_lib.save_json(cfg, os.path.join(directory, "config.json"))
    checkpoints.save_params(directory, 0, model.init_params(cfg.model, 0))
    return directory


def workload(directory: str, clients: int, per_client: int, seed: int = 0) -> list[list[dict]]:
    """Each client's request bodies, in order: mixed prompt lengths, max_tokens and streaming."""
    from data_pipelines import chat_template, synthetic
    from data_pipelines import tokenizer as tokenizer_lib

    tok = tokenizer_lib.Tokenizer(os.path.join(directory, "tokenizer.model"))
    no_end = {str(t): -100 for t in chat_template.reply_stop_ids(tok)}
    source = tok.encode(" ".join(synthetic.text_document(i) for i in range(60)))
    rng = random.Random(seed)
    out = []
    for k in range(clients):
        bodies = []
        for i in range(per_client):
            j = k * per_client + i
            n = PROMPT_TOKENS[(j + k) % len(PROMPT_TOKENS)]
            start = rng.randrange(len(source) - n)
            body = {"model": "bench", "messages": [
                {"role": "user", "content": tok.decode(source[start:start + n])}],
                "seed": j, "stream": bool(j % 2), "logit_bias": no_end}
            max_tokens = MAX_TOKENS[(j // len(PROMPT_TOKENS) + j) % len(MAX_TOKENS)]
            if max_tokens is not None:
                body["max_tokens"] = max_tokens
            if body["stream"]:
                body["stream_options"] = {"include_usage": True}
            bodies.append(body)
        out.append(bodies)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(directory: str, batching: str, cache: str, flags: list[str], log_path: str):
    """(process, url, seconds until /health answered 200)."""
    port = free_port()
    env = dict(os.environ)
    env.pop("JAX_COMPILATION_CACHE_DIR", None)
    cmd = [sys.executable, "-m", "t5x_like.serve", f"--workdir={directory}", f"--port={port}",
           f"--batching={batching}", f"--compilation_cache={cache}",
           f"--db={os.path.join(directory, f'feedback-{batching}.sqlite')}", *flags]
    log = open(log_path, "ab")
    start = time.monotonic()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"the {batching} server exited ({proc.returncode}); see {log_path}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return proc, url, time.monotonic() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > 1800:
            proc.kill()
            raise RuntimeError(f"the {batching} server did not become ready; see {log_path}")
        time.sleep(0.25)


def stop_server(proc) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def compilations(url: str) -> float:
    for line in httpx.get(f"{url}/metrics", timeout=30).text.splitlines():
        if line.startswith("t5x_like_jax_compilations_total "):
            return float(line.split()[1])
    raise RuntimeError("/metrics has no t5x_like_jax_compilations_total")


def one_request(http: httpx.Client, body: dict) -> dict:
    start = time.perf_counter()
    first = None
    if body["stream"]:
        tokens = prompt = 0
        with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"{r.status_code}: {r.read()[:300]!r}")
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if first is None and any(c["delta"].get("content")
                                         for c in chunk.get("choices", [])):
                    first = time.perf_counter() - start
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                    prompt = chunk["usage"]["prompt_tokens"]
    else:
        r = http.post("/v1/chat/completions", json=body)
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:300]}")
        tokens = r.json()["usage"]["completion_tokens"]
        prompt = r.json()["usage"]["prompt_tokens"]
    return {"kind": KIND[body.get("max_tokens")], "stream": body["stream"], "prompt": prompt,
            "start": start,
            "latency": time.perf_counter() - start, "ttft": first, "tokens": tokens}


def run_load(url: str, bodies: list[list[dict]], time_limit_s: float) -> dict:
    deadline = time.monotonic() + time_limit_s
    records, errors = [], []
    lock = threading.Lock()

    def client(mine: list[dict]):
        with httpx.Client(base_url=url, timeout=1800) as http:
            for body in mine:
                if time.monotonic() > deadline:
                    return
                try:
                    rec = one_request(http, body)
                except Exception as e:  # noqa: BLE001 - counted and shown
                    with lock:
                        errors.append(str(e))
                    continue
                with lock:
                    records.append(rec)

    before = compilations(url)
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(len(bodies)) as pool:
        list(pool.map(client, bodies))
    wall = time.perf_counter() - start
    for rec in records:  # seconds into the load
        rec["start"] = round(rec["start"] - start, 3)
    return {"records": records, "errors": errors, "wall_s": wall,
            "compilations": compilations(url) - before}


def pct(values, q):
    values = sorted(values)
    if not values:
        return float("nan")
    return values[min(len(values) - 1, max(0, round(q / 100 * len(values) + 0.5) - 1))]


def summarize(mode: str, result: dict, startup_s: float, restart_s: float | None,
              load: float, load_after: float) -> dict:
    recs = result["records"]
    lat = [r["latency"] for r in recs]
    short = [r["latency"] for r in recs if r["kind"] == "short"]
    ttft = [r["ttft"] for r in recs if r["ttft"] is not None]
    tokens = sum(r["tokens"] for r in recs)
    return {
        "mode": mode, "load_1m_before": round(load, 2), "load_1m_after": round(load_after, 2),
        "requests": len(recs),
        "errors": len(result["errors"]), "startup_s": round(startup_s, 1),
        "restart_s": None if restart_s is None else round(restart_s, 1),
        "p50_s": round(pct(lat, 50), 3), "p95_s": round(pct(lat, 95), 3),
        "max_s": round(max(lat, default=float("nan")), 3),
        "short_p50_s": round(pct(short, 50), 3), "short_p95_s": round(pct(short, 95), 3),
        "short_p95/p50": round(pct(short, 95) / pct(short, 50), 2) if short else None,
        "ttft_p50_s": round(pct(ttft, 50), 3), "ttft_p95_s": round(pct(ttft, 95), 3),
        "tokens": tokens, "wall_s": round(result["wall_s"], 1),
        "tokens_per_s": round(tokens / result["wall_s"], 1),
        "compilations_during_load": int(result["compilations"])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/pretrain_tiny.py")
    p.add_argument("--max_len", type=int, default=640)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--requests", type=int, default=6, help="per client")
    p.add_argument("--time_limit_s", type=float, default=300)
    p.add_argument("--max_tokens_limit", type=int, default=256)
    p.add_argument("--modes", default="static,continuous")
    p.add_argument("--workdir", default="", help="keep the model and logs here")
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results"))
    args = p.parse_args(argv)

    directory = args.workdir or tempfile.mkdtemp(prefix="serve-load-")
    model_dir = os.path.join(directory, "model")
    if not os.path.exists(os.path.join(model_dir, "config.json")):
        build_model(args.config, model_dir, args.max_len)
    bodies = workload(model_dir, args.clients, args.requests)
    flags = [f"--max_tokens_limit={args.max_tokens_limit}", f"--max_batch={args.clients}",
             "--model_name=bench", "--max_queue=1024"]
    rows, records = [], {}
    for mode in args.modes.split(","):
        load = os.getloadavg()[0]
        log = os.path.join(directory, f"server-{mode}.log")
        restart = None
        if mode == "continuous":
            cache = os.path.join(directory, "jax-cache")
            shutil.rmtree(cache, ignore_errors=True)
            proc, url, startup = start_server(model_dir, mode, cache, flags, log)
            stop_server(proc)
            proc, url, restart = start_server(model_dir, mode, cache, flags, log)
        else:
            proc, url, startup = start_server(model_dir, mode, "off", flags, log)
        try:
            print(f"{mode}: ready in {startup:.1f} s; {args.clients} clients x "
                  f"{args.requests} requests ...", flush=True)
            result = run_load(url, bodies, args.time_limit_s)
        finally:
            stop_server(proc)
        for e in result["errors"][:5]:
            print(f"  error: {e}")
        rows.append(summarize(mode, result, startup, restart, load, os.getloadavg()[0]))
        records[mode] = result["records"]
    extra = {"records": records, "config": args.config, "max_len": args.max_len, "clients": args.clients,
             "requests_per_client": args.requests, "max_tokens_limit": args.max_tokens_limit,
             "time_limit_s": args.time_limit_s}
    common.report("serve_load", rows, args.out, extra)
    if len(rows) == 2 and rows[0]["tokens_per_s"]:
        ratio = rows[1]["tokens_per_s"] / rows[0]["tokens_per_s"]
        print(f"{rows[1]['mode']} / {rows[0]['mode']} tokens/s: {ratio:.2f}x")
    if not args.workdir:
        shutil.rmtree(directory, ignore_errors=True)


if __name__ == "__main__":
    main()
