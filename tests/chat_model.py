"""A chat model directory made in seconds for the serving tests: what `runs.load` reads.

A SentencePiece tokenizer (with the chat markers) trained on the synthetic task's text and
dialogues, a tiny Llama-style config, and randomly initialized parameters saved as a
parameters-only checkpoint, as `t5x_like.export` writes. Replies are noise, but every path of
the server (template, batching, sampling, storage) runs for real.
"""

import contextlib
import os
import socket
import threading
import time

import httpx

from configs import base
from data_pipelines import chat_template, synthetic
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.training import checkpoints
from t5x_like.core import config as config_lib
from t5x_like.modeling import model


def make(path: str, *, max_len: int = 128, seed: int = 0) -> str:
    os.makedirs(path, exist_ok=True)
    texts = [synthetic.text_document(i) for i in range(200)]
    texts += [chat_template.render(synthetic.dialogue(i)) for i in range(200)]
    tok = tokenizer_lib.train(texts, os.path.join(path, "tokenizer.model"), vocab_size=400)
    cfg = base.get_config()
    cfg.seed = seed
    cfg.model.update(dict(hidden_dim=32, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=64,
                          max_len=max_len))
    cfg = config_lib.resolve(cfg, tok.vocab_size)
    config_lib.save_json(cfg, os.path.join(path, "config.json"))
    checkpoints.save_params(path, 0, model.init_params(cfg.model, seed))
    return path


@contextlib.contextmanager
def serving(app):
    """Runs `app` under uvicorn on a free 127.0.0.1 port in a thread; yields its base URL."""
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_ready(proc, url: str, seconds: float) -> None:
    """Waits for a `python -m t5x_like.serve` process to answer /health with 200 (ready)."""
    deadline = time.monotonic() + seconds
    while True:
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "the server did not come up"
        time.sleep(0.5)
