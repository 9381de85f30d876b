"""Running an evaluation suite on one checkpoint of a run, and writing what it found.

    results = run_suite(run, suite, workdir)     every task of configs/eval/<suite>.py

A likelihood task feeds its records through the training pipeline (packing, loss weights) and
`tasks/lm.evaluate`, the very code behind the validation lines training logs, so the numbers
agree with training's. A generation task templates each prompt (chat_template.prompt, or plain
text for models that only continue text), generates with the KV-cache Decoder in batches of
prompts of similar length, reads each reply up to <|end|> (or a stop string), and scores the
replies with eval_metrics.

Outputs, all under `<workdir>/eval/<step>/` and each written under a temporary name first:

    results.json        every task's metrics, example count, settings and seconds; tasks of
                        earlier suites at this step are kept unless run again
    results.md          the same as a markdown table (also printed)
    <task>.jsonl        generation: prompt, prediction, references and per-example scores
and one line per task in `<workdir>/metrics.jsonl`: {"step", "split": "eval/<task>", ...}.
"""

import collections
import dataclasses
import difflib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from absl import logging

from data_pipelines import chat_template, pipeline
from t5x_like.core import config as config_lib
from t5x_like.core import files
from t5x_like.modeling import decoding
from t5x_like.evaluation import eval_metrics
from t5x_like.evaluation import eval_tasks
from t5x_like.evaluation import results
from t5x_like.modeling import partitioning
from t5x_like.training.tasks import lm
from t5x_like.core.errors import UserError

SUITE_KEYS = ("batch_size", "seed", "data_dir", "only", "tasks")
TASK_KEYS = ("kind", "source", "n", "metrics", "template", "system", "max_new_tokens",
             "temperature", "top_k", "top_p", "stop_strings", "split", "loss_on", "max_len",
             "num_fewshot")
KINDS = ("generate", "likelihood")  # and "harness:<lm-eval task>" (harness.py)
TEMPLATES = ("chat", "plain")


# ---------------------------------------------------------------------------------------------
# The suite config.


def _unknown(key: str, where: str, known) -> UserError:
    close = difflib.get_close_matches(key.rsplit(".", 1)[-1], known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return UserError(f"config key '{where}' is unknown.{hint} See t5x_like/evaluation/suites.py.")


def validate(suite) -> list[str]:
    """Checks the suite config; returns the names of the tasks to run, in name order."""
    for key in suite.keys():
        if key not in SUITE_KEYS:
            raise _unknown(key, key, SUITE_KEYS)
    for key in SUITE_KEYS:
        if key not in suite:
            raise UserError(f"config key '{key}' is missing; build suites with "
                            "suites.suite() (configs/eval/common.py).")
    if suite.batch_size < 1:
        raise UserError(f"config key 'batch_size': {suite.batch_size} must be positive.")
    names = sorted(suite.tasks.keys())
    only = [x.strip() for x in suite.only.split(",") if x.strip()]
    for name in only:
        if name not in names:
            raise UserError(f"config key 'only': no task {name!r} in this suite (it has "
                            f"{', '.join(names)}).")
    for name in names:
        _validate_task(name, suite.tasks[name])
    chosen = [n for n in names if not only or n in only]
    if not chosen:
        raise UserError("the suite has no tasks; add some under config key 'tasks'.")
    return chosen


def _validate_task(name: str, t) -> None:
    where = f"tasks.{name}"
    for key in t.keys():
        if key not in TASK_KEYS:
            raise _unknown(key, f"{where}.{key}", TASK_KEYS)
    for key in TASK_KEYS:
        if key not in t:
            raise UserError(f"config key '{where}.{key}' is missing; build tasks with "
                            "suites.task() (configs/eval/common.py).")

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise UserError(f"config key '{where}.{key}': {message}")

    harness = t.kind.startswith("harness:") and len(t.kind) > len("harness:")
    require(t.kind in KINDS or harness, "kind",
            f"is {t.kind!r}; choose generate, likelihood or harness:<lm-eval task name>.")
    require(not harness or not t.metrics, "metrics",
            "harness tasks report every metric their lm-eval task defines; leave it empty.")
    require(t.num_fewshot >= -1, "num_fewshot", "use a number of examples, -1 = the task's own.")
    require(t.n >= 0, "n", f"is {t.n}; use a number of examples, 0 = all.")
    require(t.template in TEMPLATES, "template", f"is {t.template!r}; choose chat or plain.")
    require(t.max_new_tokens >= 1, "max_new_tokens", "must be at least 1.")
    require(t.temperature >= 0, "temperature", "must be >= 0 (0 = greedy).")
    require(t.top_k >= 0, "top_k", "must be >= 0 (0 = off).")
    require(0 < t.top_p <= 1, "top_p", "must be in (0, 1].")
    require(t.max_len >= 0, "max_len", f"is {t.max_len}; use a window length, 0 = the run's.")
    require(t.loss_on in chat_template.LOSS_ON, "loss_on",
            f"is {t.loss_on!r}; choose one of {', '.join(chat_template.LOSS_ON)}.")
    try:
        eval_metrics.expand(metric_names(t.metrics))
    except ValueError as e:
        require(False, "metrics", str(e) + ".")
    require(t.kind == "generate" or not t.metrics, "metrics",
            "likelihood tasks always give loss, perplexity, bits_per_byte and accuracy; "
            "leave it empty.")


def metric_names(text: str) -> list[str]:
    return [m.strip() for m in text.split(",") if m.strip()]


# ---------------------------------------------------------------------------------------------
# Running.


def run_suite(run, suite, workdir: str, *, checkpoint: str = "") -> dict:
    """Runs the suite's tasks on `run` (runs.Run) and writes the results; returns them."""
    names = validate(suite)
    out_dir = os.path.join(workdir, "eval", str(run.step))
    os.makedirs(out_dir, exist_ok=True)
    tasks = {}
    for name in names:
        t = suite.tasks[name]
        logging.info("Task %s: %s on %s", name, t.kind, t.source)
        start = time.perf_counter()
        if t.kind == "likelihood":
            result = likelihood_task(run, t, batch_size=suite.batch_size, workdir=workdir)
        elif t.kind.startswith("harness:"):
            from t5x_like.evaluation import harness  # lm-eval is an optional extra
            result = harness.suite_task(run, t, name, workdir=workdir,
                                        batch_size=suite.batch_size, data_dir=suite.data_dir)
        else:
            result, rows = generation_task(run, t, batch_size=suite.batch_size, seed=suite.seed,
                                           data_dir=suite.data_dir)
            result["predictions"] = f"{name}.jsonl"
            files.atomic_write_jsonl(os.path.join(out_dir, result["predictions"]), rows,
                                     ensure_ascii=False)
        result["seconds"] = time.perf_counter() - start
        result["settings"] = config_lib.to_dict(t)
        tasks[name] = result
        logging.info("Task %s done in %.1f s: %s", name, result["seconds"], result["metrics"])
    return results.write(workdir, run.step, tasks, checkpoint=checkpoint)


def likelihood_task(run, t, *, batch_size: int, workdir: str) -> dict:
    records = eval_tasks.likelihood_records(t.source, n=t.n, split=t.split, run_cfg=run.cfg,
                                            workdir=workdir)
    # The run's own split is encoded as training encodes it (its loss_on, on_long), so the
    # numbers are its validation lines over the whole split.
    encode = (lm.example_encoder(run.cfg, run.tokenizer, "text", collections.Counter())
              if t.source == "run" else None)
    return {"kind": "likelihood", "source": t.source, "n": len(records),
            "metrics": likelihood(run, records, batch_size=batch_size, loss_on=t.loss_on,
                                  source=t.source, encode=encode, max_len=t.max_len)}


def likelihood(run, records: list[dict], *, batch_size: int, loss_on: str = "assistant",
               source: str = "records", encode=None, max_len: int = 0) -> dict[str, float]:
    """Loss, perplexity, bits per byte and token accuracy of `run` over `records`.

    Text records are scored on every token (as pretraining does: bos + text + eos); chat
    records on the tokens `chat_template.encode(loss_on=...)` weights (assistant turns).
    Sequences longer than `max_len` (0 = the run's model.max_len) are cut into pieces, every
    token scored. `encode` (record -> {"tokens", "weights"}) replaces this encoding.
    """
    tok = run.tokenizer
    if not records:
        raise UserError(f"likelihood source {source!r} gave no records to evaluate.")

    def default_encode(record: dict) -> dict:
        if "messages" in record:
            tokens, weights = chat_template.encode(tok, record["messages"], loss_on=loss_on)
            return {"tokens": tokens, "weights": weights}
        tokens = np.asarray([tok.bos_id, *tok.encode(record["text"]), tok.eos_id], np.int32)
        return {"tokens": tokens, "weights": np.ones(len(tokens), np.float32)}

    encode = encode or default_encode
    max_len = max_len or run.cfg.model.max_len
    dp = partitioning.data_parallel_size(run.mesh)
    if batch_size % dp:
        raise UserError(f"config key 'batch_size': {batch_size} is not divisible by the "
                        f"data-parallel size {dp} of the mesh.")
    batches = pipeline.make_dataset(records, encode, batch_size=batch_size, max_len=max_len,
                                    seed=0, train=False)
    with jax.set_mesh(run.mesh):
        eval_step = jax.jit(lm.make_eval_step(run.graphdef,
                                                   loss_chunk=run.cfg.model.loss_chunk))
        token_bytes = jax.device_put(jnp.asarray(tok.token_bytes()),
                                     partitioning.replicated(run.mesh))
        try:
            return lm.evaluate(eval_step, run.params, iter(batches), max_steps=0,
                                    local_batch=batch_size, max_len=max_len, mesh=run.mesh,
                                    token_bytes=token_bytes)
        except UserError as e:
            if "gave no tokens" not in str(e):
                raise
            raise UserError(f"likelihood source {source!r} has no scored tokens (chat records "
                            f"need assistant turns with loss_on={loss_on!r}).") from None


def generation_task(run, t, *, batch_size: int, seed: int, data_dir: str
                    ) -> tuple[dict, list[dict]]:
    """Generates a reply to every example and scores them; returns (result, prediction rows)."""
    gen = eval_tasks.generation_set(t.source, data_dir=data_dir, n=t.n)
    if not gen.examples:
        raise UserError(f"generation source {t.source!r} gave no examples.")
    sampling = decoding.Sampling(max_new_tokens=t.max_new_tokens, temperature=t.temperature,
                                 top_k=t.top_k, top_p=t.top_p,
                                 stop_strings=tuple(t.stop_strings))
    replies, truncated = generate(run, gen.examples, sampling, template=t.template,
                                  system=t.system, batch_size=batch_size, seed=seed)
    predictions = [r.text for r in replies]
    references = [ex.references for ex in gen.examples]
    matches = ([gen.check(ex, p) for ex, p in zip(gen.examples, predictions)]
               if gen.check else None)
    names = metric_names(t.metrics) or list(gen.metrics)
    metrics = eval_metrics.score(names, predictions, references, matches=matches)
    system = [{"role": "system", "content": t.system}] if t.system else []
    rows = []
    for i, (ex, reply) in enumerate(zip(gen.examples, replies)):
        row = {"id": ex.id, "prompt": system + ex.messages if t.template == "chat" else ex.plain,
               "prediction": reply.text, "references": ex.references,
               "finish_reason": reply.finish_reason, "prompt_truncated": truncated[i],
               "exact_match": bool(matches[i]) if matches else eval_metrics.exact_match(
                   reply.text, ex.references),
               "token_f1": eval_metrics.token_f1(reply.text, ex.references)}
        rows.append(row)
    result = {"kind": "generate", "source": t.source, "n": len(gen.examples),
              "metrics": metrics, "truncated_prompts": sum(truncated)}
    return result, rows


def prompt_ids(tok, example: eval_tasks.Example, *, template: str, system: str, budget: int
               ) -> tuple[list[int], bool]:
    """The example's prompt as ids of at most `budget` tokens; True when it was shortened.

    A chat prompt that is too long loses the end of its longest message (the instruction at
    its start and the template around it stay); a plain one keeps its last tokens, which are
    what it is continued from.
    """
    if template == "plain":
        body = tok.encode(example.plain)
        if len(body) + 1 <= budget:
            return [tok.bos_id, *body], False
        if budget < 2:
            raise UserError(f"max_new_tokens leaves no room for a prompt in the model's "
                            f"{budget} free positions; lower it.")
        return [tok.bos_id, *body[len(body) - budget + 1:]], True
    messages = ([{"role": "system", "content": system}] if system else []) + [
        dict(m) for m in example.messages]
    ids = chat_template.prompt(tok, messages)
    if len(ids) <= budget:
        return ids, False
    longest = max(range(len(messages)), key=lambda i: len(messages[i]["content"]))
    for _ in range(8):  # re-encoding a cut text can differ by a token or two: repeat
        over = len(ids) - budget
        content_ids = chat_template.encode_text(tok, messages[longest]["content"])
        if over >= len(content_ids):
            raise UserError(
                f"example {example.id}: the prompt does not fit in the model's context even "
                f"with its longest message emptied ({budget} positions left after "
                "max_new_tokens); lower max_new_tokens or the system prompt.")
        messages[longest]["content"] = tok.decode(content_ids[:len(content_ids) - over])
        ids = chat_template.prompt(tok, messages)
        if len(ids) <= budget:
            return ids, True
    raise UserError(f"example {example.id}: could not shorten the prompt to {budget} tokens.")


_DECODER: list = []  # [(run, batch_size, max_len, Decoder)]: the last one made


def _decoder(run, batch_size: int, max_len: int) -> decoding.Decoder:
    """The decoder of the last call when it is for the same run and sizes: its compiled
    programs are reused (compiling is most of a small eval on CPU: 26-43 s of a cold
    200-question run, 5-8 s warm). Only one is kept, so a finished run's parameters are freed
    at the next run's."""
    if _DECODER and _DECODER[0][0] is run and _DECODER[0][1:3] == (batch_size, max_len):
        return _DECODER[0][3]
    _DECODER.clear()
    decoder = decoding.Decoder.from_run(run, max_batch=batch_size, max_len=max_len)
    _DECODER.append((run, batch_size, max_len, decoder))
    return decoder


def generate(run, examples: list[eval_tasks.Example], sampling: decoding.Sampling, *,
             template: str = "chat", system: str = "", batch_size: int = 16, seed: int = 0
             ) -> tuple[list[decoding.Completion], list[bool]]:
    """Replies of `run` to every example (in order), and which prompts had to be shortened.

    Example i samples with seed + i, so a reply does not depend on which batch it landed in.
    Chat replies end at the end of turn (<|end|>, the model's own) or at the start of another.
    """
    tok = run.tokenizer
    max_len = run.cfg.model.max_len
    budget = max_len - sampling.max_new_tokens
    if budget < 1:
        raise UserError(f"max_new_tokens={sampling.max_new_tokens} leaves no room for a prompt "
                        f"in the model's {max_len} positions (model.max_len); lower it.")
    prompts, truncated = [], []
    for ex in examples:
        ids, cut = prompt_ids(tok, ex, template=template, system=system, budget=budget)
        prompts.append(ids)
        truncated.append(cut)
    # A chat reply ends at the template's end of turn, eos, or a token starting another turn.
    stops = chat_template.reply_stop_ids(tok) if template == "chat" else ()
    decoder = _decoder(run, batch_size, max_len)
    # Similar lengths share a batch: less padding, fewer distinct compiled shapes.
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    replies: list[decoding.Completion | None] = [None] * len(prompts)
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    for chunk in tqdm.tqdm(chunks, desc="generate", disable=not sys.stderr.isatty()):
        params = [dataclasses.replace(sampling, seed=seed + i,
                                      stop_tokens=stops + tuple(sampling.stop_tokens))
                  for i in chunk]
        for i, completion in zip(chunk, decoder.generate([prompts[i] for i in chunk], params)):
            completion.text = completion.text.strip()
            replies[i] = completion
    return replies, truncated


# ---------------------------------------------------------------------------------------------
# Writing.
