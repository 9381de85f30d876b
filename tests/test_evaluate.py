"""End to end on a tiny run trained here: `evaluate` writes results.json, the markdown table,
predictions and metric lines; --checkpoint resolves; compare / ratings / report work."""

import csv
import json
import os
import runpy
import subprocess
import sys

import pytest

from conftest import ROOT
from t5x_like import evaluate
from t5x_like.core import metrics as metrics_lib
from t5x_like.training import trainer
from t5x_like.core.errors import UserError

SUITE = """
from configs.eval import common

def get_config():
    cfg = common.suite()
    cfg.batch_size = 8
    cfg.tasks.arithmetic = common.task("generate", "synthetic:arithmetic", n=12, template="plain",
                                       max_new_tokens=6, stop_strings=("\\n",))
    cfg.tasks.labels = common.task("generate", "jsonl:{labels}", metrics="classification,exact_match",
                                   max_new_tokens=4)
    cfg.tasks.chat = common.task("likelihood", "synthetic:arithmetic_chat", n=16)
    cfg.tasks.validation = common.task("likelihood", "run")
    return cfg
"""


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """40 steps on the synthetic task, checkpoints and whole-split validation at 20 and 40."""
    from configs import base

    workdir = tmp_path_factory.mktemp("run")
    cfg = base.get_config()
    cfg.steps = 40
    cfg.log_every_steps = 10
    cfg.model.update(dict(hidden_dim=64, num_layers=2, num_heads=4, num_kv_heads=2, mlp_dim=128,
                          max_len=64))
    cfg.data.update(dict(batch_size=16, synthetic_docs=2000, vocab_size=400))
    cfg.optimizer.update(dict(lr=3e-3, warmup_steps=5))
    cfg.checkpoint.update(dict(every_steps=20, keep_best_by="loss"))
    cfg.eval.update(dict(every_steps=20, steps=0))
    trainer.train_and_evaluate(cfg, str(workdir))
    return workdir


def run_cli(*args, cwd=ROOT):
    result = subprocess.run([sys.executable, "-m", "t5x_like.evaluate", *args], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    return result


def test_checkpoint_resolution(trained):
    assert evaluate.checkpoint_step(str(trained), "latest") == 40
    assert evaluate.checkpoint_step(str(trained), "20") == 20
    losses = {r["step"]: r["loss"] for r in metrics_lib.read_metrics(str(trained))
              if r["split"] == "validation"}
    assert sorted(losses) == [20, 40]
    assert evaluate.checkpoint_step(str(trained), "best") == min(losses, key=losses.get)
    with pytest.raises(UserError, match="has no checkpoint for step 7 \\(it has 20, 40\\)"):
        evaluate.checkpoint_step(str(trained), "7")
    with pytest.raises(UserError, match="--checkpoint=newest: use latest, best or a step"):
        evaluate.checkpoint_step(str(trained), "newest")


def test_best_follows_keep_best_by_and_mode(tmp_path):
    """A run whose best checkpoint is not its latest: best by accuracy (max), then by loss."""
    for step in (10, 20, 30):
        os.makedirs(tmp_path / "checkpoints" / str(step))
    os.makedirs(tmp_path / "checkpoints" / "damaged-40-123")
    lines = [{"step": 10, "split": "validation", "loss": 2.0, "accuracy": 0.5},
             {"step": 20, "split": "validation", "loss": 1.5, "accuracy": 0.4},
             {"step": 20, "split": "train", "loss": 0.1, "accuracy": 0.99},
             {"step": 30, "split": "validation", "loss": 1.7, "accuracy": 0.45},
             {"step": 40, "split": "validation", "loss": 0.1, "accuracy": 0.9}]  # no checkpoint
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    config = {"checkpoint": {"keep_best_by": "accuracy", "best_mode": "max"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert evaluate.checkpoint_step(str(tmp_path), "best") == 10
    assert evaluate.checkpoint_step(str(tmp_path), "latest") == 30
    # keep_best_by off: what the run stopped early on (accuracy, max), then the lowest loss.
    config = {"checkpoint": {"keep_best_by": "", "best_mode": "max"},
              "eval": {"early_stop_by": "accuracy", "early_stop_mode": "max"}}
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert evaluate.checkpoint_step(str(tmp_path), "best") == 10
    config["eval"]["early_stop_by"] = ""
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert evaluate.checkpoint_step(str(tmp_path), "best") == 20
    (tmp_path / "metrics.jsonl").write_text("")
    with pytest.raises(UserError, match="has no validation loss at any of its checkpoint steps"):
        evaluate.checkpoint_step(str(tmp_path), "best")


def test_evaluate_cli_writes_results_table_predictions_and_metric_lines(trained, tmp_path):
    labels = tmp_path / "labels.jsonl"
    labels.write_text("".join(json.dumps({"prompt": f"Is {i} even? Answer yes or no.",
                                          "references": ["yes" if i % 2 == 0 else "no"]}) + "\n"
                              for i in range(6)))
    suite = tmp_path / "suite.py"
    suite.write_text(SUITE.format(labels=labels))
    result = run_cli(f"--workdir={trained}", f"--config={suite}", "--checkpoint=best",
                     "--config.tasks.arithmetic.n=16")
    assert result.returncode == 0, result.stderr[-3000:]
    step = evaluate.checkpoint_step(str(trained), "best")
    out = trained / "eval" / str(step)
    results = json.loads((out / "results.json").read_text())
    assert results["step"] == step and results["checkpoint"] == "best"
    tasks = results["tasks"]
    assert sorted(tasks) == ["arithmetic", "chat", "labels", "validation"]
    assert tasks["arithmetic"]["n"] == 16 and tasks["arithmetic"]["settings"]["n"] == 16
    assert set(tasks["arithmetic"]["metrics"]) == {"exact_match"}
    assert set(tasks["labels"]["metrics"]) == {"accuracy", "precision", "recall", "f1",
                                               "exact_match"}
    assert set(tasks["chat"]["metrics"]) >= {"loss", "perplexity", "bits_per_byte", "accuracy"}
    # The whole validation split through the training pipeline: what training logged there.
    logged = {r["step"]: r for r in metrics_lib.read_metrics(str(trained))
              if r["split"] == "validation"}
    assert tasks["validation"]["metrics"]["loss"] == pytest.approx(logged[step]["loss"], rel=1e-5)
    assert tasks["validation"]["metrics"]["bits_per_byte"] == pytest.approx(
        logged[step]["bits_per_byte"], rel=1e-5)

    # Predictions next to references, with the exact-match verdict of synthetic.check_answer.
    from data_pipelines import synthetic

    rows = [json.loads(line) for line in (out / "arithmetic.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    for row in rows:
        assert row["exact_match"] == synthetic.check_answer(row["prompt"], row["prediction"])
        assert row["references"] == [str(synthetic.parse_question(row["prompt"]).answer)]
    accuracy = sum(r["exact_match"] for r in rows) / len(rows)
    assert tasks["arithmetic"]["metrics"]["exact_match"] == pytest.approx(accuracy)

    # The markdown table, written and printed.
    table = (out / "results.md").read_text()
    assert "| arithmetic | generate | synthetic:arithmetic | 16 | exact_match |" in table
    assert table in result.stdout
    # One metrics.jsonl line per task, with step and split.
    lines = [r for r in metrics_lib.read_metrics(str(trained)) if r["split"].startswith("eval/")]
    assert sorted(r["split"] for r in lines) == ["eval/arithmetic", "eval/chat", "eval/labels",
                                                 "eval/validation"]
    assert all(r["step"] == step for r in lines)
    assert [r["exact_match"] for r in lines if r["split"] == "eval/arithmetic"] == [accuracy]
    assert not [p for p in os.listdir(out) if ".tmp" in p]

    # Running one task again (here in-process) keeps the others in results.json.
    cfg = runpy.run_path(str(suite))["get_config"]()
    cfg.only = "chat"
    again = evaluate.evaluate(str(trained), cfg, str(step))
    assert sorted(again["tasks"]) == sorted(tasks)
    assert again["tasks"]["chat"]["metrics"] == pytest.approx(tasks["chat"]["metrics"])
    assert sorted(json.loads((out / "results.json").read_text())["tasks"]) == sorted(tasks)


def test_demo_accuracy_is_the_demo_suite_task(trained):
    """The Python entry other stages report: held-out answer_pair questions, checked by
    synthetic.check_answer, and the same files and metric line as the command line."""
    from data_pipelines import synthetic

    got = evaluate.demo_accuracy(str(trained), n=10, checkpoint="20", template="plain",
                                 batch_size=8)
    assert got["step"] == 20 and got["n"] == 10
    with open(got["predictions"], encoding="utf-8") as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 10
    for i, row in enumerate(rows):
        pair = synthetic.answer_pair(i, "validation")
        question = pair["prompt"][-1]["content"]
        assert synthetic.parse_question(question).held_out
        assert row["prompt"] == question and row["references"] == [pair["chosen"]]
        assert row["exact_match"] == synthetic.check_answer(question, row["prediction"])
    correct = sum(r["exact_match"] for r in rows)
    assert got["correct"] == correct and got["exact_match"] == pytest.approx(correct / 10)
    line = [r for r in metrics_lib.read_metrics(str(trained))
            if r["split"] == "eval/arithmetic" and r["step"] == 20][-1]
    assert line["exact_match"] == got["exact_match"] and line["examples"] == 10


def test_evaluate_cli_errors_are_one_line(trained, tmp_path):
    result = run_cli(f"--workdir={trained}", "--config=configs/eval/demo.py", "--checkpoint=30")
    assert result.returncode == 2
    assert "error: --checkpoint=30: " in result.stderr and "Traceback" not in result.stderr
    result = run_cli(f"--workdir={trained}", "--config=configs/eval/demo.py",
                     "--config.tasks.arithmetic.metrics=blue")
    assert result.returncode == 2 and "'tasks.arithmetic.metrics': unknown metric" in result.stderr


def test_compare_ratings_and_report_clis(trained, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("What is 12 + 30?\nWhat is 7 - 9?\nWhat is 45 + 45?\n")
    out = tmp_path / "review"
    result = run_cli("compare", str(trained / "checkpoints" / "20"), str(trained),
                     f"--prompts={prompts}", f"--out={out}", "--max_new_tokens=8",
                     "--template=plain")
    assert result.returncode == 0, result.stderr[-3000:]
    key = json.loads((out / "key.json").read_text())
    assert key["models"]["A"].endswith("step 20") and key["models"]["B"].endswith("step 40")
    with open(out / "sheet.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    for r in rows:  # prefer whichever side model A (step 20) is on
        side = next(k for k in key["rows"] if k["row"] == int(r["row"]))["response_1_model"]
        r["choice"] = "1" if side == "A" else "2"
    with open(tmp_path / "filled.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    result = run_cli("ratings", str(out), f"--ratings={tmp_path / 'filled.csv'}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "A wins 3, B wins 0, ties 0" in result.stdout
    assert len((out / "preferences.jsonl").read_text().splitlines()) == 3

    # A second "run" for the report: the same metrics shifted, in its own folder.
    other = tmp_path / "other"
    other.mkdir()
    shifted = [dict(r, loss=r["loss"] + 0.5) for r in metrics_lib.read_metrics(str(trained))
               if "loss" in r] + [{"step": 40, "split": "eval/arithmetic", "exact_match": 0.25}]
    (other / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shifted))
    result = run_cli("report", str(trained), str(other), f"--out={tmp_path / 'report'}")
    assert result.returncode == 0, result.stderr[-3000:]
    text = (tmp_path / "report" / "report.md").read_text()
    assert f"| {trained.name} | 40 |" in text and "| other | 40 |" in text
    assert "| arithmetic | exact_match |" in text and "0.25 (step 40)" in text
    with open(tmp_path / "report" / "learning_curves.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
