"""What an evaluation writes: `<workdir>/eval/<step>/results.json` and `results.md`, and one
line per task in `<workdir>/metrics.jsonl` (split "eval/<task>"), for suites (eval_suite.py)
and lm-evaluation-harness tasks (harness.py) alike.
"""

import json
import os
import time

import jax

from t5x_like.core import files
from t5x_like.core import markdown as markdown_lib
from t5x_like.core.metrics import MetricWriter


def write(workdir: str, step: int, tasks: dict, *, checkpoint: str = "") -> dict:
    """Merges `tasks` into eval/<step>/results.json, rewrites results.md, logs metric lines."""
    out_dir = os.path.join(workdir, "eval", str(step))
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, "results.json")
    results = {"workdir": os.path.abspath(workdir), "step": step, "tasks": {}}
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            results["tasks"] = json.load(f).get("tasks", {})
    results["tasks"].update(tasks)
    results["checkpoint"] = checkpoint or str(step)
    results["time"] = time.strftime("%Y-%m-%d %H:%M:%S")
    files.atomic_write_json(path, results, ensure_ascii=False)
    files.atomic_write_text(os.path.join(out_dir, "results.md"), markdown(results))
    writer = MetricWriter(workdir, enabled=jax.process_index() == 0)
    try:
        for name, r in tasks.items():
            writer.write(step, {**r["metrics"], "examples": r["n"]}, split=f"eval/{name}")
    finally:
        writer.close()
    return results


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 1000 else f"{value:.1f}"
    return str(value)


def markdown(results: dict) -> str:
    rows = [(name, r["kind"], r["source"], r["n"], metric, _format(value))
            for name, r in sorted(results["tasks"].items())
            for metric, value in r["metrics"].items()]
    lines = [f"Evaluation of {results['workdir']} at step {results['step']}", ""]
    lines += markdown_lib.table(("task", "kind", "source", "n", "metric", "value"), rows)
    return "\n".join(lines) + "\n"
