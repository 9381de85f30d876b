"""Evaluation data: what a task's `source` names, read into examples or records.

Generation sources give `Example`s (a prompt as chat messages and as plain text, plus one or
more references) and the metrics that suit them:

    synthetic:arithmetic   held-out demo questions; exact match by synthetic.check_answer
    ntrex:en-de, en-fr     NTREX-128 newstest2019 sentences, English -> German / French; BLEU, chrF
    scitldr                SciTLDR-A abstracts -> one-sentence TL;DR (2-4 references); ROUGE
    dialogsum              DialogSum dialogues -> summary (3 references); ROUGE
    self_instruct          self-instruct user-oriented instructions (1 reference); ROUGE, token F1
    jsonl:<path>           one JSON object per line, a task as data:
                             {"prompt": "text" or [messages], "references": ["...", ...]}
                           ("reference": "..." for one; optional "id"); exact match, token F1

Likelihood sources give records, {"text": str} or {"messages": [...]} (chat: the loss is on
assistant tokens only, by chat_template.encode's weights):

    run                    the run's own data.source, split `split` (prepared as training did)
    prepared:<dir>         a folder from data_pipelines.prepare (text or "messages" records)
    text:<path or glob>    plain text, cut into documents as the run's data.text_unit says
    jsonl:<path>:<field>   the string field of each JSON line
    chat:<path or glob>    {"messages": [{"role", "content"}, ...]} per line
    synthetic:arithmetic, synthetic:arithmetic_chat   held-out demo text / dialogues

Built-in readers find their files in the suite's data_dir (../shared/data/eval by default).
The first `n` examples are used (0 = all), so every model sees the same ones.
"""

import dataclasses
import itertools
import json
import os
from typing import Callable, Iterable, Iterator

from data_pipelines import chat_template, prepare, sources, synthetic
from t5x_like.core.errors import UserError

GENERATION_SOURCES = ("synthetic:arithmetic", "ntrex:en-de", "ntrex:en-fr", "scitldr",
                      "dialogsum", "self_instruct", "jsonl:<path>")
LIKELIHOOD_SOURCES = ("run", "prepared:<dir>", "text:<path>", "jsonl:<path>:<field>",
                      "chat:<path>", "synthetic:arithmetic", "synthetic:arithmetic_chat")
SYNTHETIC_VALIDATION_DOCS = 1000  # held-out demo records when n = 0


@dataclasses.dataclass
class Example:
    id: str
    messages: list[dict]  # the prompt as a conversation ending with the user's turn
    plain: str  # the same prompt for a model that only continues text
    references: list[str]


@dataclasses.dataclass
class GenerationSet:
    examples: list[Example]
    metrics: tuple[str, ...]  # what suits the data, unless the task names its own
    # A task's own answer check (replaces string exact match), e.g. comparing numbers.
    check: Callable[[Example, str], bool] | None = None


# ---------------------------------------------------------------------------------------------
# Generation.


def generation_set(source: str, *, data_dir: str, n: int) -> GenerationSet:
    kind, _, rest = source.partition(":")
    if source == "synthetic:arithmetic":
        return _arithmetic(n)
    if kind == "ntrex" and rest in _NTREX_LANGUAGES:
        return _ntrex(data_dir, rest, n)
    if source in ("scitldr", "dialogsum", "self_instruct"):
        return {"scitldr": _scitldr, "dialogsum": _dialogsum,
                "self_instruct": _self_instruct}[source](data_dir, n)
    if kind == "jsonl" and rest:
        return GenerationSet(list(_first(_jsonl_examples(rest), n)),
                             ("exact_match", "token_f1"))
    raise UserError(f"generation source {source!r} is unknown; use one of "
                    f"{', '.join(GENERATION_SOURCES)}.")


def _first(items: Iterable, n: int) -> Iterator:
    return iter(items) if n == 0 else itertools.islice(items, n)


def _user(content: str) -> list[dict]:
    return [{"role": "user", "content": content}]


def _arithmetic(n: int) -> GenerationSet:
    """Held-out demo questions as preference tuning sees them (synthetic.answer_pair: the system
    prompt half the time, then the question); the reference is the right answer. The problems
    do not depend on the sampling seed, so every model and every run answers the same ones."""
    examples = []
    for i in range(n or SYNTHETIC_VALIDATION_DOCS):
        pair = synthetic.answer_pair(i, "validation")
        question = pair["prompt"][-1]["content"]
        examples.append(Example(f"arithmetic-{i}", pair["prompt"], question, [pair["chosen"]]))
    return GenerationSet(examples, ("exact_match",),
                         check=lambda ex, reply: synthetic.check_answer(ex.plain, reply))


def _path(data_dir: str, name: str) -> str:
    path = os.path.join(data_dir, name)
    if not os.path.isfile(path):
        raise UserError(f"{path} does not exist; set config key 'data_dir' to the folder of the "
                        "shared evaluation sets (../shared/data/eval from the repository).")
    return path


def _json_lines(path: str) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file (.gz too); a bad line names file and line."""
    for lineno, record in sources.json_lines(path):
        if not isinstance(record, dict):
            raise UserError(f"{path}, line {lineno}: expected a JSON object, got "
                            f"{type(record).__name__}.")
        yield lineno, record


def _field(path: str, lineno: int, record: dict, key: str, kind: type):
    value = record.get(key)
    if not isinstance(value, kind):
        raise UserError(f"{path}, line {lineno}: field {key!r} is missing or not a "
                        f"{kind.__name__} (fields: {', '.join(sorted(record))}).")
    return value


_NTREX_LANGUAGES = {"en-de": ("deu", "German"), "en-fr": ("fra", "French")}


def _ntrex(data_dir: str, pair: str, n: int) -> GenerationSet:
    code, language = _NTREX_LANGUAGES[pair]
    src_path = _path(data_dir, "ntrex128_newstest2019.src.eng.txt")
    ref_path = _path(data_dir, f"ntrex128_newstest2019.ref.{code}.txt")
    sources_ = [line for _, line in sources.iter_lines(src_path)]
    refs = [line for _, line in sources.iter_lines(ref_path)]
    if len(sources_) != len(refs):
        raise UserError(f"{src_path} has {len(sources_)} lines but {ref_path} has {len(refs)}; "
                        "the files must be line-aligned.")
    examples = [Example(f"ntrex-{pair}-{i}",
                        _user(f"Translate this English text into {language}:\n{src}"),
                        f"English: {src}\n{language}:", [ref])
                for i, (src, ref) in enumerate(zip(sources_, refs))]
    return GenerationSet(examples[:n or None], ("bleu", "chrf"))


def _scitldr(data_dir: str, n: int) -> GenerationSet:
    path = _path(data_dir, "scitldr_a_test.jsonl.gz")
    examples = []
    for lineno, r in _first(_json_lines(path), n):
        abstract = " ".join(_field(path, lineno, r, "source", list))
        examples.append(Example(
            f"scitldr-{r.get('paper_id', lineno)}",
            _user(f"Write a one-sentence TL;DR of this paper abstract:\n{abstract}"),
            f"{abstract}\nTL;DR:", list(_field(path, lineno, r, "target", list))))
    return GenerationSet(examples, ("rouge",))


def _dialogsum(data_dir: str, n: int) -> GenerationSet:
    path = _path(data_dir, "dialogsum_test.jsonl.gz")
    examples = []
    for lineno, r in _first(_json_lines(path), n):
        dialogue = _field(path, lineno, r, "dialogue", str)
        refs = [r[k] for k in ("summary1", "summary2", "summary3") if isinstance(r.get(k), str)]
        if not refs:
            raise UserError(f"{path}, line {lineno}: no summary1/summary2/summary3 field.")
        examples.append(Example(f"dialogsum-{r.get('fname', lineno)}",
                                _user(f"Summarize this dialogue in one or two sentences:\n"
                                      f"{dialogue}"),
                                f"{dialogue}\nSummary:", refs))
    return GenerationSet(examples, ("rouge",))


def _self_instruct(data_dir: str, n: int) -> GenerationSet:
    path = _path(data_dir, "self_instruct_user_oriented_instructions.jsonl")
    examples = []
    for lineno, r in _first(_json_lines(path), n):
        instruction = _field(path, lineno, r, "instruction", str)
        instance = (_field(path, lineno, r, "instances", list) or [{}])[0]
        given = instance.get("input", "")
        prompt = f"{instruction}\n{given}" if given else instruction
        examples.append(Example(r.get("id", f"self_instruct-{lineno}"), _user(prompt),
                                f"{prompt}\n", [instance.get("output", "")]))
    return GenerationSet(examples, ("rouge", "token_f1"))


def _jsonl_examples(pattern: str) -> Iterator[Example]:
    for path in sources.expand_paths(pattern):
        for lineno, r in _json_lines(path):
            prompt = r.get("prompt")
            if isinstance(prompt, str):
                messages, plain = _user(prompt), prompt
            elif isinstance(prompt, list):
                messages = _checked_messages(f"{path}, line {lineno}", prompt, "prompt")
                plain = "\n".join(m["content"] for m in messages)
            else:
                raise UserError(f"{path}, line {lineno}: 'prompt' must be a string or a list of "
                                "{\"role\", \"content\"} messages.")
            refs = r.get("references", [r["reference"]] if "reference" in r else None)
            if (not isinstance(refs, list) or not refs
                    or not all(isinstance(x, str) for x in refs)):
                raise UserError(f"{path}, line {lineno}: needs 'references' (a non-empty list of "
                                "strings) or 'reference' (a string).")
            yield Example(str(r.get("id", f"{os.path.basename(path)}:{lineno}")), messages,
                          plain, refs)


def _checked_messages(where: str, messages, key: str) -> list[dict]:
    """`messages` as a valid conversation; `where` ("file, line 3") names it in errors."""
    if isinstance(messages, str):  # prepared datasets store the list as a JSON string
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: {key!r} is not a JSON list ({e.msg}).") from None
    try:
        chat_template.check(messages if isinstance(messages, list) else [messages])
    except chat_template.TemplateError as e:
        raise UserError(f"{where}: {key!r} is not a conversation ({e}); fix or remove it."
                        ) from None
    return messages


# ---------------------------------------------------------------------------------------------
# Likelihood.


def likelihood_records(source: str, *, n: int, split: str, run_cfg, workdir: str
                       ) -> list[dict]:
    """{"text": str} or {"messages": [...]} records of a likelihood source (first n)."""
    kind, _, rest = source.partition(":")
    # Prepared data may hold text and chat sources: read what the run trained on.
    want = "chat" if run_cfg is not None and run_cfg.get("task") == "sft" else "text"
    if source == "run":
        cache_dir = run_cfg.data.cache_dir or os.path.join(workdir, "data")
        return _prepared_records(prepare.prepare(run_cfg.data, cache_dir), split, n, want)
    if kind == "prepared" and rest:
        return _prepared_records(prepare.load(rest), split, n, want)
    if source == "synthetic:arithmetic":
        return [{"text": synthetic.text_document(i, "validation")}
                for i in range(n or SYNTHETIC_VALIDATION_DOCS)]
    if source == "synthetic:arithmetic_chat":
        return [{"messages": synthetic.dialogue(i, "validation")}
                for i in range(n or SYNTHETIC_VALIDATION_DOCS)]
    if kind == "text" and rest:
        texts = sources.read_text(sources.expand_paths(rest), run_cfg.data.text_unit,
                                  run_cfg.data.min_doc_chars)
        return [{"text": t} for t in _first(texts, n)]
    if kind == "jsonl" and rest:
        spec = sources.parse_source(source)
        texts = sources.read_jsonl(sources.expand_paths(spec.path), spec.field)
        return [{"text": t} for t in _first(texts, n)]
    if kind == "chat" and rest:
        return list(_first(_chat_records(rest), n))
    raise UserError(f"likelihood source {source!r} is unknown; use one of "
                    f"{', '.join(LIKELIHOOD_SOURCES)}.")


def _chat_records(pattern: str) -> Iterator[dict]:
    for path in sources.expand_paths(pattern):
        for lineno, r in _json_lines(path):
            if "messages" not in r:
                raise UserError(f"{path}, line {lineno}: no 'messages' field (fields: "
                                f"{', '.join(sorted(r))}); chat records are "
                                "{\"messages\": [{\"role\", \"content\"}, ...]}.")
            yield {"messages": _checked_messages(f"{path}, line {lineno}", r["messages"],
                                                  "messages")}


def _prepared_records(prepared: prepare.Prepared, split: str, n: int, want: str) -> list[dict]:
    """Records of a prepared split as {"text"} or {"messages"}: its `want` sources ("text" or
    "chat", mixed as training mixes them), else the other kind when it has only that."""
    kinds = [d.kind for d in prepared.datasets.values()]
    kind = want if want in kinds or not kinds else next(
        (k for k in ("text", "chat") if k in kinds), want)
    data = prepared.data_source(split, kind=kind)
    out = []
    for i in range(len(data) if n == 0 else min(n, len(data))):
        record = {k: v.decode("utf-8") if isinstance(v, bytes) else v for k, v in data[i].items()}
        if kind == "chat":
            where = f"{prepared.dataset_dir}, split {split}, record {i}"
            out.append({"messages": _checked_messages(where, record["messages"], "messages")})
        else:
            out.append({"text": record[prepared.text_field]})
    return out
