"""The chat server: an OpenAI-compatible API, a web chat page and the feedback database.

    python -m t5x_like.serve --workdir=runs/sft [--host=127.0.0.1 --port=8000] [--api_key=...]

The entry point only: the job is t5x_like/serving/server.py.
"""

if __name__ == "__main__":  # flags are defined only when run as a program (modules import freely)
    from absl import flags

    from t5x_like.core import cli
    from t5x_like.serving import feedback
    from t5x_like.serving.server import API_KEY_ENV, Limits, main

    flags.DEFINE_string("workdir", None, "Run or model directory to serve.", required=True)
    flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
    flags.DEFINE_string("host", "127.0.0.1", "Address to bind; 0.0.0.0 exposes it to the "
                        "network (use an API key then).")
    flags.DEFINE_integer("port", 8000, "Port to listen on.")
    flags.DEFINE_string("api_key", None, f"Require 'Authorization: Bearer <key>' on /v1 "
                        f"routes (default: ${API_KEY_ENV}; unset = no key).")
    flags.DEFINE_string("db", None, f"Feedback database (default: <workdir>/{feedback.DB_NAME}).")
    flags.DEFINE_string("model_name", None, "Model id in the API (default: the workdir's name).")
    flags.DEFINE_float("temperature", 0.7, "Temperature of requests that give none.")
    flags.DEFINE_integer("max_batch", 16, "Rows decoded together on the device (the engine's "
                         "slots).")
    flags.DEFINE_float("batch_wait_ms", 5.0, "--batching=static: how long a lone request waits "
                       "for others to share its batch.")
    flags.DEFINE_integer("max_len", 0, "Context: prompt + reply tokens (0 = model.max_len).")
    flags.DEFINE_integer("max_request_bytes", Limits.max_request_bytes, "Body size; 413 beyond.")
    flags.DEFINE_integer("max_messages", Limits.max_messages, "Messages per request; 400 beyond.")
    flags.DEFINE_integer("max_tokens_limit", Limits.max_tokens_limit,
                         "max_tokens a request may ask for; 400 beyond.")
    flags.DEFINE_integer("max_n", Limits.max_n, "Choices (n) per request; 400 beyond.")
    flags.DEFINE_integer("max_queue", Limits.max_queue, "Waiting requests; 503 beyond.")
    flags.DEFINE_float("body_timeout_s", Limits.body_timeout_s, "A request body that stops "
                       "arriving this long gets 408.")
    flags.DEFINE_enum("batching", "continuous", ["continuous", "static"], "continuous: rows "
                      "join and leave a fixed set of decode slots between steps, every program "
                      "compiled at start-up; static: batches decoded to their end (compiles "
                      "new shapes as they come).")
    flags.DEFINE_integer("prefill_chunk", 256, "Prompt tokens prefilled between two decode "
                         "steps (longer prompts in chunks); a power of two.")
    flags.DEFINE_string("compilation_cache", "", "JAX's persistent compilation cache directory "
                        "(default: $JAX_COMPILATION_CACHE_DIR, else ~/.cache/t5x_like/jax; "
                        "'off' for none): a restart loads its programs instead of compiling.")
    flags.DEFINE_integer("best_of", 1, "Sample this many replies per choice and answer with the "
                         "one --reward_model scores highest (replies then come whole).")
    flags.DEFINE_string("reward_model", None, "A task=reward run for --best_of.")
    flags.DEFINE_list("allowed_hosts", [], "Host names the server answers besides the bound "
                      "address, loopback names and IP addresses (e.g. chat.example.org); * = any.")
    flags.DEFINE_list("cors_origins", [], "Origins (scheme://host[:port]) of other sites' pages "
                      "allowed to call the API from a browser; none by default.")
    cli.run(main)
