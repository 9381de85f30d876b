"""EleutherAI's lm-evaluation-harness on our runs: the benchmarks everyone reports.

    python -m t5x_like.evaluate harness --workdir=runs/sft --tasks=arc_easy,hellaswag \
        [--limit=100] [--num_fewshot=0] [--checkpoint=best] [--template=chat]

`RunLM` is lm-eval's language-model interface (`lm_eval.api.model.TemplateLM`) over a run or
model directory, with the run's tokenizer and context length:

    loglikelihood          (context, continuation) -> (log p(continuation | context), is_greedy),
                           batched on the mesh. Token boundaries as lm-eval's HFLM draws them
                           (the whole string encoded, the context's tokens split off), except
                           that a continuation whose first token merges with the context's last
                           characters keeps that token (HFLM would drop or misalign it): the
                           scored tokens are always the whole string's own tokenization.
    loglikelihood_rolling  a document's log-likelihood in lm-eval's rolling windows of the
                           run's model.max_len tokens, every token scored once after <bos>.
    generate_until         greedy (or sampled) continuations by the KV-cache Decoder, ending at
                           the task's stop strings, eos or the template's end-of-turn token.
    apply_chat_template    the run's chat template (data_pipelines/chat_template.py: the
                           project's or an imported model's), when the harness is asked to
                           template prompts (--template=chat).

Every sequence starts with <bos>, as in training (eos for a model without one). `run_tasks`
runs lm-eval's `simple_evaluate` and turns its results into our task results (metric names
without lm-eval's ",none" filter suffix); `write` stores lm-eval's results JSON and per-example samples in
<workdir>/eval/<step>/harness/, and our results.json, results.md and metrics.jsonl lines.

Local tasks (no dataset hub needed; `write_local_tasks` writes their YAMLs and data files):

    t5x_demo_arithmetic_mc    held-out demo questions, right vs. wrong answer (multiple choice)
    t5x_demo_arithmetic_gen   the same questions answered by generation, exact match of the
                              reply's first integer
    t5x_shakespeare_ppl       rolling perplexity / bits per byte of Tiny Shakespeare documents

Through the server: `completions_model(base_url, tokenizer)` is lm-eval's own
`local-completions` model (OpenAI /v1/completions with echo and logprobs) with the run's
tokenizer on the client side, so a served model gives the in-process numbers.
"""

import dataclasses
import difflib
import datetime
import json
import math
import os
import platform
import re
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

try:
    import lm_eval
    import lm_eval.evaluator
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.openai_completions import LocalCompletionsAPI
except ImportError as e:  # an optional extra: say how to get it
    from t5x_like.core.errors import UserError
    raise UserError("harness tasks need lm-evaluation-harness: pip install -e '.[eval]' "
                    f"(importing it failed: {e}).") from None

from data_pipelines import chat_template, sources, synthetic
from t5x_like.core import files
from t5x_like.core.errors import UserError
from t5x_like.modeling import decoding, model, partitioning

MIN_BUCKET = 16  # shortest padded length; lengths round up to powers of two (few programs)


# ---------------------------------------------------------------------------------------------
# Text to tokens, as the harness needs them.


def _controls(tok) -> tuple[re.Pattern, dict[str, int]]:
    """The run's chat template's control tokens (project: the <|...|> markers, <s>, </s>; a
    model's Jinja template: its special and added tokens) as a split pattern and text -> id."""
    cached = getattr(tok, "_harness_controls", None)
    if cached is None or cached[0] is not chat_template.of(tok):
        by_text: dict[str, int] = {}
        for i, text in chat_template.control_tokens(tok).items():
            by_text.setdefault(text, i)
        longest = sorted(by_text, key=len, reverse=True)
        pattern = re.compile("(" + "|".join(map(re.escape, longest)) + ")" if longest
                             else "(?!)")
        cached = (chat_template.of(tok), pattern, by_text)
        tok._harness_controls = cached
    return cached[1], cached[2]


def prefix_id(tok) -> int:
    """What the first token follows: <bos>, or eos for a model without one (as lm-eval's HFLM
    falls back)."""
    return tok.bos_id if tok.bos_id >= 0 else tok.eos_id


def encode(tok, text: str, *, bos: bool = True) -> list[int]:
    """Text -> ids, <bos> first when `bos` (and the model has one, and the text does not start
    with it already). Control tokens in the text (what apply_chat_template writes) become their
    ids, as the template's own encoding has them, whatever the tokenizer backend does with
    such text; the text between them is encoded piece by piece."""
    pattern, by_text = _controls(tok)
    ids: list[int] = []
    for i, part in enumerate(pattern.split(text)):
        if i % 2:
            ids.append(by_text[part])
        elif part:
            ids += tok.encode(part)
    if bos and tok.bos_id >= 0 and ids[:1] != [tok.bos_id]:
        ids.insert(0, tok.bos_id)
    return ids


def render_chat(tok, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
    """The run's chat template (chat_template.render) as text, for apply_chat_template; without
    the generation prompt the final assistant message is left open for its continuation, as
    transformers' continue_final_message cuts the rendering after that message's content."""
    messages = [{"role": m["role"], "content": m["content"]} for m in chat_history]
    try:
        text = chat_template.render(messages, tok, add_generation_prompt=add_generation_prompt)
    except chat_template.TemplateError as e:
        raise UserError(f"the harness built a conversation the chat template cannot hold "
                        f"({e}).") from None
    final = messages[-1]["content"]
    if not add_generation_prompt and messages[-1]["role"] == "assistant" and final:
        text = text[:text.rindex(final) + len(final)]
    return text


def encode_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) split from the whole string's ids, as lm-eval's HFLM
    does; when the context's own ids are not a prefix of the whole string's (a token spans the
    boundary), the split falls before that token, which the continuation then keeps."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:  # lm-eval's convention: a context's trailing spaces go with the continuation
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = encode(tok, context + continuation)
    ctx = encode(tok, context)
    k = 0
    while k < min(len(ctx), len(whole)) and ctx[k] == whole[k]:
        k += 1
    return whole[:k], whole[k:]


# ---------------------------------------------------------------------------------------------
# Scoring tokens on the device.


def _score_fn(graphdef, chunk: int):
    """score(params, tokens, targets, weights, segments, positions) -> (sum of weighted target
    log-probs [B], every weighted target is the argmax [B]). The output layer runs `chunk`
    positions at a time (model.loss_chunk), so the [B, T, V] logits never exist whole."""

    def token_logprobs(logits_fn, head, h, targets):
        logits = logits_fn(head, h)  # [B, c, V] float32
        top = jnp.max(logits, axis=-1)
        log_z = jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1)) + top
        target = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        return target - log_z, target >= top

    def score(params, tokens, targets, weights, segments, positions):
        h, head, logits_fn = model.apply_hidden(graphdef, params, tokens, positions=positions,
                                                segment_ids=segments)
        B, T = targets.shape
        if chunk and T > chunk and T % chunk == 0:
            n = T // chunk
            # [B, T, ...] -> [n, B, chunk, ...]: chunks along the sequence, the batch stays whole.
            split = lambda x: jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)
            lp, top = jax.lax.map(lambda xs: token_logprobs(logits_fn, head, *xs),
                                  (split(h), split(targets)))
            lp, top = (jnp.moveaxis(x, 0, 1).reshape(B, T) for x in (lp, top))
        else:
            lp, top = token_logprobs(logits_fn, head, h, targets)
        on = weights > 0
        return jnp.sum(jnp.where(on, lp, 0.0), axis=-1), jnp.all(top | ~on, axis=-1)

    return score


def _bucket(n: int, cap: int) -> int:
    return min(cap, max(MIN_BUCKET, 1 << math.ceil(math.log2(max(n, 1)))))


# ---------------------------------------------------------------------------------------------
# The lm-eval model.


@register_model("t5x_like")
class RunLM(TemplateLM):
    """lm-eval's model interface over a loaded run (runs.Run): `RunLM(run)`, or from lm-eval's
    own command line `--model t5x_like --model_args workdir=runs/sft,checkpoint=best` once this
    module is imported."""

    def __init__(self, run=None, *, workdir: str = "", checkpoint: str = "latest",
                 batch_size: int | str | None = 16, max_gen_toks: int = 256,
                 max_batch_size=None, device=None):  # lm-eval passes the last two; unused
        super().__init__()
        if run is None:
            if not workdir:
                raise UserError("the t5x_like harness model needs workdir=<run directory>.")
            run = load_run(workdir, checkpoint)
        self.run = run
        self.tok = run.tokenizer
        dp = partitioning.data_parallel_size(run.mesh)
        bs = int(batch_size) if str(batch_size or "").isdigit() else 16
        self.batch_size = -(-max(bs, 1) // dp) * dp  # rows split evenly over the mesh
        self.max_gen_toks = int(max_gen_toks)
        self._score = jax.jit(_score_fn(run.graphdef, run.cfg.model.get("loss_chunk", 0)))
        self._decoder: decoding.Decoder | None = None

    # -- what lm-eval asks of a TemplateLM ---------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tok.eos_id

    @property
    def prefix_token_id(self) -> int:
        return prefix_id(self.tok)  # what the first token of every training sequence follows

    @property
    def max_length(self) -> int:
        return int(self.run.cfg.model.max_len)

    @property
    def tokenizer_name(self) -> str:
        return f"t5x_like:{getattr(self.tok, 'path', '')}"

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        # A description for lm-eval's logs and cache keys: the template itself is code.
        return "t5x_like chat template (data_pipelines/chat_template.py)" if chat_template else None

    def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                   left_truncate_len: int | None = None, **kwargs) -> list[int]:
        ids = encode(self.tok, string, bos=add_special_tokens is not False)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def tok_decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        return encode_pair(self.tok, context, continuation)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        return render_chat(self.tok, chat_history, add_generation_prompt)

    # -- scoring -------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs
                              ) -> list[tuple[float, bool]]:
        """requests: (cache key, context ids, continuation ids) -> (log-prob, is_greedy) each.
        A sequence longer than the context (model.max_len + 1 tokens) loses context tokens from
        the left, as HFLM does."""
        L = self.max_length
        rows = []
        for key, ctx, cont in requests:
            if not cont:
                rows.append(None)
                continue
            if len(cont) > L:
                raise UserError(f"a continuation of {len(cont)} tokens does not fit the model's "
                                f"{L}-token context (model.max_len).")
            rows.append((ctx + cont)[-(L + 1):])
        out: list[tuple[float, bool]] = [(0.0, True)] * len(requests)
        order = sorted((i for i, r in enumerate(rows) if r is not None),
                       key=lambda i: -len(rows[i]))
        B = self.batch_size
        sharding = partitioning.batch_sharding(self.run.mesh)
        with jax.set_mesh(self.run.mesh):
            for start in range(0, len(order), B):
                chunk = order[start:start + B]
                T = _bucket(max(len(rows[i]) for i in chunk) - 1, L)
                tokens = np.zeros((B, T), np.int32)
                targets = np.zeros((B, T), np.int32)
                weights = np.zeros((B, T), np.float32)
                segments = np.zeros((B, T), np.int32)
                for b, i in enumerate(chunk):
                    seq, n = rows[i], len(requests[i][2])
                    tokens[b, :len(seq) - 1] = seq[:-1]
                    targets[b, :len(seq) - 1] = seq[1:]
                    weights[b, len(seq) - 1 - n:len(seq) - 1] = 1.0
                    segments[b, :len(seq) - 1] = 1
                positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T))
                batch = [jax.device_put(x, sharding)
                         for x in (tokens, targets, weights, segments, positions)]
                logprob, greedy = self._score(self.run.params, *batch)
                logprob, greedy = np.asarray(logprob), np.asarray(greedy)
                for b, i in enumerate(chunk):
                    out[i] = (float(logprob[b]), bool(greedy[b]))
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each document in lm-eval's rolling windows of model.max_len tokens (every token
        predicted once; a later window starts from the token before its first prediction, the
        last one is filled with earlier context), all windows of all documents batched."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for i, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text, add_special_tokens=False),
                    prefix_token=self.prefix_token_id, max_seq_len=self.max_length,
                    context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._loglikelihood_tokens(windows)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # -- generation ------------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations by the KV-cache Decoder. gen_kwargs: until (stop strings), max_gen_toks,
        do_sample, temperature, top_p, top_k; greedy unless do_sample. The context keeps <bos>
        and its last tokens when it must be shortened to leave room for max_gen_toks."""
        L = self.max_length
        if self._decoder is None:
            # On one device: the decoder does not split a batch over a mesh, and replicated
            # over a data-parallel mesh every device would compute every row.
            run = self.run
            params = jax.device_put(run.params, run.mesh.devices.flat[0])
            self._decoder = decoding.Decoder(run.graphdef, params, run.cfg.model, self.tok,
                                             max_batch=self.batch_size, max_len=L,
                                             lora=run.lora)
        # Replies end at a stop string, eos (which always stops) or the template's end of turn:
        # HFLM's "until + eos", the end of turn being a chat model's eos.
        stops = (chat_template.end_id(self.tok),)
        prompts, params = [], []
        for i, (context, gen_kwargs) in enumerate(req.args for req in requests):
            kw = dict(gen_kwargs or {})
            until = kw.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = min(int(kw.pop("max_gen_toks", self.max_gen_toks)), L - 1)
            sample = bool(kw.pop("do_sample", False))
            temperature = float(kw.pop("temperature", 1.0 if sample else 0.0) or 0.0)
            ids = self.tok_encode(context) or [self.prefix_token_id]
            budget = L - max_new
            if len(ids) > budget:  # keep <bos>, drop the oldest context
                head = ids[:1] if ids[0] == self.tok.bos_id else []
                ids = head + ids[len(ids) - budget + len(head):]
            prompts.append(ids)
            params.append(decoding.Sampling(
                max_new_tokens=max_new, temperature=temperature if sample else 0.0,
                top_k=int(kw.pop("top_k", 0) or 0), top_p=float(kw.pop("top_p", 1.0) or 1.0),
                seed=i, stop_tokens=stops, stop_strings=tuple(s for s in until if s)))
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        out = [""] * len(prompts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            done = self._decoder.generate([prompts[i] for i in chunk], [params[i] for i in chunk])
            for i, completion in zip(chunk, done):
                out[i] = completion.text
                self.cache_hook.add_partial("generate_until", requests[i].args, out[i])
        return out

    def get_model_info(self) -> dict:
        return {"model_num_parameters": model.count_params(self.run.params),
                "model_step": int(self.run.step), "max_length": self.max_length}


def data_parallel_mesh():
    """Every device on the batch axis: the model replicated, the rows of a batch split."""
    import ml_collections
    return partitioning.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1}))


def load_run(workdir: str, checkpoint: str = "latest"):
    """A run or model directory (or one of its checkpoints) on a data-parallel mesh."""
    from t5x_like.core import runs
    from t5x_like.training import checkpoints

    directory, step = checkpoints.locate(workdir)
    if checkpoint not in ("", "latest"):
        if not checkpoint.isdigit():
            raise UserError(f"checkpoint={checkpoint}: use latest or a step number here "
                            "(the evaluate command also resolves best).")
        step = int(checkpoint)
    return runs.load(directory, step=step, mesh=data_parallel_mesh())


# ---------------------------------------------------------------------------------------------
# Through the server: lm-eval's own OpenAI-compatible completions model.


class _ClientTokenizer:
    """The run's tokenizer in the shape of lm-eval's "remote" tokenizer backend (what a vLLM
    server's /tokenize gives), on the client side."""

    def __init__(self, tok):
        self.tok = tok
        self.eos_token_id = self.eot_token = tok.eos_id
        self.bos_token_id = tok.bos_id
        self.eos_token = self.bos_token = None  # no text spells them

    def encode(self, text: str) -> list[int]:
        return encode(self.tok, text, bos=False)

    def decode(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids))

    def batch_decode(self, batch) -> list[str]:
        return [self.decode(ids) for ids in batch]


@register_model("t5x_like-completions")
class RunCompletions(LocalCompletionsAPI):
    """lm-eval's `local-completions` (its payloads, requests, retries and logprob parsing) with
    the run's tokenizer on the client: it needs token counts to find where a continuation starts
    in the echoed logprobs, and sends token ids, <bos> first as every sequence here starts, so
    the server scores exactly the tokens the in-process model scores.

    lm-eval keeps one position of `max_length` for the generated token and, in rolling windows,
    one more: pass the served context (model.max_len); windows are 2 tokens shorter than
    RunLM's, so documents longer than that are scored with slightly less context."""

    def __init__(self, *, base_url: str, tokenizer, max_length: int, batch_size: int = 1,
                 **kwargs):
        # The end of turn's text as lm-eval's eos string: a stop string of every generation,
        # as RunLM stops at that token (text completions know no stop tokens).
        end = chat_template.control_tokens(tokenizer).get(chat_template.end_id(tokenizer))
        super().__init__(base_url=base_url, tokenizer_backend="none", batch_size=batch_size,
                         max_length=max_length, add_bos_token=True, eos_string=end, **kwargs)
        self._tok = tokenizer
        self.tokenizer_backend = "remote"
        self.tokenizer = _ClientTokenizer(tokenizer)
        self.tokenized_requests = True

    def tok_encode(self, string, left_truncate_len=None, add_special_tokens=None, **kwargs):
        """<bos> only when asked (generation prompts: add_bos_token): lm-eval encodes rolling
        documents without arguments and prefixes them itself."""
        if not isinstance(string, str):
            return [self.tok_encode(s, left_truncate_len, add_special_tokens) for s in string]
        ids = encode(self._tok, string, bos=add_special_tokens is True)
        return ids[-left_truncate_len:] if left_truncate_len else ids

    def _encode_pair(self, context: str, continuation: str):
        return encode_pair(self._tok, context, continuation)

    def apply_chat_template(self, chat_history: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str:
        # Rendered here, as in process: /v1/completions continues text as it is.
        return render_chat(self._tok, chat_history, add_generation_prompt)

    @property
    def prefix_token_id(self) -> int:
        return prefix_id(self._tok)

    @property
    def eot_token_id(self) -> int:
        return self._tok.eos_id


def completions_model(base_url: str, tokenizer, *, max_length: int, batch_size: int = 8,
                      **kwargs) -> RunCompletions:
    """lm-eval's completions model for `python -m t5x_like.serve` at `base_url`
    (http://host:port/v1/completions) serving a model with `tokenizer` and `max_length`."""
    return RunCompletions(base_url=base_url, tokenizer=tokenizer, max_length=max_length,
                          batch_size=batch_size, **kwargs)


# ---------------------------------------------------------------------------------------------
# Local tasks: YAMLs and data files written here, read by lm-eval from a folder.

LOCAL_TASKS = ("t5x_demo_arithmetic_mc", "t5x_demo_arithmetic_gen", "t5x_shakespeare_ppl")
SHAKESPEARE = os.path.join("pretrain", "tinyshakespeare.txt")

_YAML = {
    "t5x_demo_arithmetic_mc": """\
# Held-out demo questions (synthetic.answer_pair, validation): the right answer against the
# demo's plausible wrong one (off by one or ten, or the other operation's result).
task: t5x_demo_arithmetic_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: choices
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "t5x_demo_arithmetic_gen": """\
# The same held-out questions answered by generation; the reply's first integer must be the
# answer (as synthetic.check_answer reads a reply).
task: t5x_demo_arithmetic_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: answer
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
filter_list:
  - name: first_integer
    filter:
      - function: regex
        regex_pattern: "(-?\\\\d+)"
      - function: take_first
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
""",
    "t5x_shakespeare_ppl": """\
# Tiny Shakespeare ({source}) cut into documents as the `text:` likelihood source cuts it
# (paragraphs merged up to {min_chars} characters); rolling log-likelihood of each.
task: t5x_shakespeare_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
metadata:
  version: 1.0
""",
}


def demo_mc_records(n: int) -> list[dict]:
    """Question i: synthetic.answer_pair(i, "validation")'s question, its right and wrong
    answers (the right one first for even i), and the right one's index."""
    records = []
    for i in range(n):
        pair = synthetic.answer_pair(i, "validation")
        choices = [pair["chosen"], pair["rejected"]]
        label = i % 2
        if label:
            choices.reverse()
        records.append({"id": i, "question": pair["prompt"][-1]["content"], "choices": choices,
                        "label": label, "answer": pair["chosen"]})
    return records


def write_local_tasks(folder: str, *, data_root: str = "../shared/data", n_demo: int = 200,
                      min_doc_chars: int = 1000) -> str:
    """Writes the local tasks' YAMLs and data files into `folder` (an include path for
    lm-eval's TaskManager); returns it. The Shakespeare task is written only when
    `data_root` holds the text."""
    os.makedirs(folder, exist_ok=True)
    demo = os.path.join(folder, "t5x_demo_arithmetic.jsonl")
    _write(demo, "".join(json.dumps(r) + "\n" for r in demo_mc_records(n_demo)))
    for name in ("t5x_demo_arithmetic_mc", "t5x_demo_arithmetic_gen"):
        _write(os.path.join(folder, name + ".yaml"), _YAML[name].format(data=json.dumps(demo)))
    text = os.path.join(data_root, SHAKESPEARE)
    if os.path.isfile(text):
        docs = os.path.join(folder, "t5x_shakespeare.jsonl")
        _write(docs, "".join(json.dumps({"text": d}) + "\n"
                             for d in sources.read_text([text], "paragraph", min_doc_chars)))
        _write(os.path.join(folder, "t5x_shakespeare_ppl.yaml"), _YAML["t5x_shakespeare_ppl"]
               .format(data=json.dumps(docs), source=SHAKESPEARE, min_chars=min_doc_chars))
    return folder


def _write(path: str, text: str) -> None:
    """Rewrites `path` only when its text changes (datasets caches by file, and tests share
    one folder)."""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            if f.read() == text:
                return
    files.atomic_write_text(path, text)


# ---------------------------------------------------------------------------------------------
# Running tasks and keeping the results.


@dataclasses.dataclass
class Outcome:
    tasks: dict  # our task results by name: kind, source, n, metrics, seconds, settings
    raw: dict  # lm-eval's results (samples removed)
    samples: dict  # lm-eval's per-example records by task


def task_manager(tasks: Sequence[str], include_path: Sequence[str]):
    """lm-eval's TaskManager over `include_path`, and its built-in tasks only when a task is
    not found there (indexing them takes ~10 s)."""
    from lm_eval.tasks import TaskManager

    paths = [p for p in include_path if p]
    for p in paths:
        if not os.path.isdir(p):
            raise UserError(f"--include_path={p} is not a folder of lm-eval task YAMLs.")
    if paths:
        local = TaskManager(include_path=paths, include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=paths or None)
    missing = [t for t in tasks if t not in manager.all_tasks]
    if missing:
        hints = [f"{t}: did you mean {', '.join(close)}?" for t in missing
                 if (close := difflib.get_close_matches(t, manager.all_tasks, n=3))]
        raise UserError(f"--tasks: lm-eval has no task {', '.join(missing)}"
                        f"{' (' + '; '.join(hints) + ')' if hints else ''}; list them with "
                        "`lm_eval ls tasks`, or add a folder of task YAMLs with --include_path.")
    return manager


def run_tasks(lm: RunLM, tasks: Sequence[str], *, include_path: Sequence[str] = (),
              limit: int | float | None = None, num_fewshot: int | None = None,
              chat: bool = False, bootstrap_iters: int = 1000, system: str = "",
              names: dict[str, str] | None = None, log_samples: bool = True) -> Outcome:
    """Runs lm-eval's `simple_evaluate` on `lm`; `names` maps lm-eval task -> our task name
    (default "harness:<task>")."""
    manager = task_manager(tasks, include_path)
    start = time.perf_counter()
    # lm-eval records its environment with torch's collect_env (seconds per call, and about
    # torch, which no model here uses): record ours instead.
    saved, lm_eval.evaluator.add_env_info = lm_eval.evaluator.add_env_info, _env_info
    try:
        raw = lm_eval.simple_evaluate(
            model=lm, tasks=list(tasks), task_manager=manager, limit=limit or None,
            num_fewshot=num_fewshot, apply_chat_template=chat, fewshot_as_multiturn=chat,
            system_instruction=system or None, bootstrap_iters=bootstrap_iters,
            log_samples=log_samples, torch_random_seed=None)
    finally:
        lm_eval.evaluator.add_env_info = saved
    seconds = time.perf_counter() - start
    samples = raw.pop("samples", {}) or {}
    names = names or {}
    out = {}
    for task in tasks:
        for sub in _leaves(raw, task):
            name = names.get(sub, f"harness:{sub}")
            n = raw.get("n-samples", {}).get(sub, {}).get("effective")
            out[name] = {"kind": "harness", "source": sub, "n": n if n is not None else 0,
                         "metrics": metrics_of(raw["results"][sub]),
                         "lm_eval_version": lm_eval.__version__,
                         "seconds": seconds, "settings": {
                             "limit": limit, "num_fewshot": raw.get("configs", {}).get(
                                 sub, {}).get("num_fewshot", num_fewshot),
                             "template": "chat" if chat else "plain", "system": system,
                             "include_path": list(include_path)}}
    return Outcome(out, raw, samples)


def _env_info(storage: dict) -> None:
    device = jax.devices()[0]
    storage.update({
        "pretty_env_info": f"jax {jax.__version__}, {jax.device_count()} x {device.platform} "
                           f"{device.device_kind}; Python {platform.python_version()} on "
                           f"{platform.platform()}",
        "lm_eval_version": lm_eval.__version__, "transformers_version": "N/A (not used)",
        "upper_git_hash": None})


def _leaves(raw: dict, task: str) -> list[str]:
    """`task` when lm-eval reports it (a task, or a group with an aggregate), else its
    subtasks."""
    if task in raw["results"]:
        return [task]
    subs = raw.get("group_subtasks", {}).get(task, [])
    return [s for t in subs for s in _leaves(raw, t)] or []


def metrics_of(entry: dict) -> dict[str, float]:
    """lm-eval's "acc,none" / "exact_match,first_integer" -> "acc" / "exact_match" (the filter
    named only when a metric has several), numbers only ("N/A" stderrs are left out)."""
    filters: dict[str, list[str]] = {}
    for key in entry:
        if "," in key:
            metric, filt = key.split(",", 1)
            filters.setdefault(metric, []).append(filt)
    out = {}
    for key, value in entry.items():
        if "," not in key or not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        metric, filt = key.split(",", 1)
        name = metric if len(filters[metric]) == 1 or filt == "none" else f"{metric}_{filt}"
        out[name] = float(value)
    return out


CHAT_TASKS = ("sft", "dpo", "rl")  # runs whose model answers in the chat template


def evaluate(workdir: str, step: int, tasks: Sequence[str], *, checkpoint: str = "",
             limit: float = 0, num_fewshot: int = -1, template: str = "auto", system: str = "",
             include_path: Sequence[str] = (), batch_size: int = 16,
             data_root: str = "../shared/data", bootstrap_iters: int = 1000) -> dict:
    """`python -m t5x_like.evaluate harness`: lm-eval `tasks` on checkpoint `step` of `workdir`
    on a data-parallel mesh; writes everything (see `write`) and returns results.json's content.
    limit: examples per task (0 = all, below 1 a fraction); template "auto" = chat for SFT, DPO
    and RL runs, plain otherwise."""
    from t5x_like.core import runs

    run = runs.load(workdir, step=step, mesh=data_parallel_mesh())
    if template == "auto":
        template = "chat" if run.cfg.get("task") in CHAT_TASKS else "plain"
    lm = RunLM(run, batch_size=batch_size)
    outcome = run_tasks(lm, [t for t in tasks if t], include_path=[
        local_task_folder(data_root), *include_path], limit=(
            None if not limit else limit if limit < 1 else int(limit)),
        num_fewshot=None if num_fewshot < 0 else num_fewshot, chat=template == "chat",
        system=system, bootstrap_iters=bootstrap_iters)
    return write(workdir, step, outcome, checkpoint=checkpoint)


def local_task_folder(data_root: str = "../shared/data") -> str:
    """The local tasks, written into a per-user cache folder ($XDG_CACHE_HOME/t5x_like/
    harness_tasks) that later runs rewrite only where it changed."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return write_local_tasks(os.path.join(base, "t5x_like", "harness_tasks"),
                             data_root=data_root)


def suite_task(run, t, name: str, *, workdir: str, batch_size: int, data_dir: str) -> dict:
    """A suite's "harness:<task>" task (configs/eval/common.py): n = lm-eval's limit, template
    chat = apply_chat_template, source = a folder of task YAMLs besides the local tasks (whose
    Shakespeare text is looked for beside the suite's data_dir)."""
    task = t.kind.split(":", 1)[1]
    include = [local_task_folder(os.path.dirname(os.path.normpath(data_dir)))]
    include += [t.source] if t.source else []
    outcome = run_tasks(RunLM(run, batch_size=batch_size), [task], include_path=include,
                        limit=t.n or None, num_fewshot=None if t.num_fewshot < 0 else t.num_fewshot,
                        chat=t.template == "chat", system=t.system, names={task: name})
    if list(outcome.tasks) != [name]:
        raise UserError(f"config key 'tasks.{name}.kind': {task} is an lm-eval group without "
                        f"one score of its own; give each of its tasks its own harness entry "
                        f"({', '.join(r['source'] for r in outcome.tasks.values())}).")
    save_raw(workdir, run.step, outcome)
    return outcome.tasks[name]


def save_raw(workdir: str, step: int, outcome: Outcome) -> str:
    """lm-eval's results JSON (results_<time>.json) and samples (samples_<task>_<time>.jsonl),
    as lm-eval's own tracker names them, in <workdir>/eval/<step>/harness/; returns the
    results file's path, which each task result records."""
    from lm_eval.utils import handle_non_serializable

    folder = os.path.join(workdir, "eval", str(step), "harness")
    os.makedirs(folder, exist_ok=True)
    stamp = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S.%f")
    path = os.path.join(folder, f"results_{stamp}.json")
    files.atomic_write_text(path, json.dumps(outcome.raw, indent=2, ensure_ascii=False,
                                             default=handle_non_serializable) + "\n")
    for task, rows in outcome.samples.items():
        files.atomic_write_text(
            os.path.join(folder, f"samples_{task}_{stamp}.jsonl"),
            "".join(json.dumps(r, ensure_ascii=False, default=handle_non_serializable) + "\n"
                    for r in rows))
    for result in outcome.tasks.values():
        result["lm_eval_results"] = os.path.join("harness", os.path.basename(path))
    return path


def write(workdir: str, step: int, outcome: Outcome, *, checkpoint: str = "") -> dict:
    """save_raw, then our results.json / results.md / metrics.jsonl lines (one per task, split
    "eval/harness:<task>") through results.write; returns results.json's content."""
    from t5x_like.evaluation import results

    save_raw(workdir, step, outcome)
    return results.write(workdir, step, outcome.tasks, checkpoint=checkpoint)
