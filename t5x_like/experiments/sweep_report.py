"""A sweep's results, built from the Optuna study alone (so any worker of a many-host study can
write them): results.csv and results.md (trials x overrides x objective and final metrics,
best first), best_config.py (the best trial's job config, runnable as is), and plots/.
"""

import csv
import io
import math
import os
import pprint
import warnings

from optuna.trial import TrialState

from t5x_like.core import config as config_lib
from t5x_like.core import files
from t5x_like.core import markdown as markdown_lib
from t5x_like.core import plots as plots_lib
from t5x_like.experiments import sweep_config

_STATES = {TrialState.COMPLETE: "complete", TrialState.PRUNED: "pruned",
           TrialState.FAIL: "failed", TrialState.RUNNING: "running", TrialState.WAITING: "waiting"}
_ORDER = ("complete", "pruned", "running", "waiting", "failed")
# Final metrics that say how much was evaluated, not how good it was.
_COUNTS = ("tokens", "examples")


def retried(trials) -> set[int]:
    """Numbers of the interrupted trials that ran again (as other trials)."""
    return {n for t in trials for n in t.system_attrs.get("retry_history", [])}


def rows(study, cfg) -> list[dict]:
    """One dict per trial, best first: complete by objective, then pruned by their last value,
    then running, waiting and failed ones. Interrupted trials that ran again are left out."""
    sign = 1.0 if cfg.objective.mode == "min" else -1.0
    trials = study.get_trials(deepcopy=False)
    ran_again = retried(trials)
    out = []
    for t in trials:
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted") and t.number in ran_again:
            continue
        state = _STATES[t.state]
        if t.state == TrialState.FAIL and t.user_attrs.get("interrupted"):
            state = "interrupted"
        value = t.value  # a pruned or running trial: its latest evaluation; a failed one: none
        if value is None and t.intermediate_values and state in ("pruned", "running"):
            value = t.intermediate_values[max(t.intermediate_values)]
        final = {k: v for k, v in t.user_attrs.get("final", {}).items() if k not in _COUNTS}
        out.append({"trial": t.number, "state": state, **t.params, "objective": value,
                    **{f"final {k}": v for k, v in final.items()},
                    "steps": t.user_attrs.get("steps"),
                    "minutes": (t.user_attrs["seconds"] / 60 if "seconds" in t.user_attrs
                                else None),
                    "note": t.user_attrs.get("note", ""),
                    "workdir": t.user_attrs.get("workdir", ""),
                    "command": t.user_attrs.get("command", "")})

    def key(row):
        rank = _ORDER.index(row["state"]) if row["state"] in _ORDER else len(_ORDER)
        value = row["objective"]
        finite = isinstance(value, (int, float)) and math.isfinite(value)
        value = sign * value if finite else math.inf
        return rank, value, row["trial"]

    return sorted(out, key=key)


def _columns(table: list[dict], cfg) -> list[str]:
    params = list(sweep_config.flatten(cfg.space))
    finals = []
    for row in table:
        finals += [k for k in row if k.startswith("final ") and k not in finals]
    return ["trial", "state", *params, "objective", *finals, "steps", "minutes", "note"]


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")


def wall_minutes(study) -> float | None:
    """From the first trial's start to the last trial's end (all workers together)."""
    trials = [t for t in study.get_trials(deepcopy=False) if t.datetime_start]
    ends = [t.datetime_complete for t in trials if t.datetime_complete]
    if not trials or not ends:
        return None
    return (max(ends) - min(t.datetime_start for t in trials)).total_seconds() / 60


def markdown(table: list[dict], cfg, study=None) -> str:
    o = cfg.objective
    counts = {s: sum(1 for r in table if r["state"] == s) for s in (*_ORDER, "interrupted")}
    lines = []
    if study is not None:
        wall = wall_minutes(study)
        lines.append(f"Sweep `{study.study_name}`: {cfg.program} {cfg.config}; objective "
                     f"{o.split} {o.metric} ({o.reduce}, {o.mode}); sampler {cfg.sampler}, "
                     f"pruner {cfg.pruner}; "
                     + ", ".join(f"{n} {s}" for s, n in counts.items() if n)
                     + (f"; wall time {wall:.1f} min." if wall is not None else "."))
        lines.append("")
    columns = _columns(table, cfg)
    lines += markdown_lib.table(columns, [[_cell(row.get(c)) for c in columns] for row in table])
    return "\n".join(lines) + "\n"


def to_csv(table: list[dict], cfg) -> str:
    columns = _columns(table, cfg) + ["workdir", "command"]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    writer.writerows(table)
    return buffer.getvalue()


def best_config(study, cfg) -> str | None:
    """The best complete trial's job config as a self-contained config file: every key written
    out, so it runs as is anywhere (`python -m <program> --config=best_config.py ...`)."""
    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return None
    best = study.best_trial
    job = sweep_config.load_job_config(cfg.config)
    overrides = {**sweep_config.flatten(cfg.fixed), **best.params}
    sweep_config.apply_overrides(job, overrides, where="fixed", config_path=cfg.config)
    swept = "\n".join(f"    {k} = {v!r}" for k, v in best.params.items())
    return (
        f'"""Best trial of sweep {study.study_name}: trial {best.number}, '
        f"{cfg.objective.split} {cfg.objective.metric} = {best.value:.6g} "
        f"({cfg.objective.reduce}, {cfg.objective.mode}).\n\n"
        f"{cfg.config} with the sweep's fixed overrides and these swept values:\n{swept}\n\n"
        f"    python -m {cfg.program} --config=<this file> --workdir=<new run dir> {cfg.args}"
        .rstrip() + "\n"
        '"""\n\nimport ml_collections\n\n'
        f"CONFIG = {pprint.pformat(config_lib.to_dict(job), indent=1, width=99, sort_dicts=True)}"
        "\n\n\ndef get_config():\n    return ml_collections.ConfigDict(CONFIG)\n")


def plots(study, cfg, folder: str) -> list[str]:
    """plots/objective_vs_params.png (objective against each swept key, complete trials) and
    plots/learning_curves.png (the objective at each evaluation, every trial), by Optuna."""
    import logging as std_logging

    plots_lib.pyplot()
    # matplotlib logs at INFO for every categorical axis of numbers (choice() values).
    std_logging.getLogger("matplotlib").setLevel(std_logging.WARNING)
    import optuna.visualization.matplotlib as ov

    os.makedirs(folder, exist_ok=True)
    written = []
    label = f"{cfg.objective.split} {cfg.objective.metric}"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Optuna marks its matplotlib plots experimental
        figures = []
        if study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
            axes = ov.plot_slice(study, params=list(sweep_config.flatten(cfg.space)),
                                 target_name=label)
            figures.append(("objective_vs_params.png", axes))
        if any(t.intermediate_values for t in study.get_trials(deepcopy=False)):
            axes = ov.plot_intermediate_values(study)
            axes.set_ylabel(label)
            axes.set_xlabel("step")
            axes.set_title(f"Learning curves: {label} at each evaluation")
            figures.append(("learning_curves.png", axes))
        for name, axes in figures:
            first = axes.flat[0] if hasattr(axes, "flat") else axes
            written.append(plots_lib.save(first.figure, os.path.join(folder, name), dpi=100,
                                          bbox_inches="tight"))
    return written


def write(study, cfg, workdir: str) -> str:
    """Writes every result file into `workdir`; returns the markdown table."""
    table = rows(study, cfg)
    text = markdown(table, cfg, study)
    files.atomic_write_text(os.path.join(workdir, "results.md"), text)
    files.atomic_write_text(os.path.join(workdir, "results.csv"), to_csv(table, cfg))
    best = best_config(study, cfg)
    if best is not None:
        files.atomic_write_text(os.path.join(workdir, "best_config.py"), best)
        files.atomic_write_json(os.path.join(workdir, "best_trial.json"), table[0], default=str)
    plots(study, cfg, os.path.join(workdir, "plots"))
    return text
