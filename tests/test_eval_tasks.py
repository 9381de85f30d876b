"""Evaluation data: the built-in readers over ../shared/data/eval, tasks as JSONL, chat
records, and one-sentence errors for bad input."""

import gzip
import json
import os

import ml_collections
import pytest

from conftest import SHARED_DATA
from data_pipelines import synthetic
from t5x_like.evaluation import eval_tasks
from t5x_like.core.errors import UserError

EVAL_DIR = os.path.join(SHARED_DATA, "eval")


def lines(name):
    with open(os.path.join(EVAL_DIR, name), encoding="utf-8") as f:
        return f.read().splitlines()


def test_ntrex_pairs_source_and_reference_lines():
    for pair, code, language in (("en-de", "deu", "German"), ("en-fr", "fra", "French")):
        got = eval_tasks.generation_set(f"ntrex:{pair}", data_dir=EVAL_DIR, n=5)
        src, ref = lines("ntrex128_newstest2019.src.eng.txt"), lines(
            f"ntrex128_newstest2019.ref.{code}.txt")
        assert len(got.examples) == 5 and got.metrics == ("bleu", "chrf")
        for i, ex in enumerate(got.examples):
            assert ex.references == [ref[i]]
            assert src[i] in ex.messages[-1]["content"] and language in ex.messages[-1]["content"]
            assert ex.plain.startswith(f"English: {src[i]}")
    assert len(eval_tasks.generation_set("ntrex:en-de", data_dir=EVAL_DIR, n=0).examples) == 1997


def test_summarization_and_instruction_readers():
    with gzip.open(os.path.join(EVAL_DIR, "scitldr_a_test.jsonl.gz"), "rt") as f:
        first = json.loads(f.readline())
    sci = eval_tasks.generation_set("scitldr", data_dir=EVAL_DIR, n=3)
    assert sci.examples[0].references == first["target"] and 2 <= len(first["target"]) <= 4
    assert " ".join(first["source"]) in sci.examples[0].messages[0]["content"]
    assert sci.metrics == ("rouge",)
    dsum = eval_tasks.generation_set("dialogsum", data_dir=EVAL_DIR, n=3)
    assert all(len(ex.references) == 3 for ex in dsum.examples)
    assert "#Person1#" in dsum.examples[0].messages[0]["content"]
    si = eval_tasks.generation_set("self_instruct", data_dir=EVAL_DIR, n=0)
    assert len(si.examples) == 252
    record = json.loads(lines("self_instruct_user_oriented_instructions.jsonl")[0])
    assert si.examples[0].references == [record["instances"][0]["output"]]
    assert si.examples[0].messages[0]["content"].startswith(record["instruction"])
    assert record["instances"][0]["input"] in si.examples[0].messages[0]["content"]


def test_arithmetic_uses_held_out_questions_checked_as_numbers():
    got = eval_tasks.generation_set("synthetic:arithmetic", data_dir="", n=50)
    assert len(got.examples) == 50
    for i, ex in enumerate(got.examples):
        pair = synthetic.answer_pair(i, "validation")  # the prompts preference tuning sees
        assert ex.messages == pair["prompt"] and ex.references == [pair["chosen"]]
        problem = synthetic.parse_question(ex.plain)
        assert problem.held_out and ex.references == [str(problem.answer)]
        assert ex.messages[-1] == {"role": "user", "content": ex.plain}
        assert got.check(ex, f"It is {problem.answer}.") and not got.check(ex, "I don't know")
        assert not got.check(ex, f"{problem.answer + 1}")
    assert any(ex.messages[0]["role"] == "system" for ex in got.examples)


def test_tasks_as_jsonl(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(
        json.dumps({"id": "q1", "prompt": "Capital of France?", "references": ["Paris"]}) + "\n\n"
        + json.dumps({"prompt": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "2+2?"}], "reference": "4"}) + "\n")
    got = eval_tasks.generation_set(f"jsonl:{path}", data_dir="", n=0)
    assert [ex.id for ex in got.examples] == ["q1", "qa.jsonl:3"]
    assert got.examples[0].messages == [{"role": "user", "content": "Capital of France?"}]
    assert got.examples[1].references == ["4"] and got.examples[1].messages[0]["role"] == "system"
    assert got.metrics == ("exact_match", "token_f1")


@pytest.mark.parametrize("content, message", [
    ('{"prompt": "hi", "references": ["a"]}\n{"prompt": "x", "references": ["a"]\n',
     r"bad.jsonl, line 2: not valid JSON"),
    ('{"prompt": "hi"}\n', r"bad.jsonl, line 1: needs 'references'"),
    ('{"prompt": 3, "references": ["a"]}\n', r"bad.jsonl, line 1: 'prompt' must be"),
    ('{"prompt": [{"role": "robot", "content": "x"}], "references": ["a"]}\n',
     r"bad.jsonl, line 1: 'prompt' is not a conversation"),
    ('[1, 2]\n', r"bad.jsonl, line 1: expected a JSON object"),
])
def test_bad_task_files_name_file_and_line(tmp_path, content, message):
    (tmp_path / "bad.jsonl").write_text(content)
    with pytest.raises(UserError, match=message):
        eval_tasks.generation_set(f"jsonl:{tmp_path / 'bad.jsonl'}", data_dir="", n=0)


def test_unknown_sources_and_missing_files():
    with pytest.raises(UserError, match="generation source 'ntrex:en-es' is unknown"):
        eval_tasks.generation_set("ntrex:en-es", data_dir=EVAL_DIR, n=1)
    with pytest.raises(UserError, match="/nowhere/dialogsum_test.jsonl.gz does not exist; set "
                                        "config key 'data_dir'"):
        eval_tasks.generation_set("dialogsum", data_dir="/nowhere", n=1)
    with pytest.raises(UserError, match="no file matches"):
        eval_tasks.generation_set("jsonl:/nowhere/*.jsonl", data_dir="", n=1)
    with pytest.raises(UserError, match="likelihood source 'wiki' is unknown"):
        eval_tasks.likelihood_records("wiki", n=1, split="validation", run_cfg=None, workdir="")


def test_likelihood_records_from_files(tmp_path):
    cfg = ml_collections.ConfigDict({"data": {"text_unit": "paragraph", "min_doc_chars": 0}})
    (tmp_path / "a.txt").write_text("First para.\n\nSecond para.\n")
    kw = dict(split="validation", run_cfg=cfg, workdir=str(tmp_path))
    assert eval_tasks.likelihood_records(f"text:{tmp_path / 'a.txt'}", n=0, **kw) == [
        {"text": "First para."}, {"text": "Second para."}]
    (tmp_path / "d.jsonl").write_text('{"body": "x y"}\n{"body": "z"}\n')
    assert eval_tasks.likelihood_records(f"jsonl:{tmp_path / 'd.jsonl'}:body", n=1, **kw) == [
        {"text": "x y"}]
    conversation = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    (tmp_path / "c.jsonl").write_text(
        json.dumps({"messages": conversation}) + "\n"
        + json.dumps({"messages": json.dumps(conversation)}) + "\n")  # as prepared data stores it
    assert eval_tasks.likelihood_records(f"chat:{tmp_path / 'c.jsonl'}", n=0, **kw) == [
        {"messages": conversation}] * 2
    (tmp_path / "bad.jsonl").write_text(json.dumps({"messages": conversation}) + "\n"
                                        + json.dumps({"text": "no messages"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl, line 2: no 'messages' field"):
        eval_tasks.likelihood_records(f"chat:{tmp_path / 'bad.jsonl'}", n=0, **kw)
    demo = eval_tasks.likelihood_records("synthetic:arithmetic_chat", n=4, **kw)
    assert demo == [{"messages": synthetic.dialogue(i, "validation")} for i in range(4)]


def test_prepared_records_follow_the_kind_the_run_trained_on(tiny_cfg, tmp_path):
    """A prepared chat dataset gives {"messages"} records, the held-out dialogues themselves,
    for a chat run and for a text run alike (it has no text source)."""
    from data_pipelines import prepare

    tiny_cfg.data.source = "synthetic:arithmetic_chat"
    tiny_cfg.data.synthetic_docs = 200
    tiny_cfg.data.vocab_size = 400
    prepared = prepare.prepare(tiny_cfg.data, tiny_cfg.data.cache_dir)
    [folder] = os.listdir(tiny_cfg.data.cache_dir)
    folder = os.path.join(tiny_cfg.data.cache_dir, folder)
    n_valid = prepared.datasets[next(iter(prepared.datasets))].splits["validation"]
    want = sorted(json.dumps(synthetic.dialogue(i, "validation")) for i in range(n_valid))
    for task in ("sft", "pretrain"):
        run_cfg = ml_collections.ConfigDict({"task": task, "data": tiny_cfg.data})
        for source in (f"prepared:{folder}", "run"):
            got = eval_tasks.likelihood_records(source, n=0, split="validation",
                                                run_cfg=run_cfg, workdir=str(tmp_path))
            assert sorted(json.dumps(r["messages"]) for r in got) == want  # stored shuffled
        assert len(eval_tasks.likelihood_records(source, n=3, split="validation",
                                                 run_cfg=run_cfg, workdir="")) == 3
