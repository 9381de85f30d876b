"""Readers, preparation, tokenizer and the embedded demo task."""

import gzip
import json
import os

import pytest

from conftest import SHARED_DATA
from data_pipelines import chat_template, prepare, sources, synthetic
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.core.errors import UserError

SHAKESPEARE = os.path.join(SHARED_DATA, "pretrain", "tinyshakespeare.txt")


@pytest.fixture(scope="module")
def shakespeare_tokenizer(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tok") / "tokenizer.model")
    docs = sources.read_text([SHAKESPEARE], "paragraph", 1000)
    return tokenizer_lib.train(docs, path, vocab_size=1000, max_chars=300_000)


def test_tokenizer_round_trips_any_text(shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    # Shakespeare is pure ASCII: everything below beyond it must go through byte fallback.
    texts = ["First Citizen:\nBefore we proceed any further, hear me speak.",
             "  leading spaces,\ttabs\n\n\nand blank lines  ",
             "héllo wörld — naïve café", "日本語のテキスト", "emoji 🤖🎭 and \x07 control",
             "math: 12345 + 67890 = 80235"]
    for text in texts:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert tokenizer_lib.UNK_ID not in ids
    # Digits are split one per token (here by bytes: Shakespeare has almost no digits).
    assert len(tok.encode("12345")) == 5


def test_chat_markers_are_single_reserved_tokens(shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    for marker in chat_template.MARKERS:
        ids = tok.encode(marker)
        assert ids == [tok.marker_ids[marker]]
    assert len(set(tok.marker_ids.values())) == len(chat_template.MARKERS)
    assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 2, 3)


def test_token_bytes_count_utf8_bytes(shakespeare_tokenizer):
    tok = shakespeare_tokenizer
    table = tok.token_bytes()
    for text in ["Now is the winter of our discontent", "naïve — 日本 🤖"]:
        assert sum(table[i] for i in tok.encode(text)) == len(text.encode("utf-8"))
    specials = [tok.pad_id, tok.bos_id, tok.eos_id, *tok.marker_ids.values()]
    assert all(table[i] == 0 for i in specials)


def test_tokenizer_training_is_deterministic(tmp_path):
    docs = list(sources.read_text([SHAKESPEARE], "paragraph", 1000))[:200]
    a = tokenizer_lib.train(docs, str(tmp_path / "a.model"), vocab_size=500)
    b = tokenizer_lib.train(docs, str(tmp_path / "b.model"), vocab_size=500)
    assert open(a.path, "rb").read() == open(b.path, "rb").read()


def test_foreign_sentencepiece_model_is_refused(tmp_path):
    import sentencepiece as spm

    spm.SentencePieceTrainer.train(sentence_iterator=iter(["a b c d e f g"] * 50),
                                   model_prefix=str(tmp_path / "plain"), vocab_size=12,
                                   hard_vocab_limit=False, minloglevel=2)
    with pytest.raises(UserError, match="not trained by t5x_like"):
        tokenizer_lib.Tokenizer(str(tmp_path / "plain.model"))


def test_text_units(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("para one\nline two\n\n\npara two\n\nthree\n")
    assert list(sources.read_text([str(path)], "paragraph", 0)) == [
        "para one\nline two", "para two", "three"]
    assert list(sources.read_text([str(path)], "line", 0)) == [
        "para one", "line two", "para two", "three"]
    assert list(sources.read_text([str(path)], "file", 0)) == [
        "para one\nline two\n\n\npara two\n\nthree"]
    # Merging keeps units together until a document is long enough.
    assert list(sources.read_text([str(path)], "paragraph", 12)) == [
        "para one\nline two", "para two\n\nthree"]


def test_gzip_and_globs(tmp_path):
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("zipped text\n")
    (tmp_path / "a.txt").write_text("plain text\n")
    paths = sources.expand_paths(str(tmp_path / "*.txt*"))
    assert list(sources.read_text(paths, "line", 0)) == ["plain text", "zipped text"]


def test_bad_inputs_name_file_and_line(tmp_path):
    bad_utf8 = tmp_path / "latin1.txt"
    bad_utf8.write_bytes("ok line\n".encode() + "caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1.txt, line 2: not valid UTF-8 \(byte 0xe9"):
        list(sources.read_text([str(bad_utf8)], "line", 0))

    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"text": "fine"}\n\n{"text": "also fine"\n')
    with pytest.raises(UserError, match=r"d.jsonl, line 3: not valid JSON"):
        list(sources.read_jsonl([str(jsonl)], "text"))
    jsonl.write_text('{"body": "x"}\n')
    with pytest.raises(UserError, match=r"line 1: no field 'text' \(fields: body\)"):
        list(sources.read_jsonl([str(jsonl)], "text"))
    jsonl.write_text('{"text": 3}\n')
    with pytest.raises(UserError, match="field 'text' is int, not a string"):
        list(sources.read_jsonl([str(jsonl)], "text"))

    truncated = tmp_path / "t.txt.gz"
    lines = "".join(f"line {i} {i * 7919 % 10007}\n" for i in range(5000)).encode()
    truncated.write_bytes(gzip.compress(lines)[:2000])
    with pytest.raises(UserError, match="t.txt.gz, line .*cannot read"):
        list(sources.read_text([str(truncated)], "line", 0))


def test_parse_source():
    assert sources.parse_source("jsonl:a/b:c.jsonl:body") == sources.Source(
        "jsonl", path="a/b:c.jsonl", field="body")
    assert sources.parse_source("tfds:lm1b/x:1.1.0") == sources.Source(
        "tfds", path="lm1b", config="x", version="1.1.0")
    with pytest.raises(UserError, match="needs a field name"):
        sources.parse_source("jsonl:docs.jsonl")
    with pytest.raises(UserError, match="unknown synthetic task 'chess'"):
        sources.parse_source("synthetic:chess")


def _data_cfg(tiny_cfg, source):
    tiny_cfg.data.source = source
    tiny_cfg.data.vocab_size = 400
    return tiny_cfg.data


def test_prepare_is_deterministic_and_cached(tiny_cfg, tmp_path):
    data = _data_cfg(tiny_cfg, f"text:{SHAKESPEARE}")
    a = prepare.prepare(data, str(tmp_path / "a"))
    b = prepare.prepare(data, str(tmp_path / "b"))
    for split in ("train", "validation"):
        sa, sb = a.data_source(split), b.data_source(split)
        assert len(sa) == len(sb) > 0
        assert [sa[i] for i in range(len(sa))] == [sb[i] for i in range(len(sb))]
    assert open(a.tokenizer_path, "rb").read() == open(b.tokenizer_path, "rb").read()
    # Validation and train are disjoint, and together hold every document.
    train = {a.data_source("train")[i]["text"] for i in range(a.splits["train"])}
    valid = {a.data_source("validation")[i]["text"] for i in range(a.splits["validation"])}
    assert not train & valid
    # (Cleaning and dedup drop none of Tiny Shakespeare's documents.)
    assert len(train) + len(valid) == len(list(sources.read_text(
        [SHAKESPEARE], data.text_unit, data.min_doc_chars)))
    # Same settings -> the same folder is reused; no temporary folders are left behind.
    assert prepare.prepare(data, str(tmp_path / "a")).dataset_dir == a.dataset_dir
    assert not [p for p in os.listdir(tmp_path / "a") if ".tmp" in p]


def test_too_small_vocab_is_named(tmp_path):
    docs = list(sources.read_text([SHAKESPEARE], "paragraph", 1000))[:50]
    with pytest.raises(UserError, match="'data.vocab_size': 300 is too small .* at least 3"):
        tokenizer_lib.train(docs, str(tmp_path / "t.model"), vocab_size=300)


def test_prepare_errors_leave_nothing_behind(tiny_cfg, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n  \n")
    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="produced no records"):
        prepare.prepare(_data_cfg(tiny_cfg, f"text:{empty}"), str(cache))
    few = tmp_path / "few.txt"
    few.write_text("one paragraph\n\nanother one\n\na third\n")
    data = _data_cfg(tiny_cfg, f"text:{few}")
    data.min_doc_chars = 0
    data.validation_fraction = 1e-6
    with pytest.raises(UserError, match="gave 3 records and none for validation"):
        prepare.prepare(data, str(cache))
    assert os.listdir(cache) == []


def test_prepared_source_and_jsonl(tiny_cfg, tmp_path):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(json.dumps({"body": f"document number {i} " * 5}) + "\n"
                            for i in range(200)))
    data = _data_cfg(tiny_cfg, f"jsonl:{docs}:body")
    out = tmp_path / "prepared"
    prepare.write(sources.parse_source(data.source), data, str(out))
    loaded = prepare.prepare(_data_cfg(tiny_cfg, f"prepared:{out}"), str(tmp_path / "unused"))
    assert loaded.splits["train"] + loaded.splits["validation"] == 200
    assert loaded.data_source("train")[0]["text"].startswith(b"document number")
    with pytest.raises(UserError, match="split 'test' does not exist"):
        loaded.data_source("test")


def test_tfds_source_reads_a_built_dataset(tiny_cfg, tmp_path):
    from data_pipelines import tfds_builder

    tfds_dir = tmp_path / "tfds"
    tfds_builder.build(str(tfds_dir), ("text",), {
        "train": lambda: ({"text": f"train doc {i}"} for i in range(50)),
        "validation": lambda: ({"text": f"valid doc {i}"} for i in range(5))}, "test set")
    data = _data_cfg(tiny_cfg, "tfds:records")
    data.tfds_data_dir = str(tfds_dir)
    got = prepare.prepare(data, str(tmp_path / "cache"))
    assert got.splits == {"train": 50, "validation": 5}
    assert tokenizer_lib.Tokenizer(got.tokenizer_path).decode(
        tokenizer_lib.Tokenizer(got.tokenizer_path).encode("train doc 7")) == "train doc 7"
    data.text_field = "body"
    with pytest.raises(UserError, match="has no feature 'body'"):
        prepare.prepare(data, str(tmp_path / "cache"))
    data.source = "tfds:no_such_dataset_here"
    with pytest.raises(UserError, match="no_such_dataset_here"):
        prepare.prepare(data, str(tmp_path / "cache"))


def test_synthetic_task_is_checkable_and_held_out():
    for i in range(50):
        doc = synthetic.text_document(i, "train")
        assert synthetic.text_document(i, "train") == doc  # pure function of the index
        for line in doc.splitlines():
            problem = synthetic.parse_question(line)
            assert problem is not None and not problem.held_out
            assert line.rstrip(".").endswith(str(problem.answer))
    held_out = [synthetic.dialogue(i, "validation") for i in range(50)]
    for messages in held_out:
        for user, assistant in zip(messages[-2::-2], messages[-1::-2]):
            assert synthetic.parse_question(user["content"]).held_out
            assert synthetic.check_answer(user["content"], assistant["content"])
    pair = synthetic.answer_pair(3, "train")
    question = pair["prompt"][-1]["content"]
    assert synthetic.check_answer(question, pair["chosen"])
    assert not synthetic.check_answer(question, pair["rejected"])
    assert synthetic.check_answer("What is 12 - 30?", "-18")
    assert not synthetic.check_answer("What is 12 - 30?", "18")
