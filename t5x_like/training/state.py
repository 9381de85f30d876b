"""The train state: its shapes and shardings, and where it starts (fresh, or another run).

The train state is a plain dict {"step", "params", "opt_state"} of arrays: parameters are a
pure dict (see model.abstract_model), so checkpoints, shardings and optax all see one pytree.
Every task trains this same state; with PEFT (modeling/peft.py) "params" is the trainable part
and the frozen base is an input of every step, never state.

    state_spec(cfg, mesh)          shapes and shardings, nothing allocated
    init_state(cfg, spec)          fresh parameters and optimizer
    state_from_init(cfg, spec, …)  init_from's parameters, fresh optimizer, step 0
"""

import dataclasses
import os
from typing import Any

import jax
import jax.numpy as jnp
import optax
from absl import logging

from t5x_like.core import config as config_lib
from t5x_like.modeling import model
from t5x_like.modeling import partitioning
from t5x_like.modeling import peft
from t5x_like.training import checkpoints
from t5x_like.training import optimizer as optimizer_lib


@dataclasses.dataclass
class StateSpec:
    graphdef: Any
    tx: optax.GradientTransformation
    schedule: optax.Schedule
    abstract: dict  # ShapeDtypeStructs with .sharding: what restores target
    shardings: dict  # NamedShardings with the same structure
    adapt: peft.Peft | None = None  # PEFT: params are the trainable part of a frozen base
    base_abstract: dict | None = None  # PEFT: the frozen base (a train step input, not state)
    base_shardings: dict | None = None


def state_spec(cfg, mesh) -> StateSpec:
    """Shapes and shardings of the whole train state, computed without allocating it."""
    graphdef, abstract_params, names = model.abstract_model(cfg.model, cfg.seed)
    adapt = peft.build(cfg, abstract_params, names)
    base_abstract = base_shardings = None
    if adapt is not None:  # only the trainable part is state, differentiated and optimized
        base_shardings = partitioning.tree_shardings(mesh, adapt.base_abstract, adapt.base_names)
        base_abstract = checkpoints.abstract_with_shardings(adapt.base_abstract, base_shardings)
        abstract_params, names = adapt.abstract, adapt.names
    param_shardings = partitioning.tree_shardings(mesh, abstract_params, names)
    schedule = optimizer_lib.learning_rate(cfg.optimizer, cfg.steps)
    tx = optimizer_lib.make(cfg.optimizer, cfg.steps)
    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    replicated = partitioning.replicated(mesh)
    # Optimizer moments shard like their parameters; counters are replicated.
    opt_shardings = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_shardings,
                                          transform_non_params=lambda _: replicated)
    shardings = {"step": replicated, "params": param_shardings, "opt_state": opt_shardings}
    abstract = {"step": jax.ShapeDtypeStruct((), jnp.int32), "params": abstract_params,
                "opt_state": abstract_opt}
    return StateSpec(graphdef, tx, schedule,
                     checkpoints.abstract_with_shardings(abstract, shardings), shardings,
                     adapt, base_abstract, base_shardings)


def with_params(spec: StateSpec, params: dict) -> dict:
    """A state at step 0 around `params`, with a fresh optimizer."""
    opt_state = jax.jit(spec.tx.init, out_shardings=spec.shardings["opt_state"])(params)
    return {"step": jax.device_put(jnp.zeros((), jnp.int32), spec.shardings["step"]),
            "params": params, "opt_state": opt_state}


def init_state(cfg, spec: StateSpec) -> dict:
    return with_params(spec, model.init_params(cfg.model, cfg.seed, spec.shardings["params"]))


def check_init_model(cfg, init_dir: str) -> None:
    """init_from's model must be the one configured (config.check_same_model)."""
    where = os.path.join(init_dir, "config.json")
    config_lib.check_same_model(config_lib.load_json(where).model, cfg.model, where)


def params_from_init(cfg, spec: StateSpec, init_dir: str, init_step: int | None):
    """(init_from's parameters on the state's shardings, the step they are from); also the
    frozen reference model of DPO and RL, restored a second time."""
    check_init_model(cfg, init_dir)
    return checkpoints.restore_params(init_dir, spec.abstract["params"], init_step)


def state_from_init(cfg, spec: StateSpec, init_dir: str, init_step: int | None,
                    base=None) -> dict:
    """Parameters of another run or model directory (PEFT: fresh adapters and copies of the
    tuned parts of `base`); fresh optimizer state; step 0."""
    if base is not None:
        check_init_model(cfg, init_dir)
        params = peft.init_trainable(spec.adapt, base, cfg.seed, spec.shardings["params"])
    else:
        params, step = params_from_init(cfg, spec, init_dir, init_step)
        logging.info("Initialized parameters from %s step %d (optimizer fresh, step 0)",
                     init_dir, step)
    return with_params(spec, params)
