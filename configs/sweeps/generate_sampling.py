"""Sampling search: temperature and top-p for a generation metric of a trained chat model.

    python -m t5x_like.sweep --config=configs/sweeps/generate_sampling.py \
        --workdir=sweeps/sampling \
        --config.args="--run=runs/sft --checkpoint=best"

No training: each trial is `python -m t5x_like.eval_trial --run=<run> --config=<suite>
--workdir=<trial dir> --config.tasks.<task>.temperature=...`, which evaluates the run with the
evaluation suite (t5x_like.evaluate's eval_suite.run_suite) and writes the task's metrics to the
trial's metrics.jsonl under split "eval/<task>", the objective's split. Here: exact match on
200 held-out arithmetic questions of configs/eval/demo.py (maximized).

Needs the evaluation suite (t5x_like/evaluation/eval_suite.py and configs/eval/, branch
`eval`); until it is merged the sweep stops before any trial, naming configs/eval/demo.py.
Another suite or task: change `config`, the keys under `space.tasks.<task>` and
`objective.split`/`metric`.
"""

import ml_collections

from configs.sweeps import common


def get_config():
    cfg = common.sweep()
    cfg.program = "t5x_like.eval_trial"
    cfg.config = "configs/eval/demo.py"
    cfg.args = "--run=runs/sft"
    cfg.fixed = ml_collections.ConfigDict({"only": "arithmetic"})
    cfg.space = ml_collections.ConfigDict({"tasks": {"arithmetic": {
        "temperature": common.uniform(0.0, 1.5),
        "top_p": common.uniform(0.5, 1.0),
    }}})
    cfg.objective.split = "eval/arithmetic"
    cfg.objective.metric = "exact_match"
    cfg.objective.mode = "max"
    cfg.sampler = "tpe"
    cfg.trials = 20
    cfg.startup_trials = 6
    return cfg
