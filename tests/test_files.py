"""t5x_like/core/files.py, markdown.py, plots.py: the writers every report and job shares."""

import json
import os

import pytest

from t5x_like.core import files, markdown, plots
from t5x_like.core.errors import UserError


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = str(tmp_path / "results.json")
    files.atomic_write_json(path, {"a": 1})
    with pytest.raises(TypeError):  # not JSON: fails halfway through the write
        files.atomic_write_json(path, {"b": object()})
    assert json.loads(open(path).read()) == {"a": 1}
    assert os.listdir(tmp_path) == ["results.json"]


def test_writers_write_what_they_are_given(tmp_path):
    files.atomic_write_text(str(tmp_path / "t.md"), "é\n")
    files.atomic_write_bytes(str(tmp_path / "b.bin"), b"\x00\xff")
    n = files.atomic_write_jsonl(str(tmp_path / "r.jsonl"), iter([{"x": "é"}, [1]]),
                                 ensure_ascii=False)
    files.atomic_copy(str(tmp_path / "b.bin"), str(tmp_path / "c.bin"))
    assert (tmp_path / "t.md").read_text(encoding="utf-8") == "é\n"
    assert (tmp_path / "c.bin").read_bytes() == b"\x00\xff"
    assert n == 2 and (tmp_path / "r.jsonl").read_text(encoding="utf-8") == '{"x": "é"}\n[1]\n'
    assert sorted(os.listdir(tmp_path)) == ["b.bin", "c.bin", "r.jsonl", "t.md"]


def test_a_folder_appears_whole_or_not_at_all(tmp_path):
    out = str(tmp_path / "model")
    with pytest.raises(RuntimeError):
        with files.atomic_dir(out) as tmp:
            files.atomic_write_text(os.path.join(tmp, "config.json"), "{}")
            raise RuntimeError("killed halfway")
    assert os.listdir(tmp_path) == []
    os.makedirs(out)  # an empty folder is replaced
    with files.atomic_dir(out) as tmp:
        files.atomic_write_text(os.path.join(tmp, "config.json"), "{}")
        assert not os.path.exists(os.path.join(out, "config.json"))
    assert os.listdir(tmp_path) == ["model"] and os.listdir(out) == ["config.json"]


def test_strict_reading_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"a": 1}\n\n{"a": 2}\n{"a": \n')
    with pytest.raises(UserError, match=r"p.jsonl, line 4: not valid JSON"):
        files.read_jsonl(str(path))
    assert list(files.iter_jsonl(str(path), [(7, '{"b": 3}'), (8, " ")])) == [(7, {"b": 3})]


def test_tolerant_reading_skips_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    assert files.read_jsonl_tolerant(str(path)) == []  # not written yet
    # A killed writer's torn line, then a restarted one's lines, then one still being written.
    path.write_text('{"step": 1}\n{"step": 2, "lo\n{"step": 2}\n{"step": 3, "loss"')
    assert files.read_jsonl_tolerant(str(path)) == [{"step": 1}, {"step": 2}]


def test_markdown_table():
    assert markdown.table(["", "a", "b"], [["x", 1, ""], ["y", 2.5, "z"]]) == [
        "| | a | b |", "|---|---|---|", "| x | 1 | |", "| y | 2.5 | z |"]


def test_saved_plot_is_a_png_and_leaves_no_temporary(tmp_path):
    fig, ax = plots.pyplot().subplots()
    ax.plot([0, 1], [1, 0])
    path = plots.save(fig, str(tmp_path / "curve.png"), dpi=20)
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"
    assert os.listdir(tmp_path) == ["curve.png"]
