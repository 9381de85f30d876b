"""Run comparison from metrics.jsonl: curves, tables, and what it refuses."""

import json

import pytest

from t5x_like.evaluation import report
from t5x_like.core.errors import UserError


def write_run(path, records, config=None):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if config is not None:
        (path / "config.json").write_text(json.dumps(config))


def test_series_keeps_the_last_line_per_step_and_skips_non_numbers():
    got = report.series([
        {"step": 10, "split": "train", "loss": 3.0},
        {"step": 20, "split": "train", "loss": 2.0, "grad_norm": "nan"},
        {"step": 20, "split": "eval/qa", "token_f1": 0.1, "examples": 5},
        {"step": 20, "split": "eval/qa", "token_f1": 0.2, "examples": 5},  # evaluated again
        {"step": 5, "split": "validation", "loss": 4.0},
    ])
    assert got[("train", "loss")] == [(10, 3.0), (20, 2.0)]
    assert ("train", "grad_norm") not in got
    assert got[("eval/qa", "token_f1")] == [(20, 0.2)]
    assert got[("validation", "loss")] == [(5, 4.0)]


def test_report_tables_and_curves(tmp_path):
    lines = [{"step": s, "split": "train", "loss": 5.0 / s} for s in (1, 2, 3)]
    lines += [{"step": 3, "split": "validation", "loss": 2.0, "perplexity": 7.4,
               "bits_per_byte": 1.5, "accuracy": 0.4},
              {"step": 2, "split": "eval/qa", "exact_match": 0.1, "tokens": 50},
              {"step": 3, "split": "eval/qa", "exact_match": 0.3, "tokens": 50}]
    write_run(tmp_path / "a" / "run", lines, {"data": {"source": "synthetic:arithmetic"}})
    write_run(tmp_path / "b" / "run", lines[:3])
    text = report.report([str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")],
                         str(tmp_path / "out"))
    assert "| run | 3 | 1.667 | 2 | 7.4 | 1.5 | 0.4 | 2 (3) | synthetic:arithmetic |" in text
    assert "| b/run | 3 | 1.667 | - | - | - | - | - | - |" in text  # same name, told apart
    assert "| qa | exact_match | 0.3 (step 3) | - |" in text
    panels = report.plot(report.load_runs([str(tmp_path / "a" / "run")]),
                         str(tmp_path / "curves.png"))
    assert ("eval/qa", "exact_match") in panels and ("eval/qa", "tokens") not in panels
    png = (tmp_path / "out" / "learning_curves.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    assert "learning_curves.png" in (tmp_path / "out" / "report.md").read_text()


def test_report_refuses_what_is_not_a_run(tmp_path):
    with pytest.raises(UserError, match="has no metrics.jsonl"):
        report.report([str(tmp_path)], str(tmp_path / "out"))
    write_run(tmp_path / "empty", [])
    with pytest.raises(UserError, match="no train or validation metrics to plot"):
        report.report([str(tmp_path / "empty")], str(tmp_path / "out"))
