"""Comparing runs after the fact, from what they wrote: metrics.jsonl and config.json.

    python -m t5x_like.evaluate report runs/a runs/b [--out=report]
        -> report/report.md            one table of the runs' last and best numbers, one of
                                       their evaluation tasks (printed too)
           report/learning_curves.png  train and validation curves of every run, and the
                                       evaluation metrics measured at two steps or more

A metric line logged twice for the same step and split (an evaluation run again) counts once:
the last one wins.
"""

import math
import os

from t5x_like.core import config as config_lib
from t5x_like.core import files, markdown, plots
from t5x_like.core.errors import UserError
from t5x_like.core.metrics import read_metrics

CURVES = (("train", "loss"), ("validation", "loss"), ("validation", "bits_per_byte"),
          ("validation", "accuracy"))
VALIDATION = ("loss", "perplexity", "bits_per_byte", "accuracy")
COUNTS = ("examples", "tokens")  # sizes of an evaluation, not results: tabulated, never plotted


def series(records: list[dict]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """{(split, metric): [(step, value), ...] sorted by step}, the last line per step winning."""
    latest: dict[tuple[str, str], dict[int, float]] = {}
    for r in records:
        split, step = r.get("split", "train"), r.get("step")
        if not isinstance(step, int):
            continue
        for key, value in r.items():
            if key in ("step", "split") or not isinstance(value, (int, float)):
                continue
            if isinstance(value, float) and not math.isfinite(value):
                continue
            latest.setdefault((split, key), {})[step] = float(value)
    return {k: sorted(v.items()) for k, v in latest.items()}


def load_runs(workdirs: list[str]) -> dict[str, dict]:
    """label -> {"workdir", "series", "config"} for each run (labels made unique)."""
    if not workdirs:
        raise UserError("name at least one run: report runs/a runs/b ...")
    runs = {}
    for workdir in workdirs:
        if not os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
            raise UserError(f"{workdir} has no metrics.jsonl; is it a t5x_like run directory?")
        label = os.path.basename(os.path.normpath(workdir))
        if label in runs:  # runs/a/x and runs/b/x
            label = os.path.join(os.path.basename(os.path.dirname(os.path.normpath(workdir))),
                                 label)
        config_path = os.path.join(workdir, "config.json")
        cfg = config_lib.to_dict(config_lib.load_json(config_path)) if os.path.isfile(
            config_path) else {}
        runs[label] = {"workdir": workdir, "series": series(read_metrics(workdir)),
                       "config": cfg}
    return runs


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _last(points):
    return points[-1] if points else (None, None)


def tables(runs: dict[str, dict]) -> str:
    """The markdown of report.md."""
    head = ["run", "steps", "train loss"] + [f"val {m}" for m in VALIDATION] + [
        "best val loss (step)", "source"]
    rows = []
    for label, run in runs.items():
        s = run["series"]
        steps = max((p[-1][0] for p in s.values() if p), default=None)
        vals = [_last(s.get(("validation", m), []))[1] for m in VALIDATION]
        losses = s.get(("validation", "loss"), [])
        best = min(losses, key=lambda p: p[1]) if losses else None
        source = run["config"].get("data", {}).get("source", "-")
        rows.append([label, _fmt(steps), _fmt(_last(s.get(("train", "loss"), []))[1]),
                     *map(_fmt, vals), f"{best[1]:.4g} ({best[0]})" if best else "-", source])
    lines = ["## Runs", ""] + markdown.table(head, rows)
    evals = sorted({k for run in runs.values() for k in run["series"]
                    if k[0].startswith("eval/") and k[1] != "examples"})
    if evals:
        rows = []
        for split, metric in evals:
            cells = [split[len("eval/"):], metric]
            for run in runs.values():
                step, value = _last(run["series"].get((split, metric), []))
                cells.append("-" if value is None else f"{value:.4g} (step {step})")
            rows.append(cells)
        lines += ["", "## Evaluation tasks (latest step evaluated)", ""] + markdown.table(
            ["task", "metric", *runs], rows)
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, dict], path: str) -> list[tuple[str, str]]:
    """Learning curves, one panel per (split, metric); returns the panels drawn."""
    plt = plots.pyplot()
    panels = [c for c in CURVES if any(run["series"].get(c) for run in runs.values())]
    panels += sorted({k for run in runs.values() for k, points in run["series"].items()
                      if k[0].startswith("eval/") and k[1] not in COUNTS and len(points) > 1})
    if not panels:
        raise UserError("the runs have no train or validation metrics to plot yet.")
    cols = min(2, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, (split, metric) in zip(axes.flat, panels):
        for label, run in runs.items():
            points = run["series"].get((split, metric))
            if points:
                steps, values = zip(*points)
                ax.plot(steps, values, marker="o" if len(points) < 20 else None, markersize=3,
                        label=label)
        ax.set_title(f"{split} {metric}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.tight_layout()
    plots.save(fig, path, dpi=100)
    return panels


def report(workdirs: list[str], out_dir: str) -> str:
    """Writes report.md and learning_curves.png into `out_dir`; returns the markdown."""
    runs = load_runs(workdirs)
    os.makedirs(out_dir, exist_ok=True)
    text = tables(runs)
    plot(runs, os.path.join(out_dir, "learning_curves.png"))
    files.atomic_write_text(os.path.join(out_dir, "report.md"), "# Run comparison\n\n" + text
                            + "\n![learning curves](learning_curves.png)\n")
    return text
