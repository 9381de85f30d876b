"""The whole lifecycle in one command, with a report card.

    python -m t5x_like.lifecycle --config=configs/lifecycle/demo.py --workdir=runs/lifecycle
    (or: bash launch/lifecycle.sh [--recipe=demo] [--data=../shared/data] [--quick])

Runs the recipe's stages in order (configs/lifecycle/demo.py documents the kinds), each as the
ordinary command a user would type, in <workdir>/<stage>/. A stage that finished is skipped on a
rerun (lifecycle.json records it), and train stages resume from their checkpoints, so an
interrupted lifecycle continues where it stopped. At the end, and after a failure, it writes
<workdir>/report.md: per stage its command, wall time, tokens and final metrics; loss curves of
every train stage on one page; held-out accuracy per evaluation as a table and a chart; sample
conversations before and after each tuning stage; what the feedback round collected and used.
"""

import concurrent.futures
import glob
import json
import os
import secrets
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

from absl import flags, logging

from t5x_like.core import files
from t5x_like.core.errors import UserError

KINDS = ("prepare", "import", "train", "eval", "export", "hf_export", "feedback")
STATE = "lifecycle.json"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


# ---------------------------------------------------------------------------------------------
# Book-keeping: which stages are done, written atomically.


def load_state(workdir: str) -> dict:
    path = os.path.join(workdir, STATE)
    if not os.path.exists(path):
        return {"stages": {}}
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def save_state(workdir: str, state: dict) -> None:
    files.atomic_write_json(os.path.join(workdir, STATE), state)


def stage_names(cfg) -> list[str]:
    names = [n.strip() for n in cfg.order.split(",") if n.strip()]
    for n in names:
        if n not in cfg.stages:
            raise UserError(f"config key 'order' names stage {n!r}, which config.stages does not "
                            f"define (it has {', '.join(cfg.stages)}).")
        st = cfg.stages[n]
        if st.kind not in KINDS:
            raise UserError(f"config key 'stages.{n}.kind' is {st.kind!r}; use one of "
                            f"{', '.join(KINDS)}.")
        for key in ("init_from", "run", "data_from"):
            ref = st.get(key, "")
            if ref and (ref not in names or names.index(ref) >= names.index(n)):
                raise UserError(f"config key 'stages.{n}.{key}' is {ref!r}, which is not a stage "
                                f"that runs before {n!r} in 'order'.")
    return names


# ---------------------------------------------------------------------------------------------
# Running one stage.


def _run(cmd: list[str], log_path: str) -> None:
    """Runs a job, its output to log_path; a failure names the command and the log's end."""
    logging.info("$ %s", " ".join(shlex.quote(c) for c in cmd))
    with open(log_path, "ab") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=REPO).returncode
    if code:
        with open(log_path, "rb") as f:
            tail = f.read()[-1500:].decode("utf-8", "replace")
        raise RuntimeError(f"stage command failed (exit {code}): {' '.join(cmd)}\n"
                           f"log {log_path} ends with:\n{tail}")


def _args(cfg, st) -> list[str]:
    text = st.quick_args if cfg.quick and st.quick_args else st.args
    return shlex.split(text.replace("{data}", os.path.abspath(cfg.data_root)))


def _quick_train_args(cfg, st) -> list[str]:
    if not cfg.quick:
        return []
    n = cfg.quick_steps
    args = [f"--config.steps={n}", "--config.eval.steps=2", f"--config.eval.every_steps={n}",
            f"--config.checkpoint.every_steps={n}", "--config.data.synthetic_docs=300",
            "--config.log_every_steps=1"]
    if not st.init_from:  # later stages take the model from init_from
        args += [f"--config.{a}" for a in shlex.split(cfg.quick_model)]
    return args


def prepare_stage(cfg, name, st, workdir, record) -> None:
    out = os.path.join(workdir, name)
    cmd = [sys.executable, "-m", "data_pipelines.prepare", f"--config={st.config}",
           f"--out={out}"] + [a if a.startswith("--") else f"--config.{a}" for a in _args(cfg, st)]
    record["command"] = cmd
    _run(cmd, os.path.join(workdir, f"{name}.log"))
    record["run"] = out


def _expand(arg: str, workdir: str) -> str:
    """{stage:NAME} in a stage argument is that stage's directory."""
    while "{stage:" in arg:
        start = arg.index("{stage:")
        end = arg.index("}", start)
        arg = arg[:start] + os.path.join(workdir, arg[start + 7:end]) + arg[end + 1:]
    return arg


def train_stage(cfg, name, st, workdir, record) -> None:
    out = os.path.join(workdir, name)
    # On a TPU pod the launcher runs the same train command on every worker (launch/).
    launcher = shlex.split(cfg.train_launcher) or [sys.executable, "-m", "t5x_like.train"]
    cmd = launcher + [f"--config={st.config}", f"--workdir={out}"]
    if st.init_from:
        cmd.append(f"--config.init_from={os.path.join(workdir, st.init_from)}")
    if st.data_from:
        pairs = os.path.join(workdir, st.data_from, "train_pairs.jsonl")
        cmd.append(f"--config.data.source=preference:{pairs}")
    cmd += [_expand(a if a.startswith("--") else f"--config.{a}", workdir)
            for a in _args(cfg, st)]
    cmd += _quick_train_args(cfg, st)
    record["command"] = cmd
    _run(cmd, os.path.join(workdir, f"{name}.log"))
    record["run"] = out


def eval_stage(cfg, name, st, workdir, record) -> None:
    run = os.path.join(workdir, st.run)
    cmd = [sys.executable, "-m", "t5x_like.evaluate", f"--workdir={run}",
           f"--config={st.suite}", f"--checkpoint={st.checkpoint}"]
    cmd += [a if a.startswith("--") else f"--config.{a}" for a in _args(cfg, st)]
    record["command"] = cmd
    started = time.time()
    _run(cmd, os.path.join(workdir, f"{name}.log"))
    results = [p for p in glob.glob(os.path.join(run, "eval", "*", "results.json"))
               if os.path.getmtime(p) >= started - 1]
    if not results:
        raise RuntimeError(f"stage {name}: evaluate wrote no results under {run}/eval/")
    with open(max(results, key=os.path.getmtime), encoding="utf-8") as f:
        record["results"] = json.load(f)


def export_stage(cfg, name, st, workdir, record) -> None:
    out = os.path.join(workdir, name)
    cmd = [sys.executable, "-m", "t5x_like.export", f"--workdir={os.path.join(workdir, st.run)}",
           f"--out={out}"] + _args(cfg, st)
    record["command"] = cmd
    remove_export(out)  # an export that finished before lifecycle.json recorded it
    _run(cmd, os.path.join(workdir, f"{name}.log"))
    record["run"] = out


# What `t5x_like.export` writes into a model directory (export.py; base.json: PEFT adapters).
EXPORT_ENTRIES = frozenset({"config.json", "tokenizer.model", "checkpoints", "base.json",
                            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                            "generation_config.json", "chat_template.jinja"})


# What `t5x_like.hf export` writes into a Hugging Face folder.
HF_EXPORT_ENTRIES = frozenset({"config.json", "model.safetensors", "tokenizer.model",
                               "tokenizer.json", "tokenizer_config.json",
                               "special_tokens_map.json", "generation_config.json",
                               "chat_template.jinja"})


def remove_export(out: str, entries_written: frozenset = EXPORT_ENTRIES) -> None:
    """Removes `out` if it is a model directory that export wrote (or an empty folder), so the
    stage can export again; anything else there is the user's, and stops with a UserError.
    `entries_written`: what the stage's command writes (export and hf import: a model
    directory; hf export: HF_EXPORT_ENTRIES)."""
    if not os.path.lexists(out):
        return
    entries = set(os.listdir(out)) if os.path.isdir(out) and not os.path.islink(out) else None
    if entries is not None and (not entries or (
            "config.json" in entries and entries <= entries_written)):
        import shutil
        shutil.rmtree(out)
        return
    raise UserError(f"{out} already exists and is not a model directory that t5x_like.export "
                    "wrote; move it away or choose another lifecycle workdir (it is never "
                    "deleted).")


def import_stage(cfg, name, st, workdir, record) -> None:
    """`python -m t5x_like.hf import` of the recipe's hf_dir (--hf_dir) into <workdir>/<stage>:
    a model directory the next stages take as init_from."""
    hf_dir = os.path.abspath(os.path.expanduser(cfg.get("hf_dir", "") or ""))
    if not cfg.get("hf_dir") or not os.path.isdir(hf_dir):
        where = f"{cfg.hf_dir} is not a folder" if cfg.get("hf_dir") else "no folder was given"
        raise UserError(f"stage {name} imports a Hugging Face model and {where}; pass the "
                        "model's folder (config.json, *.safetensors, tokenizer files) with "
                        "--hf_dir=<dir> (config key 'hf_dir').")
    out = os.path.join(workdir, name)
    cmd = [sys.executable, "-m", "t5x_like.hf", "import", f"--hf_dir={hf_dir}",
           f"--out={out}"] + _args(cfg, st)
    record["command"] = cmd
    remove_export(out)  # an import that finished before lifecycle.json recorded it
    _run(cmd, os.path.join(workdir, f"{name}.log"))
    record["run"], record["hf_dir"] = out, hf_dir


def hf_export_stage(cfg, name, st, workdir, record) -> None:
    """`python -m t5x_like.hf export` of <run> into <workdir>/<stage>: a folder transformers
    loads (its class, the tokenizer files as imported, the run's chat template)."""
    out = os.path.join(workdir, name)
    cmd = [sys.executable, "-m", "t5x_like.hf", "export",
           f"--workdir={os.path.join(workdir, st.run)}", f"--out={out}"] + _args(cfg, st)
    record["command"] = cmd
    remove_export(out, HF_EXPORT_ENTRIES)
    _run(cmd, os.path.join(workdir, f"{name}.log"))
    with open(os.path.join(out, "config.json"), encoding="utf-8") as f:
        record["architectures"] = json.load(f).get("architectures")
    record["run"] = out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict, timeout: float = 600) -> dict:
    """POSTs `body`; a dropped connection is retried under the same Idempotency-Key, so the
    server answers a retry with what it stored instead of storing a second row."""
    req = urllib.request.Request(url, json.dumps(body).encode(), method="POST", headers={
        "Content-Type": "application/json", "Idempotency-Key": secrets.token_hex(16)})
    for attempt in range(3):
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            if e.code != 409 or attempt == 2:  # 409: the first try is still being answered
                raise
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if attempt == 2:
                raise
        time.sleep(1 + attempt)


def demo_judge(messages: list[dict], replies: list[str]) -> list[tuple[str, str | None]]:
    """The demo's simulated user: (rating, correction) per reply from the exact answer."""
    from data_pipelines import synthetic
    question = messages[-1]["content"]
    right = str(synthetic.parse_question(question).answer)
    return [("up", None) if synthetic.check_answer(question, r) else ("down", right)
            for r in replies]


def reward_judge(run_dir: str):
    """A simulated user for open-ended chat: of the replies to one prompt, the reward model's
    favourite is rated up and the others down (no corrections)."""
    from t5x_like.evaluation import reward_model
    from t5x_like.core import runs
    rm = reward_model.RewardModel(runs.load(run_dir))

    def judge(messages, replies):
        scores = rm.score([messages] * len(replies), replies)
        best = max(range(len(replies)), key=lambda i: scores[i])
        return [("up" if i == best else "down", None) for i in range(len(replies))]
    return judge


def simulated_conversations(source: str, n: int, data_root: str) -> list[list[dict]]:
    """The prompts simulated users send: training-split demo questions (evaluation only ever
    asks held-out ones), or the first user turns of a chat JSONL / Alpaca file."""
    from data_pipelines import synthetic
    if source == "demo":
        return [synthetic.answer_pair(i, "train", seed=7)["prompt"] for i in range(n)]
    path = source.replace("{data}", os.path.abspath(data_root))
    with open(path, encoding="utf-8") as f:
        text = f.read()
    records = json.loads(text) if text.lstrip().startswith("[") else files.read_jsonl(path)
    prompts = []
    for r in records:
        if "messages" in r:
            user = next((m["content"] for m in r["messages"] if m["role"] == "user"), None)
        else:  # Alpaca
            user = "\n\n".join(x for x in (r.get("instruction", ""), r.get("input", "")) if x)
        if user:
            prompts.append([{"role": "user", "content": user}])
        if len(prompts) == n:
            break
    return prompts


def feedback_stage(cfg, name, st, workdir, record) -> None:
    opts = dict(a.split("=", 1) for a in _args(cfg, st))
    conversations = simulated_conversations(opts.get("prompts", "demo"),
                                            int(opts.get("conversations", 32)), cfg.data_root)
    judge_spec = opts.get("judge", "demo")
    judge = (demo_judge if judge_spec == "demo"
             else reward_judge(os.path.join(workdir, judge_spec.split(":", 1)[1])))
    out = os.path.join(workdir, name)
    os.makedirs(out, exist_ok=True)
    db = os.path.join(out, "feedback.db")
    for stale in glob.glob(db + "*"):  # a half-finished earlier attempt
        os.remove(stale)
    port = _free_port()
    serve = [sys.executable, "-m", "t5x_like.serve", f"--workdir={os.path.join(workdir, st.run)}",
             f"--port={port}", f"--db={db}"]
    record["command"] = serve
    log = open(os.path.join(workdir, f"{name}.log"), "ab")
    server = subprocess.Popen(serve, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 600
        while True:
            if server.poll() is not None:
                raise RuntimeError(f"stage {name}: the server exited ({server.returncode}); see "
                                   f"{log.name}")
            try:
                urllib.request.urlopen(base + "/health", timeout=5).read()
                break
            except OSError:
                if time.time() > deadline:
                    raise RuntimeError(f"stage {name}: the server did not answer /health in "
                                       "10 minutes") from None
                time.sleep(1)

        def one(messages):
            reply = _post(base + "/v1/chat/completions", {
                "model": "lifecycle", "messages": messages,
                "max_tokens": int(opts.get("max_tokens", 8)),
                "n": int(opts.get("n", 1)), "temperature": float(opts.get("temperature", 0.8))})
            choices = reply["choices"]
            verdicts = judge(messages, [c["message"]["content"] for c in choices])
            rated = []
            for choice, (rating, correction) in zip(choices, verdicts):
                body = {"response_id": reply["id"], "index": choice["index"], "rating": rating}
                if correction is not None:
                    body["correction"] = correction
                _post(base + "/v1/feedback", body)
                rated.append(rating)
            return rated

        # Users arrive together, so the server batches them on the device.
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            ratings = [r for rs in pool.map(one, conversations) for r in rs]
    finally:
        server.terminate()
        try:
            server.wait(60)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
    record["feedback"] = {"conversations": len(conversations), "replies": len(ratings),
                          "up": ratings.count("up"), "down": ratings.count("down")}
    # Which feedback the next stage trains on: reviewed_only=1 takes corrections and reports
    # only once a review approved them (python -m t5x_like.feedback review/verdicts on the
    # stage's feedback.db); by default the simulated users' judge is taken as it is.
    from t5x_like.serving import feedback as feedback_lib
    reviewed_only = opts.get("reviewed_only", "0") not in ("0", "false", "False", "")
    record["feedback"]["export"] = "reviewed_only" if reviewed_only else "unreviewed"
    for fmt in ("preference", "sft"):
        path = os.path.join(out, f"{fmt}.jsonl")
        counts = feedback_lib.export(db, path, fmt, reviewed_only=reviewed_only)
        record["feedback"][f"{fmt}_records"] = counts["written"]
        record["feedback"][f"{fmt}_left_out"] = {
            k: counts[k] for k in ("length_cut", "replacement_char", "empty_reports",
                                   "rejected", "unreviewed", "duplicates") if counts.get(k)}
    if not record["feedback"]["preference_records"]:
        raise RuntimeError(f"stage {name}: the feedback gave no preference pairs (every reply "
                           "was rated up); ask more conversations or raise the temperature.")
    # A round gives a handful of pairs: too few to hold some out, and DPO on them alone drifts.
    # replay=N adds N of the task's own training pairs (the demo's) to what the next stage uses.
    replay = int(opts.get("replay", 0))
    with open(os.path.join(out, "preference.jsonl"), encoding="utf-8") as f:
        pairs = [line for line in f if line.strip()]
    if replay:
        from data_pipelines import synthetic
        pairs += [json.dumps(synthetic.answer_pair(i, "train", seed=11)) + "\n"
                  for i in range(replay)]
    files.atomic_write_text(os.path.join(out, "train_pairs.jsonl"), "".join(pairs))
    record["feedback"]["replayed_pairs"] = replay


RUNNERS = {"prepare": prepare_stage, "import": import_stage, "train": train_stage,
           "eval": eval_stage, "export": export_stage, "hf_export": hf_export_stage,
           "feedback": feedback_stage}


def run_lifecycle(cfg, workdir: str) -> dict:
    """Runs every stage not yet done; writes the report (also after a failure). Returns the
    state (lifecycle.json)."""
    names = stage_names(cfg)
    workdir = os.path.abspath(workdir)
    os.makedirs(workdir, exist_ok=True)
    state = load_state(workdir)
    if state.get("quick", cfg.quick) != cfg.quick:
        raise UserError(f"{workdir} holds a {'quick' if state['quick'] else 'full'} lifecycle; "
                        "use another --workdir (or the same --quick setting) to resume it.")
    state["recipe"], state["quick"] = cfg.name, cfg.quick
    given = cfg.get("hf_dir")
    for n, rec in state["stages"].items():  # later stages trained on what was imported then
        if given and rec.get("hf_dir") and os.path.abspath(os.path.expanduser(given)) != \
                rec["hf_dir"]:
            raise UserError(f"{workdir} imported {rec['hf_dir']} (stage {n}), not --hf_dir="
                            f"{given}; use another --workdir for another model.")
    try:
        for name in names:
            done = state["stages"].get(name, {})
            if done.get("done"):
                logging.info("stage %s: done before (%.0f s), skipped", name, done["wall_s"])
                continue
            st = cfg.stages[name]
            record = {"kind": st.kind}
            logging.info("stage %s (%s) ...", name, st.kind)
            start = time.time()
            RUNNERS[st.kind](cfg, name, st, workdir, record)
            record["wall_s"] = time.time() - start
            record["done"] = True
            state["stages"][name] = record
            save_state(workdir, state)
            logging.info("stage %s: done in %.0f s", name, record["wall_s"])
    finally:
        from t5x_like.experiments import lifecycle_report
        path = lifecycle_report.write(cfg, workdir, state, names)
        logging.info("report: %s", path)
    return state


def main(argv):
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {argv[1:]}; options look like --config.x=y.")
    f = flags.FLAGS
    cfg = f.config
    if f.quick:
        cfg.quick = True
    if f.data:
        cfg.data_root = f.data
    if f.hf_dir:
        if "hf_dir" not in cfg:
            raise UserError(f"--hf_dir: recipe {cfg.name!r} imports no Hugging Face model; use "
                            "--recipe=hf (configs/lifecycle/hf.py).")
        cfg.hf_dir = f.hf_dir
    workdir = f.workdir or os.path.join("runs", f"lifecycle-{cfg.name}" + ("-quick" * cfg.quick))
    state = run_lifecycle(cfg, workdir)
    total = sum(s["wall_s"] for s in state["stages"].values())
    print(f"lifecycle {cfg.name}: {len(state['stages'])} stages, {total / 60:.1f} min; "
          f"report: {os.path.join(os.path.abspath(workdir), 'report.md')}")
