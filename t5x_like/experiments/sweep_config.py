"""A sweep config (every default in configs/sweeps/common.py): its checks, its keys flattened,
and the job config it overrides, loaded as the job's entry point would load it.

sweep.py runs the sweep, sweep_report.py writes its results; both read the config through here.
"""

import os
import runpy
from typing import Any

import ml_collections

from t5x_like.core import cli
from t5x_like.core.errors import UserError

SAMPLERS = ("grid", "random", "tpe")
PRUNERS = ("none", "median", "successive_halving")
DISTRIBUTIONS = ("choice", "uniform", "log_uniform", "integer")


def flatten(node, prefix: str = "") -> dict[str, Any]:
    """Nested ConfigDict -> {"optimizer.lr": leaf}; a search-space leaf is a ConfigDict holding
    "distribution"."""
    flat = {}
    for key in node.keys():
        value, name = node[key], f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict) and "distribution" not in value:
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def validate(cfg) -> None:
    """Raises UserError naming the first bad key of a sweep config."""

    def require(ok: bool, key: str, message: str) -> None:
        if not ok:
            raise UserError(f"sweep config key '{key}': {message}")

    o = cfg.objective
    require(o.mode in ("min", "max"), "objective.mode", f"is {o.mode!r}; choose min or max.")
    require(o.reduce in ("last", "best"), "objective.reduce",
            f"is {o.reduce!r}; choose last or best.")
    require(bool(o.metric) and bool(o.split), "objective", "needs a metric and a split.")
    require(cfg.sampler in SAMPLERS, "sampler",
            f"is {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}.")
    require(cfg.pruner in PRUNERS, "pruner",
            f"is {cfg.pruner!r}; choose one of {', '.join(PRUNERS)}.")
    require(cfg.trials >= 0, "trials", "must be >= 0 (0 = the grid size).")
    require(cfg.sampler == "grid" or cfg.trials > 0, "trials",
            f"is 0; sampler {cfg.sampler} needs a trial budget (e.g. --config.trials=20).")
    require(cfg.halving_rate >= 2, "halving_rate", "must be >= 2.")
    require(cfg.poll_s > 0, "poll_s", "must be positive.")
    require(cfg.gpus_per_trial >= 0, "gpus_per_trial", "must be >= 0 (0 = leave devices alone).")
    space = flatten(cfg.space)
    require(bool(space), "space", "is empty; add at least one swept key, e.g. "
            "cfg.space = ConfigDict({'optimizer': {'lr': common.choice(1e-3, 3e-3)}}).")
    for name, spec in space.items():
        key = f"space.{name}"
        require(isinstance(spec, ml_collections.ConfigDict), key,
                "must be made by common.choice/uniform/log_uniform/integer.")
        kind = spec.distribution
        require(kind in DISTRIBUTIONS, f"{key}.distribution",
                f"is {kind!r}; choose one of {', '.join(DISTRIBUTIONS)}.")
        require(cfg.sampler != "grid" or kind == "choice", key,
                f"is a {kind} range; a grid takes choice() values only (or use sampler "
                "random or tpe).")
        if kind == "choice":
            require(len(spec["values"]) > 0, key, "choice() needs at least one value.")
        else:
            require(spec.low < spec.high, key,
                    f"low ({spec.low}) must be below high ({spec.high}).")
            require(spec.low > 0 or not (kind == "log_uniform" or spec.get("log")), key,
                    f"low is {spec.low}; a log scale needs low > 0.")


def load_job_config(path: str) -> ml_collections.ConfigDict:
    """The job's config as its entry point would load it (recipes import `configs`)."""
    if not os.path.isfile(path):
        raise UserError(f"sweep config key 'config': {path} does not exist (paths are relative to "
                        "the directory the sweep runs in).")
    cli.put_config_package_on_path([f"--config={path}"])
    return runpy.run_path(path)["get_config"]()


def apply_overrides(job_cfg: ml_collections.ConfigDict, overrides: dict[str, Any], *,
                    where: str, config_path: str) -> ml_collections.ConfigDict:
    """Sets each "a.b" key, type-checked by ml_collections; an unknown key is a UserError."""
    for name, value in overrides.items():
        node, parts = job_cfg, name.split(".")
        for part in parts[:-1]:
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                raise UserError(f"sweep config key '{where}.{name}': {config_path} has no config "
                                f"key {name}.")
            node = node[part]
        if parts[-1] not in node:
            raise UserError(f"sweep config key '{where}.{name}': {config_path} has no config key "
                            f"{name}.")
        try:
            node[parts[-1]] = value
        except TypeError as e:
            raise UserError(f"sweep config key '{where}.{name}': {value!r} does not fit config "
                            f"key {name} of {config_path} ({e}).") from None
    return job_cfg


def check_against_job(cfg) -> None:
    """Every fixed and swept key exists in the job config and takes its values."""
    import importlib.util

    if importlib.util.find_spec(cfg.program) is None:
        raise UserError(f"sweep config key 'program': no module {cfg.program!r} to run.")
    job = load_job_config(cfg.config)
    apply_overrides(job, flatten(cfg.fixed), where="fixed", config_path=cfg.config)
    for name, spec in flatten(cfg.space).items():
        samples = list(spec["values"]) if spec.distribution == "choice" else [spec.low, spec.high]
        for value in samples:
            apply_overrides(job, {name: value}, where="space", config_path=cfg.config)
