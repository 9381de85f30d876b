"""Data preparation at scale: readers, cleaning, dedup, splits, mixtures, report, Beam, tokenizer
quality. Every stage on small crafted inputs; each preparation takes a second or two."""

import glob
import gzip
import json
import os
import random
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from conftest import ROOT, SHARED_DATA
from data_pipelines import clean, dedup, pipeline, prepare, readers, records, sources
from data_pipelines import tokenizer as tokenizer_lib
from data_pipelines import tokenizer_eval
from t5x_like.core import config as config_lib
from t5x_like.core.errors import UserError

WORDS = ("river stone market winter lantern garden copper signal harbor violet candle meadow "
         "thunder pepper silver orchard canyon marble falcon willow ember saddle velvet beacon "
         "quartz tundra cobalt juniper fable harvest ripple summit amber glacier hollow prism "
         "lagoon timber comet bramble nectar walnut cipher drift echo fjord grove ivory kettle"
         ).split()


def doc(seed: int, n: int = 60) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def near_copy(text: str, changes: int = 3, seed: int = 0) -> str:
    """The same text with a few words replaced (a near-duplicate)."""
    rng = random.Random(seed)
    words = text.split()
    for i in rng.sample(range(len(words)), changes):
        words[i] = "zzz" + words[i]
    return " ".join(words)


def data_cfg(**sources_):
    from configs import base

    cfg = base.get_config().data
    cfg.vocab_size = 320
    cfg.validation_fraction = 0.3
    for name, (spec, weight) in sources_.items():
        cfg.sources[name] = ml_collections.ConfigDict({"source": spec, "weight": weight})
    return cfg


def write_jsonl(path, rows):
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def all_records(prepared_dir: str) -> dict[str, list]:
    """{TFDS split: [records]} of a prepared folder, in stored order."""
    from data_pipelines import tfds_builder

    meta = json.load(open(os.path.join(prepared_dir, "prepare.json")))
    splits = tfds_builder.data_sources(os.path.join(prepared_dir, meta["dataset_dir"]))
    return {name: [split[i] for i in range(len(split))] for name, split in splits.items()}


def texts_of(prepared_dir: str, name: str, split: str, kind: str = "text") -> list[str]:
    return [records.text_view(records.decode(r, kind), kind)
            for r in all_records(prepared_dir)[f"{name}-{split}"]]


# ---------------------------------------------------------------------------------------------
# Cleaning stages, one by one.

OPTS = prepare.options(data_cfg())


def test_html_is_stripped_only_from_markup():
    html = ("<html><head><title>T</title><style>p {color: red}</style></head><body>"
            "<h1>Heading</h1><p>Fish &amp; chips <b>today</b></p><script>var x = 1;</script>"
            "<ul><li>one</li><li>two</li></ul></body></html>")
    out = clean.strip_html(html)
    assert "Fish & chips today" in out
    assert "var x" not in out and "color" not in out and "<" not in out
    assert out.split() == ["Heading", "Fish", "&", "chips", "today", "one", "two"]
    assert "\n" in out.strip()  # block elements became line breaks
    for plain in ("if a < b and c > d then swap", "the <|user|> marker stays", "x<y"):
        assert clean.strip_html(plain) == plain
    # Chat replies keep their HTML (answers about code): the stage is for text records.
    rec = {"messages": [{"role": "user", "content": "An HTML list?"},
                        {"role": "assistant", "content": "<ul><li>a</li><li>b</li></ul>"}]}
    assert clean.clean_record(rec, "chat", OPTS)[0] == rec


def test_fix_text_unicode_and_whitespace():
    assert clean.fix_text("The caf\u00c3\u00a9 is open") == "The café is open"  # mojibake
    assert clean.fix_text("bell\x07 and \x1b[31mred\x1b[0m") == "bell and red"
    assert clean.fix_text("plain ascii, untouched") == "plain ascii, untouched"
    cfg = dict(OPTS, unicode="NFKC")
    composed = clean.clean_record({"text": "Cafe\u0301 \ufb01ne \uff21"}, "text", OPTS)[0]
    assert composed["text"] == "Café \ufb01ne \uff21"  # NFC composes, keeps compatibility forms
    assert clean.clean_record({"text": "Cafe\u0301 \ufb01ne \uff21"}, "text", cfg)[0]["text"] == (
        "Café fine A")
    messy = "a\u00a0b\u200b c  \nline with trailing   \n\n\n\n\nnext\r\nlast\t "
    assert clean.normalize_whitespace(messy) == "a b c\nline with trailing\n\nnext\nlast"
    assert clean.normalize_whitespace("    indented code\n        deeper") == (
        "    indented code\n        deeper")


def test_boilerplate_lines_are_removed():
    page = ("Welcome to the article about rivers.\nThis website uses cookies to improve your "
            "experience.\nRivers carry water to the sea.\nAll rights reserved.\nClick here to "
            "subscribe!\n© 2023 Example Inc.")
    out = clean.remove_boilerplate(page)
    assert out == "Welcome to the article about rivers.\nRivers carry water to the sea."
    long_line = "We discuss the cookie policy debate at length. " * 6  # > 200 chars: prose
    assert clean.remove_boilerplate(long_line) == long_line


def test_each_stage_is_switchable_and_counted():
    text = "<p>Hello&nbsp;world</p><p>Visit  the   caf\u00c3\u00a9</p>\nClick here to subscribe"
    stages = [s for s in clean.STAGES if s not in ("lowercase", "stopwords")]
    cleaned, changed, reason = clean.clean_record({"text": text}, "text", OPTS)
    assert reason == "" and changed == ["html", "fix_text", "boilerplate", "whitespace"]
    assert cleaned["text"] == "Hello world\n\nVisit  the   café"
    off = {**OPTS, **{s: False for s in stages}, "unicode": ""}
    assert clean.clean_record({"text": text}, "text", off) == ({"text": text}, [], "")
    lowered, changed, _ = clean.clean_record(
        {"text": "The Cat sat on the Mat"}, "text", dict(OPTS, lowercase=True, stopwords="en"))
    assert lowered["text"] == "cat sat mat" and changed == ["lowercase", "stopwords"]


def test_length_and_repetition_filters():
    opts = dict(OPTS, min_chars=10, max_chars=500)
    assert clean.filter_reason("short", opts) == "min_chars"
    assert clean.filter_reason("x" * 501, opts) == "max_chars"
    assert clean.filter_reason(doc(1), opts) == ""
    looping = " ".join(["I am sorry but I cannot help you with that request today"] * 6)
    assert clean.dup_ngram_fraction(looping, 10) > 0.9
    assert clean.filter_reason(looping, OPTS) == "dup_ngrams"
    assert clean.dup_ngram_fraction(doc(2, 200), 10) == 0.0
    repeated_lines = "\n".join(["the same long line of text again"] * 4 + ["one other line"])
    assert clean.filter_reason(repeated_lines, OPTS) == "dup_lines"
    # Repetition is per message: an answer restating its question is no loop.
    question = "Rewrite this sentence to be shorter: " + doc(3, 30)
    rec = {"messages": [{"role": "user", "content": question},
                        {"role": "assistant", "content": doc(3, 30)}]}
    assert clean.clean_record(rec, "chat", OPTS)[2] == ""
    pair = {"prompt": [{"role": "user", "content": "Hi"}], "chosen": "Same.", "rejected": "Same."}
    assert clean.clean_record(pair, "preference", OPTS)[2] == "chosen_is_rejected"
    assert clean.clean_record({"text": "<p></p><b></b>"}, "text", OPTS)[2] == "empty"


# ---------------------------------------------------------------------------------------------
# Readers: every format -> the three schemas; bad input named by file and line.


def test_formats_normalize_to_the_schemas(tmp_path):
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([
        {"instruction": "Add the numbers.", "input": "2 and 3", "output": "5"},
        {"instruction": "Say hi.", "input": "", "output": "Hi!"}], indent=1))
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [{"instruction": "Classify.", "instances": [
        {"input": "a cat", "output": "animal"}, {"input": "a car", "output": "vehicle"}]}])
    sgd = tmp_path / "sgd.json.gz"
    with gzip.open(sgd, "wt") as f:
        json.dump([{"dialogue_id": "1", "turns": [
            {"speaker": "USER", "utterance": "Book a table.", "frames": []},
            {"speaker": "SYSTEM", "utterance": "For how many?", "frames": []},
            {"speaker": "USER", "utterance": "Two.", "frames": []}]}], f)
    hh = write_jsonl(tmp_path / "hh.jsonl", [{
        "chosen": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me.\n\nAssistant: Sure.",
        "rejected": "\n\nHuman: Hi\n\nAssistant: Hello!\n\nHuman: Help me.\n\nAssistant: No."}])
    chat = write_jsonl(tmp_path / "chat.jsonl", [{"conv": [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"}]}])
    cfg = data_cfg()

    def read(spec):
        return [it.record for it in readers.items(sources.parse_source(spec), cfg)]

    assert read(f"alpaca:{alpaca}") == [
        {"messages": [{"role": "user", "content": "Add the numbers.\n\n2 and 3"},
                      {"role": "assistant", "content": "5"}]},
        {"messages": [{"role": "user", "content": "Say hi."},
                      {"role": "assistant", "content": "Hi!"}]}]
    assert [r["messages"][0]["content"] for r in read(f"alpaca:{seeds}")] == [
        "Classify.\n\na cat", "Classify.\n\na car"]
    assert read(f"sgd:{sgd}") == [{"messages": [
        {"role": "user", "content": "Book a table."},
        {"role": "assistant", "content": "For how many?"}, {"role": "user", "content": "Two."}]}]
    assert read(f"preference:{hh}") == [{"prompt": [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Help me."}], "chosen": "Sure.", "rejected": "No."}]
    assert read(f"chat:{chat}:conv")[0]["messages"][0] == {"role": "system",
                                                           "content": "Be brief."}
    stored = records.encode(read(f"preference:{hh}")[0], "preference")
    assert set(stored) == {"prompt", "chosen", "rejected"}
    assert json.loads(stored["prompt"])[-1] == {"role": "user", "content": "Help me."}


def test_json_arrays_stream_element_by_element(tmp_path, monkeypatch):
    monkeypatch.setattr(readers, "_CHUNK", 7)  # values straddle many chunk boundaries
    rows = [{"text": f"record {i} " + "é" * (i % 5), "n": [i, {"deep": "]},[{"}]}
            for i in range(40)]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(rows, indent=2, ensure_ascii=False))
    got = list(readers.json_values(str(path)))
    assert [v for _, v in got] == rows
    lines = path.read_text().split("\n")
    first_line = int(str(got[3][0]).split()[0])
    assert lines[first_line - 1].strip() == "{"
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"text": "a"},\n {"text": "b"\n {"text": "c"}\n]')
    with pytest.raises(UserError, match=r"broken.json, line 4: not a valid JSON array"):
        list(readers.json_values(str(broken)))


def test_bad_records_stop_or_are_skipped_and_counted(tmp_path):
    path = write_jsonl(tmp_path / "docs.jsonl", [
        {"body": doc(1)}, '{"body": "not closed', {"other": "x"}, {"body": 7}, {"body": doc(2)}])
    cfg = data_cfg()
    with pytest.raises(UserError, match=r"docs.jsonl, line 2: .*not valid JSON.*"
                                        r"data.on_bad_record=skip"):
        list(readers.items(sources.parse_source(f"jsonl:{path}:body"), cfg))
    cfg.on_bad_record = "skip"
    got = list(readers.items(sources.parse_source(f"jsonl:{path}:body"), cfg))
    assert [bool(it.error) for it in got] == [False, True, True, True, False]
    assert "no field 'body' (fields: other)" in got[2].error
    assert "is int, not a string" in got[3].error
    # A wrong field name for every record: all skipped -> one error naming the first.
    cfg.sources.docs = ml_collections.ConfigDict({"source": f"jsonl:{path}:text", "weight": 1.0})
    with pytest.raises(UserError, match=r"kept none of its 5 records \(bad 5\).*line 1: no field "
                                        r"'text'"):
        prepare.write_sources(prepare.named_sources(cfg), cfg, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_broken_utf8_errors_skips_or_repairs(tmp_path):
    path = tmp_path / "mixed.txt"
    path.write_bytes(b"good line one\ncaf\xe9 latin-1 line\ngood line three\n")
    cfg = data_cfg()
    cfg.text_unit, cfg.min_doc_chars = "line", 0
    spec = sources.parse_source(f"text:{path}")
    with pytest.raises(UserError, match=r"mixed.txt, line 2: not valid UTF-8 \(byte 0xe9"):
        list(readers.items(spec, cfg))
    cfg.on_bad_record = "skip"
    got = list(readers.items(spec, cfg))
    assert [it.record["text"] if it.record else it.error[:9] for it in got] == [
        "good line one", "not valid", "good line three"]
    cfg.clean.repair_utf8 = True
    counts = {}
    got = [it.record["text"] for it in readers.items(spec, cfg, counts)]
    assert got[1] == "café latin-1 line" and counts == {"utf8_repaired": 1}


# ---------------------------------------------------------------------------------------------
# Deduplication and the train/validation split.


def test_normalized_exact_keys_and_minhash_similarity():
    assert dedup.exact_key("Hello,  World!") == dedup.exact_key("hello world")
    assert dedup.exact_key("Hello world") != dedup.exact_key("Hello word")
    text = doc(5, 200)
    a, b, c = dedup.signatures([dedup.normalize(t) for t in (text, near_copy(text), doc(6, 200))],
                               num_perm=128, seed=1, ngram=5)
    assert dedup.similarity(a, b) >= 0.8 > 0.2 > dedup.similarity(a, c)
    assert dedup.band_keys(a.hashvalues, 0.8) != dedup.band_keys(c.hashvalues, 0.8)
    # Same seed, same signature; another seed, another one.
    again = dedup.signatures([dedup.normalize(text)], num_perm=128, seed=1, ngram=5)[0]
    other = dedup.signatures([dedup.normalize(text)], num_perm=128, seed=2, ngram=5)[0]
    assert np.array_equal(a.hashvalues, again.hashvalues)
    assert not np.array_equal(a.hashvalues, other.hashvalues)


def _corpus(tmp_path):
    """Two text sources with exact and near duplicates within and across them."""
    base_docs = [doc(i, 200) for i in range(60)]
    first = base_docs[:40] + [base_docs[3].upper(), near_copy(base_docs[5], 3, seed=1)]
    second = base_docs[40:] + [near_copy(base_docs[7], 2, seed=2), base_docs[8] + "!!"]
    a = write_jsonl(tmp_path / "a.jsonl", [{"text": t} for t in first])
    b = write_jsonl(tmp_path / "b.jsonl", [{"text": t} for t in second])
    return a, b


def test_exact_and_near_duplicates_across_sources(tmp_path):
    a, b = _corpus(tmp_path)
    cfg = data_cfg(aa=(f"jsonl:{a}:text", 1.0), bb=(f"jsonl:{b}:text", 1.0))
    out = str(tmp_path / "out")
    report = prepare.write_sources(prepare.named_sources(cfg), cfg, out)
    fa, fb = report["sources"]["aa"]["funnel"], report["sources"]["bb"]["funnel"]
    assert (fa.get("exact", 0), fa.get("near", 0)) == (1, 1)  # the upper-cased copy, the edit
    assert (fb.get("exact", 0), fb.get("near", 0)) == (1, 1)  # both copies of source aa's docs
    assert report["sources"]["bb"]["duplicate_of"] == {"aa": 2}
    kept = [t for n in ("aa", "bb") for s in ("train", "validation") for t in texts_of(out, n, s)]
    assert len(kept) == 60 and len({dedup.exact_key(t) for t in kept}) == 60
    # Validation is never contaminated: no train record is a near copy of a validation one.
    sigs = {s: dedup.signatures([dedup.normalize(t) for n in ("aa", "bb")
                                 for t in texts_of(out, n, s)], num_perm=128, seed=1, ngram=5)
            for s in ("train", "validation")}
    worst = max(dedup.similarity(t, v) for t in sigs["train"] for v in sigs["validation"])
    assert worst < 0.5


def test_decontamination_without_near_dedup(tmp_path):
    base_docs = [doc(100 + i, 200) for i in range(40)]
    cfg = data_cfg()
    cfg.validation_fraction = 0.3
    validation = [t for t in base_docs
                  if dedup.in_validation(dedup.exact_key(t), cfg.validation_fraction)]
    # Near copies of validation documents, each of which the hash puts in train.
    copies = []
    for i, v in enumerate(validation):
        for seed in range(50):
            c = near_copy(v, 2, seed=1000 * i + seed)
            if not dedup.in_validation(dedup.exact_key(c), cfg.validation_fraction):
                copies.append(c)
                break
    path = write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in copies + base_docs])
    cfg.sources.d = ml_collections.ConfigDict({"source": f"jsonl:{path}:text", "weight": 1.0})
    cfg.dedup.near = False
    report = prepare.write_sources(prepare.named_sources(cfg), cfg, str(tmp_path / "clean"))
    assert report["sources"]["d"]["funnel"].get("contaminated") == len(copies) > 0
    assert sorted(texts_of(str(tmp_path / "clean"), "d", "train")) == sorted(
        t for t in base_docs if t not in validation)
    cfg.dedup.decontaminate = False  # the contrast: the copies stay, contaminating validation
    report = prepare.write_sources(prepare.named_sources(cfg), cfg, str(tmp_path / "dirty"))
    assert report["sources"]["d"]["splits"]["train"] == len(base_docs) - len(validation) + len(
        copies)


# ---------------------------------------------------------------------------------------------
# The whole preparation: determinism, parallelism, Beam, report, mixtures.


def _mixed_sources(tmp_path):
    a, b = _corpus(tmp_path)
    alpaca = tmp_path / "alpaca.json"
    alpaca.write_text(json.dumps([{"instruction": f"Describe item {i}: {doc(200 + i, 12)}",
                                   "input": "", "output": doc(300 + i, 40)}
                                  for i in range(30)] + [
        {"instruction": "Describe item 0: " + doc(200, 12), "input": "", "output": doc(300, 40)}]))
    hh = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": f"\n\nHuman: {doc(400 + i, 10)}\n\nAssistant: {doc(500 + i, 30)}",
         "rejected": f"\n\nHuman: {doc(400 + i, 10)}\n\nAssistant: {doc(600 + i, 12)}"}
        for i in range(30)] + ['{"chosen": "broken', {"chosen": "\n\nHuman: a", "rejected": "b"}])
    # Web pages sharing a navigation line, and one page too long (split at max_doc_chars),
    # in UTF-16: weight 0, prepared but outside the text mixture the tests below check.
    web = tmp_path / "web.jsonl"
    web.write_bytes(b"\xff\xfe" + "".join(
        json.dumps({"text": f"Home | About | Contact\n{doc(700 + i, 30)}\n{doc(800 + i, 30)}"})
        + "\n" for i in range(12)).encode("utf-16-le") + (json.dumps(
            {"text": " ".join(doc(900 + i, 40) for i in range(30))}) + "\n").encode("utf-16-le"))
    cfg = data_cfg(aa=(f"jsonl:{a}:text", 0.7), bb=(f"jsonl:{b}:text", 0.3),
                   chat=(f"alpaca:{alpaca}", 1.0), pairs=(f"preference:{hh}", 1.0),
                   web=(f"jsonl:{web}:text", 0.0))
    cfg.on_bad_record = "skip"
    cfg.clean.max_doc_chars = 3000
    return cfg


def test_same_seed_same_bytes_any_worker_count(tmp_path):
    cfg = _mixed_sources(tmp_path)
    named = prepare.named_sources(cfg)
    prepare.write_sources(named, cfg, str(tmp_path / "one"))
    cfg.num_workers = 2
    prepare.write_sources(named, cfg, str(tmp_path / "two"))
    files = sorted(os.path.relpath(p, tmp_path / "one")
                   for p in glob.glob(str(tmp_path / "one" / "**" / "*"), recursive=True)
                   if os.path.isfile(p))
    assert "tokenizer.model" in files and "plots/funnel.png" in files
    for rel in files:
        a, b = (open(tmp_path / d / rel, "rb").read() for d in ("one", "two"))
        if rel == "report.json":  # timings and the worker count differ, nothing else
            a, b = (json.loads(x) for x in (a, b))
            for r in (a, b):
                r.pop("throughput"), r.pop("num_workers")
        elif rel.endswith(".md") or rel.endswith("dataset_info.json"):
            continue  # timings / TFDS's own timestamps
        assert a == b, rel


def test_beam_path_on_direct_runner_keeps_the_same_records(tmp_path):
    cfg = _mixed_sources(tmp_path)
    named = prepare.named_sources(cfg)
    local = prepare.write_sources(named, cfg, str(tmp_path / "local"))
    cfg.runner = "beam"
    beam = prepare.write_sources(named, cfg, str(tmp_path / "beam"))
    assert all_records(str(tmp_path / "beam")) == all_records(str(tmp_path / "local"))
    for name in named:
        assert beam["sources"][name]["funnel"] == local["sources"][name]["funnel"], name
        assert beam["sources"][name]["duplicate_of"] == local["sources"][name]["duplicate_of"]
    assert local["sources"]["pairs"]["funnel"]["bad"] == 2
    # Repeated lines and split documents: the same counts on both paths.
    for key in ("repeated_lines", "long_docs"):
        for field in ("lines", "removed", "docs", "pieces", "largest_chars"):
            assert beam["sources"]["web"][key].get(field) == local["sources"]["web"][key].get(
                field), (key, field)
    assert local["sources"]["web"]["repeated_lines"]["removed"] == 12
    assert local["sources"]["web"]["long_docs"]["docs"] == 1
    assert open(tmp_path / "beam" / "tokenizer.model", "rb").read() == open(
        tmp_path / "local" / "tokenizer.model", "rb").read()


@pytest.mark.slow
def test_beam_decontamination_matches_local(tmp_path):
    # Near dedup off: train records are checked against validation ones by a band join.
    cfg = _mixed_sources(tmp_path)
    cfg.dedup.near = False
    named = prepare.named_sources(cfg)
    local = prepare.write_sources(named, cfg, str(tmp_path / "local"))
    cfg.runner = "beam"
    beam = prepare.write_sources(named, cfg, str(tmp_path / "beam"))
    assert all_records(str(tmp_path / "beam")) == all_records(str(tmp_path / "local"))
    for name in named:
        assert beam["sources"][name]["funnel"] == local["sources"][name]["funnel"], name


def test_report_counts_lengths_roles_skew_and_plots(tmp_path):
    cfg = _mixed_sources(tmp_path)
    out = tmp_path / "out"
    prepare.write_sources(prepare.named_sources(cfg), cfg, str(out))
    report = json.load(open(out / "report.json"))
    src, stats = report["sources"], report["stats"]
    assert src["pairs"]["funnel"]["read"] == 32 and src["pairs"]["funnel"]["bad"] == 2
    assert len(src["pairs"]["bad_examples"]) == 2
    assert src["chat"]["funnel"]["exact"] == 1  # the repeated Alpaca record
    assert sum(src["chat"]["splits"].values()) == 30
    assert stats["chat"]["roles"]["user"]["message_share"] == 0.5
    train = stats["pairs"]["train"]
    assert train["chosen_longer_share"] == 1.0  # chosen replies were written 30 words long
    assert train["length_skew_tokens"] > 1.5
    assert train["records"] == src["pairs"]["splits"]["train"]
    assert stats["aa"]["train"]["tokens"]["total"] == stats["aa"]["train_tokens"]
    assert stats["aa"]["top_tokens"] and report["mixture"]["aa"]["record_share"] == 0.7
    assert report["mixture"]["chat"]["record_share"] == 1.0  # weights are per kind
    md = (out / "report.md").read_text()
    for needle in ("| aa | 42 |", "## Preference pairs", "## Dialogue balance",
                   "plots/funnel.png", "MB/s"):
        assert needle in md, needle
    for plot in report["plots"]:
        assert open(out / plot, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert {"plots/funnel.png", "plots/dialogues.png", "plots/preference_pairs.png"} <= set(
        report["plots"])
    meta = json.load(open(out / "prepare.json"))
    assert {n: d["kind"] for n, d in meta["datasets"].items()} == {
        "aa": "text", "bb": "text", "chat": "chat", "pairs": "preference", "web": "text"}


def test_text_mixture_is_mixed_by_weight_and_seed(tmp_path):
    cfg = _mixed_sources(tmp_path)
    out = str(tmp_path / "out")
    prepare.write_sources(prepare.named_sources(cfg), cfg, out)
    prepared = prepare.load(out)
    train = prepared.data_source("train")
    assert isinstance(train, pipeline.Mixture)
    assert train.names == ("aa", "bb") and train.weights == (0.7, 0.3)
    assert set(train[0]) == {"text"}  # exactly the text schema, though chat is stored too
    chat = prepared.data_source("train", kind="chat")
    assert set(chat[0]) == {"messages"}
    assert set(prepared.data_source("validation", kind="preference")[0]) == {
        "prompt", "chosen", "rejected"}
    origin = {t: "aa" for t in texts_of(out, "aa", "train")}
    origin.update({t: "bb" for t in texts_of(out, "bb", "train")})

    class Words:  # a tokenizer stand-in: one id per word, recoverable
        pad_id, bos_id, eos_id = 0, 2, 3

        def __init__(self):
            self.ids = {}

        def encode(self, text):
            return [self.ids.setdefault(text, 10 + len(self.ids))]

    def drawn(source, seed, n=200):
        tok = Words()
        ds = pipeline.make_dataset(source, pipeline.text_encoder(tok, "text"), batch_size=1,
                                   max_len=4, seed=seed, train=True, packing=False)
        it = iter(ds)
        ids = [int(next(it)["inputs"][0, 1]) for _ in range(n)]
        names = {v: k for k, v in tok.ids.items()}
        return [names[i] for i in ids]

    got = drawn(train, seed=3)
    share = sum(origin[t] == "aa" for t in got) / len(got)
    assert abs(share - 0.7) < 0.05
    assert drawn(train, seed=3) == got and drawn(train, seed=4) != got
    # data.mixture overrides the prepared weights; 0 leaves a source out.
    only_b = prepare.load(out, "aa=0,bb=1").data_source("train")
    assert not isinstance(only_b, pipeline.Mixture) and len(only_b) == len(
        texts_of(out, "bb", "train"))
    with pytest.raises(UserError, match="'data.mixture': .* has no source 'cc'"):
        prepare.load(out, "cc=1")
    with pytest.raises(UserError, match="'data.mixture': 'aa' is not name=weight"):
        prepare.load(out, "aa")


def test_training_runs_on_a_prepared_mixture(tiny_cfg, tmp_path):
    from t5x_like.training import trainer

    cfg = _mixed_sources(tmp_path)
    out = str(tmp_path / "prepared")
    prepare.write_sources(prepare.named_sources(cfg), cfg, out)
    tiny_cfg.data.source = f"prepared:{out}"
    tiny_cfg.data.mixture = "aa=0.5,bb=0.5"
    tiny_cfg.steps = 2
    tiny_cfg.eval.steps = 1
    final = trainer.train_and_evaluate(tiny_cfg, str(tmp_path / "run"))
    assert np.isfinite(final["loss"])


# ---------------------------------------------------------------------------------------------
# Config checks, the command line, tokenizer quality.


@pytest.mark.parametrize("key, value, message", [
    ("data.on_bad_record", "ignore", "'data.on_bad_record': is 'ignore'; choose error or skip"),
    ("data.mixture", "a=x", "'data.mixture': 'a=x' is not name=weight"),
    ("data.clean.unicode", "NFD", "'data.clean.unicode': is 'NFD'"),
    ("data.dedup.threshold", 1.5, "'data.dedup.threshold': is 1.5"),
    ("data.runner", "spark", "'data.runner': is 'spark'; choose local or beam"),
    ("data.clean.stopwords", "xx", "'data.clean.stopwords': 'xx' is not a language"),
])
def test_bad_data_keys_are_named(key, value, message):
    from configs import base

    cfg = base.get_config()
    node = cfg
    *path, last = key.split(".")
    for part in path:
        node = node[part]
    node[last] = value
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        config_lib.validate(cfg)


def test_bad_source_entries_are_named():
    from configs import base

    cfg = base.get_config()
    cfg.data.sources.Bad = ml_collections.ConfigDict({"source": "text:x", "weight": 1.0})
    with pytest.raises(UserError, match="'data.sources.Bad': source names must be lower-case"):
        config_lib.validate(cfg)
    cfg = base.get_config()
    cfg.data.sources.web = ml_collections.ConfigDict({"source": "csv:x", "weight": 1.0})
    with pytest.raises(UserError, match="'data.sources.web.source': 'csv:x' is not a data source"):
        config_lib.validate(cfg)


def test_prepare_command_writes_folder_and_report(tmp_path):
    docs = write_jsonl(tmp_path / "d.jsonl", [{"body": doc(i, 40)} for i in range(60)])
    recipe = tmp_path / "recipe.py"
    recipe.write_text(
        "import ml_collections\nfrom configs import base\n\n\ndef get_config():\n"
        "    cfg = base.get_config()\n    cfg.data.vocab_size = 320\n"
        f"    cfg.data.sources.docs = ml_collections.ConfigDict({{'source': 'jsonl:{docs}:body', "
        "'weight': 1.0})\n    return cfg\n")
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.prepare", f"--config={recipe}",
         f"--out={tmp_path / 'out'}", "--config.data.validation_fraction=0.2",
         "--config.data.dedup.threshold=0.9"], cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    printed = json.loads(result.stdout)  # nothing else on stdout (TFDS prints nothing)
    assert printed["sources"]["docs"]["splits"]["train"] + printed["sources"]["docs"]["splits"][
        "validation"] == 60
    assert json.load(open(tmp_path / "out" / "report.json"))["options"]["threshold"] == 0.9
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.prepare", f"--config={recipe}",
         f"--out={tmp_path / 'bad'}", "--config.data.on_bad_record=maybe"], cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "config key 'data.on_bad_record'" in result.stderr
    assert "Traceback" not in result.stderr and not os.path.exists(tmp_path / "bad")


def test_shared_recipe_parses_and_names_every_shared_file():
    from configs.data import shared_all

    cfg = shared_all.get_config()
    config_lib.validate(cfg)
    named = prepare.named_sources(cfg.data)
    files = {os.path.normpath(os.path.join(ROOT, p)) for s, _ in named.values()
             for p in sources.expand_paths(os.path.join(ROOT, s.path))}
    shared = {os.path.normpath(p) for d in ("pretrain", "sft", "preference")
              for p in glob.glob(os.path.join(SHARED_DATA, d, "*"))
              if not os.path.basename(p).startswith("LICENSE")}
    assert shared == files


def test_tokenizer_quality_bigger_vocab_compresses_more(tmp_path):
    path = os.path.join(SHARED_DATA, "pretrain", "tinyshakespeare.txt")
    docs = list(sources.read_text([path], "paragraph", 1000))
    train, held_out = docs[:200], docs[-40:]
    small, large = tokenizer_eval.train_tokenizers(train, [400, 1500], str(tmp_path)).values()
    a, b = tokenizer_eval.evaluate(small, held_out), tokenizer_eval.evaluate(large, held_out)
    n_bytes = sum(len(t.encode()) for t in held_out)
    assert a["bytes"] == b["bytes"] == n_bytes
    assert a["bytes_per_token"] == round(n_bytes / a["tokens"], 4)
    assert b["bytes_per_token"] > a["bytes_per_token"] > 1.5
    assert a["round_trip"] and b["round_trip"] and a["unk_share"] == 0
    table = tokenizer_eval.table({"small": a, "large": b})
    assert "| bytes / token |" in table and "tokens vs first" in table
    # The extra special tokens and the character coverage reach SentencePiece.
    tok = tokenizer_lib.train(train, str(tmp_path / "s.model"), vocab_size=400,
                              special_tokens=["<|tool|>"], character_coverage=1.0)
    assert len(tok.encode("<|tool|>")) == 1


def test_tokenizer_eval_command(tmp_path):
    held_out = tmp_path / "held_out.txt"
    held_out.write_text("\n\n".join(doc(900 + i, 50) for i in range(20)))
    train = tmp_path / "train.txt"
    train.write_text("\n\n".join(doc(i, 50) for i in range(80)))
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.tokenizer_eval", f"--train={train}",
         f"--eval={held_out}", "--vocab_sizes=320,600", f"--out={tmp_path / 'tok'}"], cwd=ROOT,
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "| bytes / token |" in result.stdout and "bpe 600" in result.stdout
    results = json.load(open(tmp_path / "tok" / "results.json"))
    assert results["bpe 600"]["bytes_per_token"] > results["bpe 320"]["bytes_per_token"]
