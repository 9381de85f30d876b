"""The feedback store (SQLite, WAL) and its export into SFT and preference JSONL."""

import concurrent.futures
import json
import os
import sqlite3
import subprocess
import sys

import pytest

from conftest import ROOT
from t5x_like.serving import feedback
from t5x_like.core.errors import UserError

P1 = [{"role": "user", "content": "What is 2 + 3?"}]
P2 = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 4 + 4?"}]
P3 = [{"role": "user", "content": "Hi"}]
P4 = [{"role": "user", "content": "Thanks"}]
NOTHING_LEFT_OUT = {"length_cut": 0, "replacement_char": 0, "empty_reports": 0, "rejected": 0,
                    "unreviewed": 0}


def add(store, rid, prompt, content, conversation="conv-1", regenerates=None, finish="stop"):
    store.add_responses(response_id=rid, conversation_id=conversation, prompt=prompt,
                        choices=[{"content": content, "finish_reason": finish,
                                  "completion_tokens": 2}],
                        model="tiny", model_step=7, sampling={"temperature": 0.7, "seed": 1},
                        prompt_tokens=9, regenerates=regenerates)


@pytest.fixture
def db(tmp_path):
    """A store holding every kind of signal the export turns into data."""
    path = str(tmp_path / feedback.DB_NAME)
    store = feedback.Store(path)
    add(store, "r01", P1, "5")
    store.add_feedback(response_id="r01", rating="up")
    add(store, "r02", P1, "6")
    store.add_feedback(response_id="r02", rating="down")
    add(store, "r03", P1, "5", conversation="conv-2")  # the same reply upvoted again elsewhere
    store.add_feedback(response_id="r03", rating="up")
    add(store, "r04", P2, "9")
    store.add_feedback(response_id="r04", rating="down")
    store.add_feedback(response_id="r04", correction="8")
    add(store, "r06", P3, "hello", conversation="conv-3")  # regenerated twice
    add(store, "r07", P3, "hey", conversation="conv-3", regenerates=("r06", 0))
    add(store, "r08", P3, "yo", conversation="conv-3", regenerates=("r07", 0))
    store.add_feedback(response_id="r08", chosen=True)
    store.add_feedback(response_id="r07", chosen=True)  # the later choice wins
    add(store, "r09", P1, "five")
    store.add_feedback(response_id="r09", rating="up")
    store.add_feedback(response_id="r09", problem="rude", problem_kind="harm")  # reported
    add(store, "r10", P1, "4")
    store.add_feedback(response_id="r10", rating="up")
    store.add_feedback(response_id="r10", rating="down")  # changed their mind
    add(store, "r11", P4, "ok")
    store.add_feedback(response_id="r11", correction="ok")  # a "correction" changing nothing
    store.close()
    return path


def read_jsonl(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_sft_export_upvoted_and_corrected_deduplicated(db, tmp_path):
    out = tmp_path / "sft.jsonl"
    counts = feedback.export(db, str(out), "sft")
    assert read_jsonl(out) == [
        {"messages": P1 + [{"role": "assistant", "content": "5"}]},
        {"messages": P2 + [{"role": "assistant", "content": "8"}]},
        {"messages": P4 + [{"role": "assistant", "content": "ok"}]},
    ]
    assert counts == {"upvoted": 1, "corrected": 2, "duplicates": 1, **NOTHING_LEFT_OUT,
                      "written": 3}
    assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]


def test_preference_export_from_corrections_ratings_and_regenerations(db, tmp_path):
    out = tmp_path / "pref.jsonl"
    counts = feedback.export(db, str(out), "preference")
    records = read_jsonl(out)
    assert all(list(r) == ["prompt", "chosen", "rejected"] for r in records)
    assert all(r["prompt"][-1]["role"] == "user" for r in records)
    pairs = {(json.dumps(r["prompt"]), r["chosen"], r["rejected"]) for r in records}
    assert len(pairs) == len(records)
    expected = [(P2, "8", "9"),  # corrected > original
                (P1, "5", "6"), (P1, "5", "five"), (P1, "5", "4"),  # upvoted > downvoted/reported
                (P3, "hey", "hello"), (P3, "hey", "yo")]  # chosen regeneration > the others
    assert pairs == {(json.dumps(p), c, r) for p, c, r in expected}
    assert counts == {"corrected": 1, "rated": 3, "regenerated": 2, "duplicates": 3,
                      "identical": 1, **NOTHING_LEFT_OUT, "written": 6}


def test_export_command_prints_the_counts(db, tmp_path):
    out = tmp_path / "pref.jsonl"
    result = subprocess.run(
        [sys.executable, "-m", "t5x_like.feedback", "export", f"--db={db}", f"--out={out}",
         "--format=preference"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == (
        f"preference: wrote 6 records to {out} (corrected 1, rated 3, regenerated 2, "
        "duplicates 3, identical 1, length_cut 0, replacement_char 0, empty_reports 0, "
        "rejected 0, unreviewed 0)")
    assert len(read_jsonl(out)) == 6
    for args, says in [(["export", f"--db={tmp_path}/none.sqlite", f"--out={out}"],
                        "no feedback database"),
                       (["import", f"--db={db}", f"--out={out}"], "unknown command import")]:
        bad = subprocess.run([sys.executable, "-m", "t5x_like.feedback", *args], cwd=ROOT,
                             capture_output=True, text=True, timeout=120)
        assert bad.returncode == 2 and says in bad.stderr and "Traceback" not in bad.stderr


def test_bad_feedback_and_bad_exports_are_refused(db, tmp_path):
    store = feedback.Store(db)
    with pytest.raises(feedback.UnknownResponse, match="no response 'nope' with index 0"):
        store.add_feedback(response_id="nope", rating="up")
    with pytest.raises(feedback.UnknownResponse, match="with index 3"):
        store.add_feedback(response_id="r01", choice=3, rating="up")
    with pytest.raises(UserError, match="rating 'meh'"):
        store.add_feedback(response_id="r01", rating="meh")
    with pytest.raises(UserError, match="says nothing"):
        store.add_feedback(response_id="r01", correction="  ")
    with pytest.raises(UserError, match="belongs to conversation 'conv-1'"):
        store.add_feedback(response_id="r01", rating="up", conversation_id="conv-9")
    with pytest.raises(UserError, match="a problem report needs 'problem'"):
        store.add_feedback(response_id="r01", problem_kind="bias", problem="  ")
    fixed_only = store.add_feedback(response_id="r01", problem_kind="bias", correction="5!")
    text_only = store.add_feedback(response_id="r01", problem="odd")
    conn = sqlite3.connect(db)
    got = {r[0]: (r[1], r[2]) for r in conn.execute(
        "SELECT id, problem, problem_kind FROM feedback WHERE id IN (?, ?)",
        (fixed_only["id"], text_only["id"]))}
    assert got == {fixed_only["id"]: ("", "bias"), text_only["id"]: ("odd", "other")}
    assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    conn.close()
    store.close()

    with pytest.raises(UserError, match="--format=csv is not one of sft, preference"):
        feedback.export(db, str(tmp_path / "x.jsonl"), "csv")
    with pytest.raises(UserError, match="folder .* does not exist"):
        feedback.export(db, str(tmp_path / "missing" / "x.jsonl"), "sft")
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database")
    with pytest.raises(UserError, match="is not a t5x_like feedback database"):
        feedback.export(str(junk), str(tmp_path / "x.jsonl"), "sft")
    assert not (tmp_path / "x.jsonl").exists()


def test_concurrent_writers_lose_nothing(tmp_path):
    """Threads on one store and a second connection (as a second server process would)."""
    path = str(tmp_path / feedback.DB_NAME)
    stores = [feedback.Store(path), feedback.Store(path)]

    def writer(k):
        store = stores[k % 2]
        ids = []
        for i in range(40):
            rid = f"r-{k}-{i}"
            add(store, rid, P1, f"{k}.{i}", conversation=f"conv-{k}")
            ids.append(store.add_feedback(response_id=rid, rating="up" if i % 2 else "down")["id"])
        return ids

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        ids = [i for chunk in pool.map(writer, range(8)) for i in chunk]
    assert len(set(ids)) == 320
    assert stores[0].count("responses") == 320 and stores[1].count("feedback") == 320
    assert stores[0].count("conversations") == 8
    for store in stores:
        store.close()


def test_exports_load_as_the_sft_and_preference_data_sources(db, tmp_path):
    """The exported files are read by the data pipeline's chat: and preference: sources as is,
    and a chat record becomes a training example with the reply (only) to learn from."""
    from configs import base
    from data_pipelines import chat_data, chat_template, readers, sources, synthetic
    from data_pipelines import tokenizer as tokenizer_lib

    data_cfg = base.get_config().data
    for fmt, spec in (("sft", "chat:{}"), ("preference", "preference:{}")):
        out = tmp_path / f"{fmt}.jsonl"
        feedback.export(db, str(out), fmt)
        got = [item.record for item in readers.items(sources.parse_source(spec.format(out)),
                                                       data_cfg)]
        assert got == read_jsonl(out) and got, fmt
        assert sources.record_kind(sources.parse_source(spec.format(out))) == (
            "chat" if fmt == "sft" else "preference")

    tok = tokenizer_lib.train([chat_template.render(synthetic.dialogue(i)) for i in range(100)],
                              str(tmp_path / "t.model"), vocab_size=300)
    encode = chat_data.encoder(tok, loss_on="last_assistant", max_len=64, on_long="truncate")
    chats = read_jsonl(tmp_path / "sft.jsonl")
    for record in chats:
        example = encode({"messages": json.dumps(record["messages"])})
        learned = [t for t, w in zip(example["tokens"], example["weights"]) if w]
        reply = record["messages"][-1]["content"]
        assert tok.decode([t for t in learned if t not in tok.marker_ids.values()]) == reply


def test_the_feedback_loop_trains_an_sft_step_on_its_export(tiny_cfg, tmp_path):
    """Upvoted and corrected replies, exported, are the data.source of an SFT run."""
    from data_pipelines import synthetic
    from t5x_like.core import metrics as metrics_lib
    from t5x_like.training import trainer

    store = feedback.Store(str(tmp_path / feedback.DB_NAME))
    for i in range(150):
        dialogue = synthetic.dialogue(i)
        prompt, reply = dialogue[:-1], dialogue[-1]["content"]
        rid = f"r{i}"
        add(store, rid, prompt, reply if i % 3 else "0", conversation=f"conv-{i}")
        store.add_feedback(response_id=rid, **({"rating": "up"} if i % 3 else
                                               {"rating": "down", "correction": reply}))
    store.close()
    out = tmp_path / "fb_sft.jsonl"
    counts = feedback.export(str(tmp_path / feedback.DB_NAME), str(out), "sft")
    assert counts["upvoted"] == 100 and counts["corrected"] == 50

    tiny_cfg.task = "sft"
    tiny_cfg.data.source = f"chat:{out}"
    tiny_cfg.model.max_len = 64
    tiny_cfg.data.vocab_size = 400
    tiny_cfg.steps = 1
    tiny_cfg.log_every_steps = 1
    trainer.train_and_evaluate(tiny_cfg, str(tmp_path / "run"))
    train = [r for r in metrics_lib.read_metrics(str(tmp_path / "run")) if r["split"] == "train"]
    assert [r["step"] for r in train] == [1] and 0 < train[0]["loss"] < 20


def test_export_leaves_out_and_counts_length_cut_broken_text_and_empty_reports(tmp_path):
    path = str(tmp_path / feedback.DB_NAME)
    store = feedback.Store(path)
    add(store, "ok", P1, "5")
    add(store, "cut", P1, "5 because fi", finish="length")  # ran into max_tokens
    add(store, "bad", P1, "5 \ufffd")  # decoded from broken UTF-8 bytes
    add(store, "low", P1, "7")
    for rid in ("ok", "cut", "bad"):
        store.add_feedback(response_id=rid, rating="up")
    store.add_feedback(response_id="low", rating="down")
    add(store, "cut2", P2, "8, as four and fo", finish="length")
    store.add_feedback(response_id="cut2", correction="8")  # a human's reply: still used
    add(store, "meh", P3, "hello")
    store.add_feedback(response_id="meh", rating="up")
    store.close()
    # A report of a kind alone, as the old page sent for an empty form: ignored, counted.
    conn = sqlite3.connect(path)
    conn.execute("INSERT INTO feedback (response_id, choice, conversation_id, created, problem, "
                 "problem_kind) VALUES ('meh', 0, 'conv-1', 0, '', 'bias')")
    conn.commit()
    conn.close()

    sft = feedback.export(path, str(tmp_path / "sft.jsonl"), "sft")
    assert read_jsonl(tmp_path / "sft.jsonl") == [
        {"messages": P1 + [{"role": "assistant", "content": "5"}]},
        {"messages": P2 + [{"role": "assistant", "content": "8"}]},
        {"messages": P3 + [{"role": "assistant", "content": "hello"}]}]
    assert sft == {"upvoted": 2, "corrected": 1, "duplicates": 0, "length_cut": 1,
                   "replacement_char": 1, "empty_reports": 1, "rejected": 0, "unreviewed": 0,
                   "written": 3}
    pref = feedback.export(path, str(tmp_path / "pref.jsonl"), "preference")
    # ok > low stays; cut > low, bad > low and 8 > (the cut reply) are left out.
    assert read_jsonl(tmp_path / "pref.jsonl") == [{"prompt": P1, "chosen": "5", "rejected": "7"}]
    assert (pref["length_cut"], pref["replacement_char"], pref["empty_reports"]) == (2, 1, 1)


def test_a_retried_write_with_the_same_key_stores_one_row(tmp_path):
    store = feedback.Store(str(tmp_path / feedback.DB_NAME))
    h = feedback.request_hash({"messages": P1})
    for _ in range(2):  # the second try raced the first: nothing more is stored
        stored = store.add_responses(
            response_id=f"r-{_}", conversation_id="conv-1", prompt=P1,
            choices=[{"content": "5", "finish_reason": "stop", "completion_tokens": 1}],
            model="tiny", model_step=0, sampling={}, prompt_tokens=3,
            idempotency_key="key-1", body_hash=h)
        assert stored == (_ == 0)
    assert [c["id"] for c in store.replayed_completion("key-1", h)] == ["r-0"]
    assert store.replayed_completion("key-2", h) is None
    with pytest.raises(feedback.IdempotencyConflict, match="different request"):
        store.replayed_completion("key-1", feedback.request_hash({"messages": P2}))
    fh = feedback.request_hash({"rating": "up"})
    first = store.add_feedback(response_id="r-0", rating="up", idempotency_key="fb-1",
                               body_hash=fh)
    again = store.add_feedback(response_id="r-0", rating="up", idempotency_key="fb-1",
                               body_hash=fh)
    assert again == {**first, "replayed": True}
    assert store.count("responses") == 1 and store.count("feedback") == 1
    store.delete_conversation("conv-1")  # the keys go with the rows they made
    assert store.count("idempotency") == 0
    store.close()


def test_review_sheet_and_reviewed_only_export(db, tmp_path):
    store = feedback.Store(db)
    store.add_feedback(response_id="r02", problem="wrong sum", problem_kind="error")
    store.close()
    out = tmp_path / "review"
    made = feedback.write_review(db, str(out))
    items = json.load(open(out / "items.json"))["items"]
    # r04's correction, r09's report, r11's correction, r02's report.
    assert [(i["response_id"], i["kind"]) for i in items] == [
        ("r04", "correction"), ("r09", "report: harm"), ("r11", "correction"),
        ("r02", "report: error")]
    assert made["items"] == 4
    page = (out / "sheet.html").read_text()
    assert "wrong sum" in page and "<script>\nconst SHEET" in page
    with pytest.raises(UserError, match="already exists"):
        feedback.write_review(db, str(out))

    # Approve the correction of r04, reject r09's report; the rest stays unreviewed.
    import csv
    rows = list(csv.DictReader(open(out / "sheet.csv", encoding="utf-8")))
    for r in rows:
        r["verdict"] = {"r04": "approve", "r09": "reject"}.get(r["response_id"], "")
    filled = tmp_path / "filled.csv"
    with open(filled, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    assert feedback.record_verdicts(db, str(filled)) == {"approve": 1, "reject": 1}

    counts = feedback.export(db, str(tmp_path / "rev.jsonl"), "sft", reviewed_only=True)
    # r04's approved correction; r01 upvoted; r09's report rejected, so its upvote counts
    # (the same reply as r01's, a duplicate); r11 (unreviewed correction) left out.
    assert read_jsonl(tmp_path / "rev.jsonl") == [
        {"messages": P1 + [{"role": "assistant", "content": "5"}]},
        {"messages": P2 + [{"role": "assistant", "content": "8"}]},
        {"messages": P1 + [{"role": "assistant", "content": "five"}]}]
    assert (counts["rejected"], counts["unreviewed"], counts["written"]) == (1, 2, 3)
    assert feedback.write_review(db, str(tmp_path / "again"))["items"] == 2  # the undecided

    result = subprocess.run(
        [sys.executable, "-m", "t5x_like.feedback", "export", f"--db={db}",
         f"--out={tmp_path / 'p.jsonl'}", "--format=preference", "--reviewed_only"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "(reviewed only)" in result.stdout, result.stderr
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sheet": "x", "verdicts": {"99999": "approve"}}))
    with pytest.raises(UserError, match="feedback 99999 is not in"):
        feedback.record_verdicts(db, str(bad))
    bad.write_text(json.dumps({"sheet": "x", "verdicts": {"1": "maybe"}}))
    with pytest.raises(UserError, match="verdict 'maybe'"):
        feedback.record_verdicts(db, str(bad))


def exchange(store, rid, prompt, reply, conversation="conv-h", **kw):
    store.add_responses(response_id=rid, conversation_id=conversation, prompt=prompt,
                        choices=[{"content": reply, "finish_reason": "stop",
                                  "completion_tokens": 1}],
                        model="tiny", model_step=0, sampling={}, prompt_tokens=3, **kw)
    return prompt + [{"role": "assistant", "content": reply}]


def test_history_is_rebuilt_through_dropped_turns_regenerations_and_edits(tmp_path):
    store = feedback.Store(str(tmp_path / feedback.DB_NAME))
    system = [{"role": "system", "content": "Be brief."}]
    u = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    seen = exchange(store, "a", system + u("one"), "1")
    seen = exchange(store, "b", seen + u("two"), "2")
    exchange(store, "b2", seen[:-1], "II", regenerates=("b", 0))  # shown instead of "2"
    seen = seen[:-1] + [{"role": "assistant", "content": "II"}]
    # The page dropped the oldest exchange to fit the context: the prompt no longer has it.
    seen = exchange(store, "c", system + seen[3:] + u("three"), "3")
    exchange(store, "d", seen + u("fuor"), "?")
    exchange(store, "d2", seen + u("four"), "4")  # the last user turn edited and resent
    store.add_feedback(response_id="d2", rating="up")
    history = store.conversation("conv-h")
    turns = [(t["role"], t.get("content") or [a["content"] for a in t["alternatives"]],
              t.get("current")) for t in history["turns"]]
    assert turns == [("user", "one", None), ("assistant", ["1"], 0),
                     ("user", "two", None), ("assistant", ["2", "II"], 1),
                     ("user", "three", None), ("assistant", ["3"], 0),
                     ("user", "four", None), ("assistant", ["4"], 0)]
    assert history["system"] == "Be brief." and history["dropped"] == 2
    assert history["turns"][-1]["alternatives"][0]["rating"] == "up"
    [listed] = store.conversations()
    assert listed["title"] == "one" and listed["replies"] == 6
    store.rename_conversation("conv-h", "  Counting\n practice ")
    assert store.conversations()[0]["title"] == "Counting practice"
    assert store.delete_conversation("conv-h") == {"feedback": 1, "responses": 6}
    assert not store.has_conversation("conv-h") and store.conversations() == []
    with pytest.raises(feedback.UnknownConversation):
        store.conversation("conv-h")
    store.close()


def test_an_older_database_gains_the_new_columns(tmp_path):
    path = tmp_path / "old.sqlite"
    conn = sqlite3.connect(path)
    conn.executescript(
        "CREATE TABLE conversations (id TEXT PRIMARY KEY, created REAL NOT NULL);"
        "CREATE TABLE responses (id TEXT NOT NULL, choice INTEGER NOT NULL, conversation_id "
        "TEXT NOT NULL, created REAL NOT NULL, prompt TEXT NOT NULL, content TEXT NOT NULL, "
        "finish_reason TEXT NOT NULL, model TEXT NOT NULL, model_step INTEGER NOT NULL, "
        "sampling TEXT NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT "
        "NULL, regenerates_id TEXT, regenerates_choice INTEGER, PRIMARY KEY (id, choice));"
        "INSERT INTO conversations VALUES ('conv-1', 0);"
        "INSERT INTO responses VALUES ('r', 0, 'conv-1', 0, '[{\"role\": \"user\", \"content\": "
        "\"hi\"}]', 'yo', 'stop', 'm', 0, '{}', 1, 1, NULL, NULL);")
    conn.close()
    store = feedback.Store(str(path))
    assert store.conversation("conv-1")["turns"][1]["alternatives"][0]["content"] == "yo"
    store.close()
