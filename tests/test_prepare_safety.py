"""Data preparation never destroys what the user made, cleans up after itself when stopped, and
does not keep silently wrong text: the output folder rules, signals and stale temporary
folders, repeated lines, over-long documents, byte-order marks, and where `inspect` writes."""

import errno
import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import ml_collections
import pytest

from conftest import ROOT, SHARED_DATA
from data_pipelines import clean, prepare, readers, sources
from t5x_like.core.errors import UserError

WORDS = ("river stone market winter lantern garden copper signal harbor violet candle meadow "
         "thunder pepper silver orchard canyon marble falcon willow ember saddle velvet beacon"
         ).split()


def words(seed: int, n: int) -> str:
    rng = random.Random(seed)
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


def recipe(path, **clean_keys):
    """A data config over one JSON-lines source of `path`."""
    from configs import base

    cfg = base.get_config().data
    cfg.vocab_size = 320
    cfg.validation_fraction = 0.2
    cfg.sources.docs = ml_collections.ConfigDict({"source": f"jsonl:{path}:text", "weight": 1.0})
    for key, value in clean_keys.items():
        cfg.clean[key] = value
    return cfg


def small_corpus(tmp_path) -> str:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": words(i, 40)}) + "\n" for i in range(50)))
    return str(path)


def build(cfg, out) -> dict:
    return prepare.write_sources(prepare.named_sources(cfg), cfg, str(out))


def dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


# ---------------------------------------------------------------------------------------------
# The output folder.


def test_out_folder_rules(tmp_path, monkeypatch):
    cfg = recipe(small_corpus(tmp_path))
    fp = prepare.fingerprint(prepare.named_sources(cfg), cfg)
    user = tmp_path / "mine"
    user.mkdir()
    (user / "notes.txt").write_text("keep me")
    with pytest.raises(UserError, match=f"{user} already exists and is not empty .* choose a "
                                        "new or empty folder"):
        build(cfg, user)
    assert (user / "notes.txt").read_text() == "keep me"
    (tmp_path / "afile").write_text("x")
    with pytest.raises(UserError, match="is a file, not a folder"):
        prepare.check_out(str(tmp_path / "afile"), fp)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    with pytest.raises(UserError, match="is the current folder"):
        prepare.check_out(os.path.realpath("."), fp)
    monkeypatch.chdir(tmp_path)

    # An empty folder is fine; rerunning the same recipe replaces its own output.
    out = tmp_path / "out"
    out.mkdir()
    build(cfg, out)
    assert prepare.check_out(str(out), fp) == "same"
    (out / "report.md").write_text("stale")
    build(cfg, out)
    assert (out / "report.md").read_text() != "stale"
    assert sorted(os.listdir(tmp_path)) == ["afile", "docs.jsonl", "here", "mine", "out"]

    # Another recipe's output, or prepare's output with a file of the user's, is refused.
    cfg.vocab_size = 300
    with pytest.raises(UserError, match="holds data prepared by another recipe"):
        build(cfg, out)
    cfg.vocab_size = 320
    (out / "my_notes.txt").write_text("mine")
    with pytest.raises(UserError, match="already exists and is not empty"):
        build(cfg, out)
    assert (out / "my_notes.txt").exists() and (out / "prepare.json").exists()


def test_prepare_command_refuses_an_existing_folder(tmp_path):
    docs = small_corpus(tmp_path)
    recipe_file = tmp_path / "recipe.py"
    recipe_file.write_text(
        "import ml_collections\nfrom configs import base\n\n\ndef get_config():\n"
        "    cfg = base.get_config()\n"
        f"    cfg.data.sources.docs = ml_collections.ConfigDict({{'source': 'jsonl:{docs}:text',"
        " 'weight': 1.0})\n    return cfg\n")
    user = tmp_path / "project"
    (user / "src").mkdir(parents=True)
    (user / "src" / "main.py").write_text("print('mine')\n")
    result = subprocess.run([sys.executable, "-m", "data_pipelines.prepare",
                             f"--config={recipe_file}", f"--out={user}"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1].startswith(
        f"error: {user} already exists and is not empty")
    assert "Traceback" not in result.stderr
    assert (user / "src" / "main.py").read_text() == "print('mine')\n"


def test_writing_failures_are_environment_errors(tmp_path, monkeypatch):
    cfg = recipe(small_corpus(tmp_path))

    def full(named, data_cfg, tmp, description):
        raise OSError(errno.ENOSPC, "No space left on device", os.path.join(tmp, "spool"))

    monkeypatch.setattr(prepare, "_build", full)
    with pytest.raises(UserError, match="cannot write .*out.tmp.*No space left on device.*free "
                                        "some space") as e:
        build(cfg, tmp_path / "out")
    assert getattr(e.value, "exit_code", 1) == 1
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]


# ---------------------------------------------------------------------------------------------
# Interrupted preparations.


def test_sigterm_during_prepare_removes_its_temporary_folder(tmp_path):
    # About 3 MB of text: seconds of work, so the signal lands while it runs.
    big = tmp_path / "big.txt"
    rng = random.Random(0)
    big.write_text("".join(" ".join(rng.choice(WORDS) for _ in range(30)) + f" {i}.\n\n"
                           for i in range(15000)))
    recipe_file = tmp_path / "recipe.py"
    recipe_file.write_text(
        "import ml_collections\nfrom configs import base\n\n\ndef get_config():\n"
        "    cfg = base.get_config()\n"
        f"    cfg.data.sources.big = ml_collections.ConfigDict({{'source': 'text:{big}', "
        "'weight': 1.0})\n    return cfg\n")
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-m", "data_pipelines.prepare",
                             f"--config={recipe_file}", f"--out={out}"], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not glob.glob(f"{out}.tmp*") and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGTERM)
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    lines = stderr.strip().splitlines()
    assert lines[-1] == (f"error: interrupted by SIGTERM; {out} was not written and the partial "
                         "preparation was removed.")
    assert "Traceback" not in stderr and not stdout
    assert sorted(os.listdir(tmp_path)) == ["big.txt", "recipe.py"]


def test_ctrl_c_in_process_cleans_up_and_restores_handlers(tmp_path, monkeypatch):
    cfg = recipe(small_corpus(tmp_path))
    real = prepare._train_tokenizer

    def interrupted(*args):
        os.kill(os.getpid(), signal.SIGINT)  # delivered before the next bytecode
        return real(*args)

    monkeypatch.setattr(prepare, "_train_tokenizer", interrupted)
    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(prepare.Interrupted) as e:
        with prepare.stop_on_signals():
            build(cfg, tmp_path / "out")
    assert e.value.signum == signal.SIGINT
    assert signal.getsignal(signal.SIGINT) is before
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]


def test_a_signal_whose_exception_python_drops_still_stops_the_commit(tmp_path, monkeypatch):
    # A handler that runs inside a __del__ (or a GC callback) has its exception printed and
    # dropped; the recorded signal must still keep the preparation from being committed.
    cfg = recipe(small_corpus(tmp_path))
    real = prepare._train_tokenizer

    class SignalsOnCollection:
        def __del__(self):
            os.kill(os.getpid(), signal.SIGTERM)

    def interrupted(*args):
        SignalsOnCollection()  # collected at once: the handler's exception is swallowed
        return real(*args)

    monkeypatch.setattr(prepare, "_train_tokenizer", interrupted)
    with pytest.raises(prepare.Interrupted) as e:
        with prepare.stop_on_signals():
            build(cfg, tmp_path / "out")
    assert e.value.signum == signal.SIGTERM
    assert sorted(os.listdir(tmp_path)) == ["docs.jsonl"]
    prepare.raise_if_interrupted()  # the record does not outlive the block


def test_stale_temporary_folders_are_removed(tmp_path):
    out = str(tmp_path / "out")
    host, dead = prepare._host(), dead_pid()
    alive = os.getppid()
    stale = [f"{out}.tmp{dead}-{host}", f"{out}.tmp{dead}", f"{out}.old{dead}-{host}"]
    kept = [f"{out}.tmp{alive}-{host}",  # a running preparation
            f"{out}.tmp{dead}-another_machine",  # another machine sharing the folder
            f"{out}.tmpnotes", str(tmp_path / f"other.tmp{dead}-{host}"), out + "2"]
    for path in stale + kept:
        os.makedirs(os.path.join(path, "spool"))
    assert sorted(prepare.remove_stale(out)) == sorted(stale)
    assert all(os.path.isdir(p) for p in kept) and not any(os.path.exists(p) for p in stale)
    # The next preparation of that folder removes them too.
    os.makedirs(stale[0])
    build(recipe(small_corpus(tmp_path)), out)
    assert not os.path.exists(stale[0]) and os.path.isdir(kept[0])


def test_lifecycle_removes_only_its_own_exports(tmp_path):
    from t5x_like.experiments import lifecycle

    export = tmp_path / "export"
    (export / "checkpoints" / "4").mkdir(parents=True)
    (export / "config.json").write_text("{}")
    (export / "tokenizer.model").write_text("x")
    lifecycle.remove_export(str(export))
    assert not export.exists()
    user = tmp_path / "user"
    user.mkdir()
    (user / "config.json").write_text("{}")
    (user / "thesis.tex").write_text("mine")
    with pytest.raises(UserError, match="is not a model directory that t5x_like.export wrote"):
        lifecycle.remove_export(str(user))
    assert (user / "thesis.tex").read_text() == "mine"


# ---------------------------------------------------------------------------------------------
# What the text becomes: repeated lines, over-long documents, encodings, the report.


def test_repeated_lines_and_long_documents_are_handled_and_reported(tmp_path):
    pages = [f"Home | About | Contact\n{words(i, 40)}\n\n{words(100 + i, 40)}\nPage {i} of 30"
             for i in range(30)]
    long_doc = " ".join(words(200 + i, 50) for i in range(60))  # one line, ~22,000 characters
    path = tmp_path / "web.jsonl"
    # UTF-16 with a byte-order mark: read as text, not as "ÿþ..." mojibake.
    path.write_bytes("".join(json.dumps({"text": t}) + "\n"
                             for t in pages + [long_doc]).encode("utf-16"))
    cfg = recipe(path, max_doc_chars=5000)
    out = tmp_path / "out"
    report = build(cfg, out)
    info = report["sources"]["docs"]
    from data_pipelines import tfds_builder

    meta = json.load(open(out / "prepare.json"))
    splits = tfds_builder.data_sources(str(out / meta["dataset_dir"]))
    kept = {s: [splits[f"docs-{s}"][i]["text"].decode() for i in range(len(splits[f"docs-{s}"]))]
            for s in ("train", "validation")}
    texts = kept["train"] + kept["validation"]
    assert not any("Home | About | Contact" in t for t in texts)
    assert sum("Page 7 of 30" in t for t in texts) == 1  # lines that differ are kept
    assert not any(t.startswith(("ÿþ", "\ufeff")) for t in texts)
    pieces = [t for t in texts if "Page" not in t]
    assert len(pieces) == 5 and max(map(len, pieces)) <= 5000
    assert any(all(p in kept[s] for p in pieces) for s in kept)  # one split for all pieces
    assert " ".join(sorted(pieces, key=long_doc.index)) == long_doc
    assert info["repeated_lines"]["removed"] == 30 and info["repeated_lines"]["lines"] == 1
    assert info["repeated_lines"]["top"] == [{"line": "Home | About | Contact", "docs": 30}]
    assert info["long_docs"]["docs"] == 1 and info["long_docs"]["pieces"] == 5
    assert info["changed"]["from_utf16_32"] == 31
    warnings = "\n".join(report["warnings"])
    assert "1 document(s) longer than data.clean.max_doc_chars=5,000 characters were split into " \
           "5 pieces" in warnings
    assert "removed 30 occurrences of 1 line(s) found in more than 30% of its 31 documents" \
           in warnings and "'Home | About | Contact' in 30" in warnings
    assert f"one document ({path}, line 31, 5 pieces) holds" in warnings
    md = (out / "report.md").read_text()
    assert md.index("## Warnings") < md.index("## Sources") and "split into 5 pieces" in md

    # Off: the navigation line stays, the long document is one record.
    report = build(recipe(path, max_doc_chars=0, repeated_line_fraction=1.0), tmp_path / "off")
    assert not report["sources"]["docs"]["repeated_lines"]["removed"]
    assert sum(report["sources"]["docs"]["splits"].values()) == 31


def test_repeated_line_default_leaves_shakespeare_speakers_alone():
    path = os.path.join(SHARED_DATA, "pretrain", "tinyshakespeare.txt")
    counts, docs = {}, 0
    for _, text in sources.text_documents(path, "paragraph", 1000):
        docs += 1
        for key in clean.line_keys(text):
            counts[key] = counts.get(key, 0) + 1
    assert docs > 900 and max(counts.values()) > 80  # GLOUCESTER: in 88 documents (9.6%)
    assert not clean.repeated_lines(counts, docs, 0.3)
    assert clean.repeated_lines(counts, docs, 0.05)  # a low threshold would strip them


def test_split_long_prefers_paragraphs_then_sentences_then_words():
    paragraphs = "\n\n".join(words(i, 100) for i in range(20))
    pieces = clean.split_long(paragraphs, 2000)
    assert max(map(len, pieces)) <= 2000 and "\n\n".join(pieces) == paragraphs
    sentences = " ".join(words(i, 30) for i in range(60))
    pieces = clean.split_long(sentences, 1500)
    assert all(p.endswith(".") for p in pieces) and " ".join(pieces) == sentences
    blob = "x" * 10_000
    assert clean.split_long(blob, 3000) == ["x" * 2500] * 4
    assert clean.split_long("short", 3000) == ["short"] and clean.split_long(blob, 0) == [blob]
    # At most MAX_PIECES pieces (the part byte of the order key): longer ones if need be.
    assert clean.split_long("y" * 2560, 1) == ["y" * 10] * clean.MAX_PIECES


def test_byte_order_marks_are_decoded_and_unmarked_utf16_refused(tmp_path):
    text = "héllo wörld\nsecond line\n"
    for name, data in (("le.txt", text.encode("utf-16")),
                       ("be.txt", b"\xfe\xff" + text.encode("utf-16-be")),
                       ("sig.txt", text.encode("utf-8-sig")), ("w32.txt", text.encode("utf-32"))):
        (tmp_path / name).write_bytes(data)
        assert list(sources.iter_lines(str(tmp_path / name))) == [
            (1, "héllo wörld"), (2, "second line")], name
    (tmp_path / "a.jsonl").write_bytes(b'\xef\xbb\xbf{"text": "x"}\n{"text": "y"}\n')
    assert [v for _, v in readers.json_values(str(tmp_path / "a.jsonl"))] == [
        {"text": "x"}, {"text": "y"}]
    (tmp_path / "a.json").write_bytes(json.dumps([{"text": "é"}, {"text": "z"}]).encode("utf-16"))
    assert [v for _, v in readers.json_values(str(tmp_path / "a.json"))] == [
        {"text": "é"}, {"text": "z"}]
    (tmp_path / "nobom.txt").write_bytes(text.encode("utf-16-le"))
    with pytest.raises(UserError, match=r"nobom.txt: has zero bytes but no byte-order mark .* "
                                        "re-encode it as UTF-8"):
        list(sources.iter_lines(str(tmp_path / "nobom.txt")))
    (tmp_path / "broken.txt").write_bytes(b"\xff\xfe" + "ok\n".encode("utf-16-le") + b"\x00\xd8")
    with pytest.raises(UserError, match="broken.txt, line 2 or after: not valid UTF-16"):
        list(sources.iter_lines(str(tmp_path / "broken.txt")))


# ---------------------------------------------------------------------------------------------
# `inspect` and TFDS output.


def test_inspect_default_workdir_is_a_user_cache(tmp_path, monkeypatch):
    from data_pipelines import inspect

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert inspect.default_workdir() == str(tmp_path / "cache" / "t5x_like" / "inspect")
    monkeypatch.setenv("XDG_CACHE_HOME", "/proc/no-such-cache")  # not writable
    assert inspect.default_workdir().startswith(os.path.join(__import__("tempfile").gettempdir(),
                                                             "t5x_like-inspect-"))


@pytest.mark.slow  # a subprocess importing the trainer (JAX): ~10 s
def test_inspect_writes_to_a_cache_not_the_current_folder(tmp_path):
    docs = small_corpus(tmp_path)
    cwd, cache = tmp_path / "cwd", tmp_path / "cache"
    cwd.mkdir()
    result = subprocess.run(
        [sys.executable, "-m", "data_pipelines.inspect",
         f"--config={os.path.join(ROOT, 'configs', 'pretrain_tiny.py')}", "--n=1",
         f"--config.data.source=jsonl:{docs}:text", "--config.data.vocab_size=320",
         "--config.data.validation_fraction=0.2"], cwd=cwd, capture_output=True, text=True,
        timeout=300, env=dict(os.environ, XDG_CACHE_HOME=str(cache)))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "--- train example 0 ---" in result.stdout
    assert "Downloading and preparing" not in result.stdout + result.stderr
    assert os.listdir(cwd) == []
    assert glob.glob(str(cache / "t5x_like" / "inspect" / "data" / "jsonl-docs.jsonl-*" /
                         "prepare.json"))
