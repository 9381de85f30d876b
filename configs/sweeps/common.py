"""Every default of a sweep config, and the constructors of its search space.

A sweep runs one job (`program` with its `config` file) many times, each trial with the
`fixed` overrides plus one point of the `space`; both are nested like the job's config:

    cfg.fixed = ml_collections.ConfigDict({"steps": 300, "data": {"batch_size": 16}})
    cfg.space = ml_collections.ConfigDict({"optimizer": {"lr": log_uniform(1e-4, 1e-2)}})

Any key can be overridden on the command line: `--config.trials=30 --config.fixed.steps=100`.
README.md ("Sweeps") explains samplers, pruners and the results.
"""

import ml_collections


def sweep() -> ml_collections.ConfigDict:
    cfg = ml_collections.ConfigDict()
    cfg.name = ""  # Optuna study name; "" = the sweep workdir's folder name
    # The job of every trial: `python -m <program> --config=<config> --workdir=<trial dir>
    # <args> --config.<key>=<value>...` (t5x_like.train, or t5x_like.eval_trial for sampling).
    cfg.program = "t5x_like.train"
    cfg.config = "configs/pretrain_tiny.py"  # the job's config file (relative to the cwd)
    # More arguments for every trial, shell-quoted, e.g. "--run=runs/sft"; config overrides
    # belong in `fixed` (there they are checked and written into best_config.py).
    cfg.args = ""
    cfg.fixed = ml_collections.ConfigDict()  # overrides every trial gets (nested config keys)
    cfg.space = ml_collections.ConfigDict()  # swept keys (nested), each choice()/uniform()/...

    # What a trial is worth: `metric` of the `split` lines of the trial's metrics.jsonl; its value
    # at the end ("last") or the best over the run ("best", right for early-stopped runs).
    cfg.objective = ml_collections.ConfigDict()
    cfg.objective.metric = "loss"
    cfg.objective.split = "validation"
    cfg.objective.mode = "min"  # min | max
    cfg.objective.reduce = "last"  # last | best

    # grid: every combination of choice() values, once each (all parameters must be choices);
    # random: independent draws; tpe: Optuna's Tree-structured Parzen Estimator (Bayesian).
    cfg.sampler = "grid"
    cfg.trials = 0  # trial budget shared by every worker; 0 = the grid size (grid only)
    cfg.seed = 0  # sampler seed
    cfg.startup_trials = 5  # tpe: random trials before the model guides the search

    # Stopping bad trials early from their intermediate objective values (each evaluation):
    # none | median (worse than the median of earlier trials at the same step)
    # | successive_halving (asynchronous successive halving over training steps).
    cfg.pruner = "none"
    cfg.prune_startup_trials = 2  # median: finished trials before anything is pruned
    cfg.prune_warmup_steps = 0  # median: no pruning at evaluations before this step
    cfg.halving_min_steps = 0  # successive_halving: steps of the first rung; 0 = estimated
    cfg.halving_rate = 3  # successive_halving: 1 of every `rate` trials goes on to each rung

    cfg.trial_timeout_s = 0  # a trial running longer fails ("timed out"); 0 = no limit
    # GPUs of the host each trial gets (CUDA_VISIBLE_DEVICES; --parallel trials side by side
    # take disjoint ones); 0 = trials see what the sweep sees (CPU, TPU, one job at a time).
    cfg.gpus_per_trial = 0
    cfg.poll_s = 1.0  # how often a running trial's metrics.jsonl is read
    return cfg


def _param(distribution: str, **fields) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict({"distribution": distribution, **fields})


def choice(*values) -> ml_collections.ConfigDict:
    """One of `values` (str, int, float, bool); the only kind a grid takes."""
    return _param("choice", values=tuple(values))


def uniform(low: float, high: float) -> ml_collections.ConfigDict:
    return _param("uniform", low=float(low), high=float(high))


def log_uniform(low: float, high: float) -> ml_collections.ConfigDict:
    """Uniform in log space: learning rates, weight decay."""
    return _param("log_uniform", low=float(low), high=float(high))


def integer(low: int, high: int, step: int = 1, log: bool = False) -> ml_collections.ConfigDict:
    """An integer in [low, high] (both included), every `step`; `log` for sizes."""
    return _param("integer", low=int(low), high=int(high), step=int(step), log=bool(log))
