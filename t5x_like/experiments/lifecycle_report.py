"""report.md of a lifecycle workdir: the run's report card (see t5x_like/experiments/lifecycle.py).

Written from what the stages left behind (lifecycle.json, each run's config.json and
metrics.jsonl, each evaluation's results and predictions); every lifecycle run rewrites it, so a
rerun of a finished lifecycle only refreshes the report.
"""

import datetime
import itertools
import json
import os
import platform

from t5x_like.core import files, markdown, plots
from t5x_like.core import metrics as metrics_lib

_HEADLINE = ("exact_match", "accuracy", "perplexity", "bits_per_byte", "bleu", "rougeL",
             "acc")  # acc: lm-evaluation-harness's accuracy (harness tasks)


def _final(run: str, split: str) -> dict:
    rows = [r for r in metrics_lib.read_metrics(run) if r.get("split") == split]
    return rows[-1] if rows else {}


def _tokens(run: str) -> int:
    """Token slots the run trained on: steps x global batch x sequence length."""
    with open(os.path.join(run, "config.json"), encoding="utf-8") as f:
        cfg = json.load(f)
    steps = _final(run, "train").get("step", 0)
    return int(steps * cfg["data"]["batch_size"] * cfg["model"]["max_len"])


def _eval_metrics(record: dict) -> dict[str, float]:
    """task/metric -> value of an evaluation stage's results."""
    out = {}
    for task, result in record.get("results", {}).get("tasks", {}).items():
        for k, v in result.get("metrics", {}).items():
            if isinstance(v, (int, float)):
                out[f"{task}/{k}"] = v
    return out


def _harness_note(stages: dict, evals: list[str]) -> list[str]:
    """Which columns came from lm-evaluation-harness, as which of its tasks."""
    found = {}
    for n in evals:
        for task, r in stages[n].get("results", {}).get("tasks", {}).items():
            if r.get("kind") == "harness":
                found[task] = (r.get("source", ""), r.get("lm_eval_version", ""))
    if not found:
        return []
    named = ", ".join(f"{t} is its task {src}" + (f" (lm-eval {v})" if v else "")
                      for t, (src, v) in sorted(found.items()))
    return [f"Through lm-evaluation-harness: {named}; its results JSON is in each run's "
            "eval/<step>/harness/.", ""]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def plot_losses(workdir: str, train_stages: list[str], path: str) -> bool:
    runs = [(n, os.path.join(workdir, n)) for n in train_stages
            if os.path.exists(os.path.join(workdir, n, "metrics.jsonl"))]
    if not runs:
        return False
    fig, axes = plots.pyplot().subplots(1, len(runs), figsize=(3.6 * len(runs), 3.0), squeeze=False)
    for ax, (name, run) in zip(axes[0], runs):
        rows = metrics_lib.read_metrics(run)
        for split, style in (("train", "-"), ("validation", "o-")):
            pts = [(r["step"], r["loss"]) for r in rows
                   if r.get("split") == split and isinstance(r.get("loss"), (int, float))]
            if pts:
                ax.plot(*zip(*pts), style, label=split, markersize=3)
        ax.set_title(name)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("loss")
    axes[0][0].legend()
    fig.tight_layout()
    plots.save(fig, path, dpi=110)
    return True


def plot_evals(evals: list[tuple[str, dict]], metric: str, path: str) -> bool:
    pts = [(name, m[metric]) for name, m in evals if metric in m]
    if not pts:
        return False
    fig, ax = plots.pyplot().subplots(figsize=(1.4 * len(pts) + 2, 3.0))
    ax.bar([p[0] for p in pts], [p[1] for p in pts], color="#4C72B0")
    for i, (_, v) in enumerate(pts):
        ax.text(i, v, f"{v:.3f}", ha="center", va="bottom", fontsize=8)
    ax.set_ylabel(metric)
    ax.set_ylim(0, max(1.0, max(p[1] for p in pts) * 1.1))
    fig.tight_layout()
    plots.save(fig, path, dpi=110)
    return True


def _samples(record: dict, k: int = 3) -> list[dict]:
    """The first k predictions of an evaluation's generation task(s)."""
    out = []
    results = record.get("results", {})
    for task, result in results.get("tasks", {}).items():
        pred = result.get("predictions")
        if not pred:
            continue
        path = os.path.join(results.get("workdir", ""), "eval", str(results.get("step")), pred)
        if not os.path.exists(path):
            continue
        for _, row in itertools.islice(files.iter_jsonl(path), max(0, k - len(out))):
            out.append({"task": task, **row})
    return out


def _prompt_text(row: dict) -> str:
    prompt = row.get("prompt")
    if isinstance(prompt, list):
        return " / ".join(f"{m['role']}: {m['content']}" for m in prompt if m["role"] != "system")
    return str(prompt)


def write(cfg, workdir: str, state: dict, names: list[str]) -> str:
    stages = state.get("stages", {})
    lines = [f"# Lifecycle report: {cfg.name}{' (quick)' if cfg.quick else ''}", ""]
    total = sum(s.get("wall_s", 0) for s in stages.values())
    lines += [f"- date: {datetime.datetime.now().isoformat(timespec='seconds')}",
              f"- machine: {platform.node()}, {os.cpu_count()} CPU cores, "
              f"Python {platform.python_version()}",
              f"- stages done: {sum(1 for n in names if stages.get(n, {}).get('done'))} of "
              f"{len(names)}; total wall time {total / 60:.1f} min", ""]

    evals = [(n, _eval_metrics(stages[n])) for n in names
             if stages.get(n, {}).get("kind") == "eval" and stages[n].get("done")]
    if evals:
        keys = sorted({k for _, m in evals for k in m if k.split("/")[-1] in _HEADLINE})
        lines += ["## Headline: evaluation after each stage", ""]
        lines += markdown.table(["evaluation", "of run", *keys],
                                [[name, cfg.stages[name].run, *(_fmt(m.get(k, "")) for k in keys)]
                                 for name, m in evals])
        lines.append("")
        lines += _harness_note(stages, [n for n, _ in evals])
        metric = next((k for k in keys if k.endswith("exact_match")), keys[0] if keys else None)
        if metric and plot_evals(evals, metric, os.path.join(workdir, "report_eval.png")):
            lines += [f"![{metric} per evaluation](report_eval.png)", ""]

    rows = []
    for n in names:
        rec = stages.get(n)
        if not rec:
            rows.append([n, cfg.stages[n].kind, "not run", "", "", ""])
            continue
        metrics, tokens = "", ""
        if rec["kind"] == "train" and rec.get("run"):
            tokens = f"{_tokens(rec['run']):,}"
            val = _final(rec["run"], "validation")
            metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in val.items()
                                if k not in ("step", "split") and isinstance(v, (int, float)))
        elif rec["kind"] == "eval":
            metrics = ", ".join(f"{k}={_fmt(v)}" for k, v in _eval_metrics(rec).items())
        elif rec["kind"] == "feedback":
            metrics = ", ".join(f"{k}={v}" for k, v in rec.get("feedback", {}).items()
                                if not isinstance(v, dict))
        command = " ".join(rec.get("command", [])[1:]).replace(workdir + "/", "")
        wall = f"{rec['wall_s']:.0f} s" if "wall_s" in rec else "failed"
        rows.append([n, rec["kind"], wall, tokens, metrics, f"`{command}`"])
    lines += ["## Stages", ""] + markdown.table(
        ["stage", "kind", "wall time", "tokens", "final metrics", "command"], rows) + [""]

    train_stages = [n for n in names if cfg.stages[n].kind == "train" and n in stages]
    if plot_losses(workdir, train_stages, os.path.join(workdir, "report_losses.png")):
        lines += ["## Loss curves", "", "![loss of every train stage](report_losses.png)", ""]

    fb = [(n, stages[n]["feedback"]) for n in names if stages.get(n, {}).get("feedback")]
    for n, info in fb:
        users = [m for m in names if cfg.stages[m].get("data_from") == n]
        lines += [f"## Feedback round ({n})", "",
                  f"{info['conversations']} simulated conversations, {info['replies']} replies "
                  f"rated: {info['up']} up, {info['down']} down. Exported "
                  f"{info.get('preference_records', 0)} preference pairs and "
                  f"{info.get('sft_records', 0)} SFT conversations "
                  f"({n}/preference.jsonl, {n}/sft.jsonl); with "
                  f"{info.get('replayed_pairs', 0)} replayed task pairs "
                  f"({n}/train_pairs.jsonl) trained on by: {', '.join(users) or 'no stage'}.",
                  ""]
        if "export" in info:  # which feedback it used, and what the export left out
            left = "; ".join(
                f"{fmt}: " + (", ".join(f"{k} {v}" for k, v in info[f"{fmt}_left_out"].items())
                              or "nothing")
                for fmt in ("preference", "sft") if f"{fmt}_left_out" in info)
            lines += [("Exported only reviewed and approved corrections and reports "
                       "(reviewed_only=1)" if info["export"] == "reviewed_only" else
                       "Exported without a review (the simulated users' judge as it is)") +
                      f". Left out: {left}.", ""]

    sample_lines = []
    for name, _ in evals:
        rows = _samples(stages[name])
        if rows:
            sample_lines += [f"**{name}** (model: {cfg.stages[name].run})", ""]
            for r in rows:
                ok = r.get("scores", {}).get("exact_match")
                mark = "" if ok is None else (" ✓" if ok else " ✗")
                sample_lines.append(f"- {_prompt_text(r)} → `{r.get('prediction', '')}`{mark}")
            sample_lines.append("")
    if sample_lines:
        lines += ["## Sample conversations, before and after each tuning stage", ""] + sample_lines

    path = os.path.join(workdir, "report.md")
    files.atomic_write_text(path, "\n".join(lines) + "\n")
    return path
