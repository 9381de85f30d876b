"""Training: the pure train/eval steps, their sharded jit, and the loop around them.

    train_step(state, batch) -> (state, metrics)   pure; jitted once in `compile_steps` with
                                                   explicit in/out shardings, state donated
    eval_step(params, batch, token_bytes) -> sums  pure; summed over batches on the host
    train_and_evaluate(cfg, workdir)               data -> state (init or resume) -> loop

The train state is a plain dict {"step", "params", "opt_state"} of arrays: parameters are a
pure dict (see model.abstract_model), so checkpoints, shardings and optax all see one pytree.
"""

import collections
import dataclasses
import os
import signal
import sys
import time
from typing import Any, Callable, Collection, Iterator

import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm
from absl import logging
from jax.experimental import multihost_utils

# pipeline (grain) and prepare (TFDS, cleaning) are imported where the data is read: the train
# step alone (benchmarks/accelerator_check.py on the GPU image, which has neither) needs them not.
from data_pipelines import chat_data
from data_pipelines import chat_template
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.training import batches as batches_lib
from t5x_like.training import checkpoints
from t5x_like.core import config as config_lib
from t5x_like.modeling import flops
from t5x_like.training import losses
from t5x_like.modeling import model
from t5x_like.training import optimizer as optimizer_lib
from t5x_like.modeling import partitioning
from t5x_like.modeling import peft
from t5x_like.core.errors import UserError
from t5x_like.core import metrics as metrics_lib
from t5x_like.core.metrics import MetricWriter


# ---------------------------------------------------------------------------------------------
# Pure steps.


def make_loss(graphdef, adapt: peft.Peft | None = None, *, z_loss: float = 0.0,
              loss_chunk: int = 0) -> Callable:
    """loss(params, base, batch, rng=None, token_bytes=None) -> (nll_sum + z_loss * z_sum,
    losses.token_stats sums): the language-model loss of pretraining, SFT and evaluation.

    With `loss_chunk` (model.loss_chunk) the output layer and the loss run that many positions
    at a time (losses.chunked_loss): same values and gradients, without the [B, T, V] logits.
    """
    forward = peft.forward(graphdef, adapt, hidden=bool(loss_chunk))

    def loss(params, base, batch, rng=None, token_bytes=None):
        out = forward(params, base, batch["inputs"], positions=batch["positions"],
                      segment_ids=batch["segment_ids"], dropout_rng=rng)
        if loss_chunk:
            h, head, logits_fn = out
            return losses.chunked_loss(logits_fn, head, h, batch["targets"], batch["weights"],
                                       chunk=loss_chunk, z_loss=z_loss, token_bytes=token_bytes)
        stats = losses.token_stats(out, batch["targets"], batch["weights"], token_bytes)
        return stats["nll_sum"] + z_loss * stats["z_sum"], stats
    return loss


def make_train_step(graphdef, tx, schedule, *, seed: int, z_loss: float, accum_steps: int,
                    dropout: float, adapt: peft.Peft | None = None,
                    loss_chunk: int = 0) -> Callable:
    """Returns train_step(state, batch, base=None) -> (state, metrics); the loss is the weighted
    mean NLL over all targets of the global batch (plus z-loss), micro-batches summed before
    dividing. With PEFT (`adapt`), state["params"] is the trainable part and `base` the frozen
    base model (peft.py)."""
    loss = make_loss(graphdef, adapt, z_loss=z_loss, loss_chunk=loss_chunk)

    def loss_fn(params, batch, rng, base):
        return loss(params, base, batch, rng)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, batch, base=None):
        params = state["params"]
        rng = jax.random.fold_in(jax.random.key(seed), state["step"]) if dropout else None
        if accum_steps == 1:
            (_, stats), grads = grad_fn(params, batch, rng, base)
        else:
            # [B, ...] -> [A, B/A, ...] taking every A-th row, so each device keeps its own rows.
            micro = jax.tree.map(
                lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:])
                .swapaxes(0, 1), batch)

            def body(carry, xs):
                mb, i = xs
                mb_rng = None if rng is None else jax.random.fold_in(rng, i)
                (_, s), g = grad_fn(params, mb, mb_rng, base)
                return jax.tree.map(jnp.add, carry, (g, s)), None

            first = jax.tree.map(lambda x: x[0], micro)
            shapes = jax.eval_shape(grad_fn, params, first, rng, base)
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
            (grads, stats), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
        denom = jnp.maximum(stats["weight_sum"], 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        metrics = {"loss": stats["nll_sum"] / denom, "accuracy": stats["correct_sum"] / denom,
                   "grad_norm": optax.global_norm(grads),
                   "learning_rate": schedule(state["step"]), "loss_tokens": stats["weight_sum"],
                   "nonfinite_steps": optimizer_lib.nonfinite_steps(opt_state)}
        if z_loss:
            metrics["z_loss"] = stats["z_sum"] / denom
        return new_state, metrics

    return train_step


def make_eval_step(graphdef, adapt: peft.Peft | None = None, loss_chunk: int = 0) -> Callable:
    loss = make_loss(graphdef, adapt, loss_chunk=loss_chunk)

    def eval_step(params, batch, token_bytes, base=None):
        return loss(params, base, batch, token_bytes=token_bytes)[1]
    return eval_step


# ---------------------------------------------------------------------------------------------
# State: shapes, shardings, creation.


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


def init_state(cfg, spec: StateSpec) -> dict:
    params = model.init_params(cfg.model, cfg.seed, spec.shardings["params"])
    opt_state = jax.jit(spec.tx.init, out_shardings=spec.shardings["opt_state"])(params)
    step = jax.device_put(jnp.zeros((), jnp.int32), spec.shardings["step"])
    return {"step": step, "params": params, "opt_state": opt_state}


def compile_steps(cfg, spec: StateSpec, mesh):
    """The jitted train and eval steps with explicit shardings (pjit style); state donated."""
    batch_sharding = partitioning.batch_sharding(mesh)  # every feature of the batch dict
    replicated = partitioning.replicated(mesh)
    train_step = make_train_step(spec.graphdef, spec.tx, spec.schedule, seed=cfg.seed,
                                 z_loss=cfg.optimizer.z_loss,
                                 accum_steps=cfg.optimizer.grad_accum_steps,
                                 dropout=cfg.model.dropout or (spec.adapt and spec.adapt.dropout),
                                 adapt=spec.adapt, loss_chunk=cfg.model.loss_chunk)
    base = () if spec.adapt is None else (spec.base_shardings,)  # PEFT: base is an input
    train_jit = jax.jit(train_step, in_shardings=(spec.shardings, batch_sharding, *base),
                        out_shardings=(spec.shardings, replicated), donate_argnums=0)
    eval_jit = jax.jit(make_eval_step(spec.graphdef, spec.adapt, cfg.model.loss_chunk),
                       in_shardings=(spec.shardings["params"], batch_sharding, replicated, *base),
                       out_shardings=replicated)
    return train_jit, eval_jit


# ---------------------------------------------------------------------------------------------
# Data.


def prepare_data(cfg, workdir: str):
    """Prepares the data source on process 0 while the others wait, then all open it
    (a prepare.Prepared)."""
    from data_pipelines import prepare

    cache_dir = cfg.data.cache_dir or os.path.join(workdir, "data")
    if jax.process_index() == 0:
        os.makedirs(cache_dir, exist_ok=True)
        prepared = prepare.prepare(cfg.data, cache_dir)
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices("t5x_like: data prepared")
        if jax.process_index() != 0:
            prepared = prepare.prepare(cfg.data, cache_dir)
    return prepared


# warn_lost: more than this share of the encoded examples dropped or truncated is a warning,
# once at least LOST_WARN_MIN examples were encoded (a rate over a handful means little).
LOST_WARN_FRACTION = 0.05
LOST_WARN_MIN = 100

# The record kind each task trains on (data_pipelines/records.py).
TASK_KINDS = {"pretrain": "text", "sft": "chat", "reward": "preference", "dpo": "preference",
              "rl": "chat"}


def example_encoder(cfg, tokenizer, text_field: str, counts: collections.Counter) -> Callable:
    """record -> {"tokens", "weights"} for the task: plain text, or a chat rendered by the one
    chat template with its loss mask (data_pipelines/chat_data.py)."""
    if cfg.task == "sft":
        return counting(chat_data.encoder(tokenizer, loss_on=cfg.data.loss_on,
                                          max_len=cfg.model.max_len, on_long=cfg.data.on_long,
                                          counts=counts), counts)
    from data_pipelines import pipeline

    return pipeline.text_encoder(tokenizer, text_field)


def counting(encode: Callable, counts: collections.Counter) -> Callable:
    """`encode` that also counts its calls in counts["encoded"]: what the "dropped" and
    "truncated" counts it keeps are shares of (_Loop.warn_lost)."""
    def counted(record):
        counts["encoded"] += 1
        return encode(record)
    return counted


def check_learnable(source, encode, split: str, probe: int = 100) -> None:
    """Refuses a split whose first records give nothing to learn from (an all-zero loss mask
    would otherwise train on nothing, or loop forever looking for a non-empty example)."""
    n = min(len(source), probe)
    if not any(encode(source[i])["weights"].any() for i in range(n)):
        raise UserError(f"none of the first {n} records of the {split} split has a token to "
                        "learn from (an empty loss mask): SFT learns only assistant turns "
                        "(data.loss_on); check that the conversations have them, or that "
                        "data.on_long does not drop them all.")


def check_batch(cfg, mesh) -> None:
    dp = partitioning.data_parallel_size(mesh)
    for key, size in (("data.batch_size", cfg.data.batch_size),
                      ("eval.batch_size", cfg.eval.batch_size)):
        if size % dp or size % jax.process_count():
            raise UserError(f"config key '{key}': {size} is not divisible by the data-parallel "
                            f"size {dp} (mesh.data x mesh.fsdp) and the {jax.process_count()} "
                            "processes; pick a multiple of both.")
    micro = cfg.data.batch_size // cfg.optimizer.grad_accum_steps
    if micro % dp:
        raise UserError(f"config key 'optimizer.grad_accum_steps': micro-batches of {micro} "
                        f"sequences do not divide over the data-parallel size {dp}.")


def global_batch(local: dict, mesh) -> dict:
    """Host-local numpy batch (this process's rows) -> global jax.Arrays sharded on the mesh."""
    sharding = partitioning.batch_sharding(mesh)
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in local.items()}


def _pad_rows(local: dict | None, rows: int, template: dict) -> dict:
    """Pads a short evaluation batch (or stands in for a finished one) with weight-0 rows."""
    if local is None:
        return {k: np.zeros_like(v) for k, v in template.items()}
    n = len(local["inputs"])
    return {k: np.pad(v, [(0, rows - n)] + [(0, 0)] * (v.ndim - 1)) for k, v in local.items()}


def _all_done(done: bool) -> bool:
    if jax.process_count() == 1:
        return done
    return bool(np.all(multihost_utils.process_allgather(np.array(done))))


def evaluate(eval_step, params, batches: Iterator[dict], *, max_steps: int, local_batch: int,
             max_len: int, mesh, token_bytes) -> dict[str, float]:
    """Sums the eval statistics over the split (or max_steps batches) -> loss, ppl, bpb, acc."""
    from data_pipelines import pipeline

    template = {k: np.zeros((local_batch, max_len), np.float32 if k == "weights" else np.int32)
                for k in pipeline.FEATURES}
    totals: dict[str, float] = {}
    steps = 0
    while max_steps == 0 or steps < max_steps:
        local = next(batches, None)
        if _all_done(local is None):
            break
        stats = eval_step(params, global_batch(_pad_rows(local, local_batch, template), mesh),
                          token_bytes)
        for k, v in jax.device_get(stats).items():
            totals[k] = totals.get(k, 0.0) + float(v)
        steps += 1
    if not totals.get("weight_sum"):
        raise UserError("the validation split gave no tokens to evaluate; check data.eval_split.")
    return losses.summarize(totals)


# ---------------------------------------------------------------------------------------------
# The run.


def has_checkpoint(workdir: str) -> bool:
    """Whether `workdir` holds a checkpoint step (a run to resume, not just a failed start)."""
    directory = checkpoints.checkpoint_dir(workdir)
    return os.path.isdir(directory) and any(n.isdigit() for n in os.listdir(directory))


def _vocab_before_data(cfg, mesh) -> int:
    """The tokenizer's vocabulary size as far as it is known before the data is prepared: the
    given tokenizer's (init_from always gives one), else a stand-in that every mesh axis
    divides, so the vocabulary's shardings are checked only once the real size is known."""
    if cfg.data.tokenizer:
        return tokenizer_lib.Tokenizer(cfg.data.tokenizer).vocab_size
    bounds = [b for b in (cfg.model.vocab_size, cfg.model.unpadded_vocab_size) if b]
    if bounds:  # set by the user: resolve() keeps it, so any size up to it will do
        return min(bounds)
    multiple = cfg.model.vocab_multiple * mesh.size
    return -(-cfg.data.vocab_size // multiple) * multiple


def _check_before_data(cfg, mesh, init_dir: str | None, resuming: bool) -> None:
    """The model against the mesh (each parameter's sharding), the task's own limits and the
    init_from model, before the data is prepared."""
    early = config_lib.resolve(cfg, _vocab_before_data(cfg, mesh))
    if cfg.task in ("reward", "dpo", "rl"):
        from t5x_like.training import alignment

        alignment.check_config(early, mesh)
    with jax.set_mesh(mesh), partitioning.axis_rules(
            partitioning.rules_with_overrides(cfg.mesh.rules)):
        state_spec(early, mesh)  # a UserError names a parameter the mesh does not divide
    if init_dir and not resuming:
        _check_init_model(early, init_dir)


def _install_tokenizer(src: str, workdir: str, resuming: bool = True) -> str:
    """Copies the tokenizer into the workdir, where sample/evaluate/serve and init_from find it.
    A different one there refuses a resumed run; one left by a start that never reached its
    first checkpoint is replaced."""
    dst = tokenizer_lib.find(workdir, required=False)  # tokenizer.model or tokenizer.json
    if dst and not tokenizer_lib.same(src, dst):
        if resuming:
            raise UserError(f"{dst} differs from the data's tokenizer {src}: the data changed "
                            "since this run started; use a new --workdir.")
        if jax.process_index() == 0:
            tokenizer_lib.remove(dst)  # ours, from a start that failed before its first checkpoint
        dst = None
    if jax.process_index() == 0 and not dst:
        dst = tokenizer_lib.install(src, workdir)  # with its config files (special ids, template)
    return dst or tokenizer_lib.find(workdir, required=False) or src


def _inherit_tokenizer(cfg, init_dir: str):
    """A run started from another one uses its vocabulary: the tokenizer travels with it."""
    src = tokenizer_lib.find(init_dir, required=False)
    if src is None:
        raise UserError(f"config key 'init_from': {init_dir} has no tokenizer.model or "
                        "tokenizer.json.")
    if cfg.data.tokenizer and not tokenizer_lib.same(cfg.data.tokenizer, src):
        raise UserError(f"config key 'data.tokenizer': {cfg.data.tokenizer} is not the tokenizer "
                        f"of init_from ({src}); leave data.tokenizer empty to inherit it.")
    cfg = cfg.copy_and_resolve_references()
    cfg.data.tokenizer = src
    logging.info("init_from %s: inheriting its tokenizer", init_dir)
    return cfg


def _inherit_model(cfg, init_dir: str, overrides: Collection[str] = ()):
    """model_from_init: the parameter-defining model keys come from the init_from source; one
    the user set explicitly (`overrides`) to another value is an error naming both."""
    where = os.path.join(init_dir, "config.json")
    source = config_lib.to_dict(config_lib.load_json(where).model)
    cfg = cfg.copy_and_resolve_references()
    for key, value in sorted(source.items()):
        if key in config_lib.FREE_MODEL_KEYS or key not in cfg.model:
            continue
        if cfg.model[key] != value and ("model" in overrides or f"model.{key}" in overrides):
            raise UserError(
                f"config key 'model.{key}': {cfg.model[key]!r} was set explicitly, but "
                f"model_from_init takes the model from init_from, and {where} has {value!r}; "
                f"drop the override to fine-tune that model as it is, or start from a run "
                f"(init_from) whose model.{key} is {cfg.model[key]!r}.")
        if cfg.model[key] != value:
            logging.info("model.%s = %r inherited from %s (the recipe had %r)", key, value,
                         init_dir, cfg.model[key])
        cfg.model[key] = value
    return cfg


def _check_init_model(cfg, init_dir: str) -> None:
    where = os.path.join(init_dir, "config.json")
    config_lib.check_same_model(config_lib.load_json(where).model, cfg.model, where)


def _state_from_init(cfg, spec: StateSpec, init_dir: str, init_step: int | None,
                     base=None) -> dict:
    """Parameters of another run or model directory (PEFT: fresh adapters and copies of the
    tuned parts of `base`); fresh optimizer state; step 0."""
    _check_init_model(cfg, init_dir)
    if base is not None:
        params = peft.init_trainable(spec.adapt, base, cfg.seed, spec.shardings["params"])
    else:
        params, step = checkpoints.restore_params(init_dir, spec.abstract["params"], init_step)
        logging.info("Initialized parameters from %s step %d (optimizer fresh, step 0)",
                     init_dir, step)
    opt_state = jax.jit(spec.tx.init, out_shardings=spec.shardings["opt_state"])(params)
    return {"step": jax.device_put(jnp.zeros((), jnp.int32), spec.shardings["step"]),
            "params": params, "opt_state": opt_state}


class Preemption:
    """Notices SIGTERM. One process: a signal handler sets a flag. Several: JAX's preemption
    service agrees on one step at which every process saves (call `reached` every step)."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.flag = False
        if enabled and jax.process_count() == 1:
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        del signum, frame
        self.flag = True

    def reached(self, step: int) -> bool:
        if not self.enabled:
            return False
        if jax.process_count() > 1:
            return multihost_utils.reached_preemption_sync_point(step)
        return self.flag

    def close(self) -> None:
        if self.enabled and jax.process_count() == 1:
            signal.signal(signal.SIGTERM, self._previous)


def train_and_evaluate(cfg, workdir: str, *, overrides: Collection[str] = (),
                       allow_changes: Collection[str] = ()) -> dict[str, float]:
    """Trains `cfg` in `workdir` (resuming from its latest checkpoint); returns final eval.

    `overrides`: the config keys the user set explicitly (train's --config.<key>=...): with
    model_from_init, one that contradicts the init_from model is an error, never replaced.
    `allow_changes`: keys a resumed run may change besides config.RESUME_FREE_KEYS.
    The result also has "preempted": True when SIGTERM stopped the run early (after saving).
    """
    from data_pipelines import pipeline

    init_dir, init_step = checkpoints.locate(cfg.init_from) if cfg.init_from else (None, None)
    if init_dir:
        cfg = _inherit_tokenizer(cfg, init_dir)
        if cfg.model_from_init:
            cfg = _inherit_model(cfg, init_dir, overrides)
    config_lib.validate(cfg)
    workdir = os.path.abspath(workdir)
    peft.check_run(cfg, workdir, init_dir)
    primary = jax.process_index() == 0
    checkpoints.check_writable(workdir)  # one error line, before any data or compile

    # Every check that needs no data runs before the data is prepared (minutes on a corpus) and
    # before anything is written: a failed start leaves nothing that refuses the corrected one.
    # A saved config.json binds only a workdir with a checkpoint (the run that is resumed).
    config_path = os.path.join(workdir, "config.json")
    resuming = has_checkpoint(workdir)
    # The checkpoint's data position, unless an allowed change (batch size, data...) voids it.
    resume_data = True
    if resuming and os.path.isfile(config_path):
        allowed = config_lib.check_resume(config_lib.load_json(config_path), cfg, allow_changes)
        if allowed:
            resume_data = not config_lib.changes_data_order(allowed)
            logging.warning("Resuming with %s changed (--allow_config_change)%s.",
                            ", ".join(allowed), "" if resume_data else
                            "; the data order starts afresh: the checkpoint's position in the "
                            "data belongs to the old settings")
    mesh = partitioning.make_mesh(cfg.mesh)
    check_batch(cfg, mesh)
    _check_before_data(cfg, mesh, init_dir, resuming)
    logging.info("Mesh %s over %d devices (%s), %d processes", dict(mesh.shape),
                 jax.device_count(), jax.devices()[0].device_kind, jax.process_count())

    prepared = prepare_data(cfg, workdir)
    tokenizer = tokenizer_lib.Tokenizer(prepared.tokenizer_path)
    chat_template.setup(cfg, tokenizer)  # data.chat_template: the project's or the model's
    cfg = config_lib.resolve(cfg, tokenizer.vocab_size)
    if resuming and os.path.isfile(config_path):  # the vocabulary, now known
        config_lib.check_same_model(config_lib.load_json(config_path).model, cfg.model,
                                    "this workdir's checkpoints")
    _install_tokenizer(prepared.tokenizer_path, workdir, resuming)
    if primary:
        chat_template.install(tokenizer, workdir)  # a model template, kept in the run
    if primary:
        config_lib.save_json(cfg, config_path)

    if cfg.task in ("reward", "dpo", "rl"):  # preference tuning: the same state, loop, checkpoints
        from t5x_like.training import alignment

        return alignment.train_and_evaluate(cfg, workdir, prepared=prepared, tokenizer=tokenizer,
                                            mesh=mesh, init_dir=init_dir, init_step=init_step,
                                            resume_data=resume_data)
    local_eval_batch = cfg.eval.batch_size // jax.process_count()
    example_counts: collections.Counter = collections.Counter()
    encode = example_encoder(cfg, tokenizer, prepared.text_field, example_counts)
    data_kwargs = dict(max_len=cfg.model.max_len, seed=cfg.seed, packing=cfg.data.packing)
    train_source = prepared.data_source(cfg.data.train_split, kind=TASK_KINDS[cfg.task])
    num_shards = cfg.data.num_shards or jax.process_count()
    train_batches = batches_lib.ShardedBatches(
        lambda shard: iter(pipeline.make_dataset(
            train_source, encode, batch_size=cfg.data.batch_size // num_shards, train=True,
            process_index=shard, process_count=num_shards, worker_count=cfg.data.worker_count,
            **data_kwargs)),
        batches_lib.local_shards(num_shards))
    eval_source = prepared.data_source(cfg.data.eval_split, kind=TASK_KINDS[cfg.task])
    check_learnable(train_source, encode, cfg.data.train_split)
    check_learnable(eval_source, encode, cfg.data.eval_split)

    def eval_batches():  # evaluation sums over records, so any split over processes will do
        return iter(pipeline.make_dataset(
            eval_source, encode, batch_size=local_eval_batch, train=False,
            process_index=jax.process_index(), process_count=jax.process_count(), **data_kwargs))

    c = cfg.checkpoint
    rules = partitioning.rules_with_overrides(cfg.mesh.rules)
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
        spec = state_spec(cfg, mesh)
        train_step, eval_step = compile_steps(cfg, spec, mesh)
        base = None
        if spec.adapt is not None:  # the frozen base goes into every step as an input
            _check_init_model(cfg, init_dir)
            base = peft.run_base(spec.adapt, workdir, init_dir, init_step, spec.base_shardings)
            train_step, eval_step = peft.with_base(train_step, eval_step, base)
            logging.info(peft.summary(spec.adapt))
        ckpt = checkpoints.Checkpointer(
            checkpoints.checkpoint_dir(workdir), max_to_keep=c.max_to_keep,
            async_save=c.async_save, keep_best_by=c.keep_best_by, keep_best=c.keep_best,
            best_mode=c.best_mode)
        writer = MetricWriter(workdir, enabled=primary)
        preemption = Preemption(c.save_on_preemption)
        try:
            state = ckpt.restore_newest_valid(spec.abstract,
                                              batches=train_batches if resume_data else None)
            if state is not None:
                logging.info("Resuming from step %d", int(jax.device_get(state["step"])))
            elif init_dir:
                state = _state_from_init(cfg, spec, init_dir, init_step, base)
            else:
                state = init_state(cfg, spec)
            # Lines logged after the restored step (or by a run killed before its first
            # checkpoint) describe work that is being redone.
            writer.truncate_after(int(jax.device_get(state["step"])))
            logging.info("Model: %s parameters", f"{model.count_params(state['params']):,}")
            token_bytes = jax.device_put(jnp.asarray(tokenizer.token_bytes()),
                                         partitioning.replicated(mesh))
            loop = _Loop(cfg, train_step, eval_step, ckpt, writer, mesh, token_bytes,
                         local_eval_batch, eval_batches, preemption, example_counts)
            return loop.run(state, train_batches)
        finally:
            preemption.close()
            try:
                ckpt.close()  # waits for the last save: EnvironmentFailure if it was not written
            finally:
                writer.close()


class _Loop:
    """The training loop and what happens at its intervals: log, evaluate, save, stop."""

    def __init__(self, cfg, train_step, eval_step, ckpt, writer, mesh, token_bytes,
                 local_eval_batch, eval_batches, preemption, example_counts):
        self.example_counts = example_counts  # SFT: conversations truncated / dropped so far
        self.warned: set[str] = set()  # warn_lost: the kinds already warned about
        self.cfg, self.train_step, self.eval_step = cfg, train_step, eval_step
        self.ckpt, self.writer, self.mesh = ckpt, writer, mesh
        self.token_bytes, self.local_eval_batch = token_bytes, local_eval_batch
        self.eval_batches, self.preemption = eval_batches, preemption
        self.tokens_per_step = cfg.data.batch_size * cfg.model.max_len
        self.flops_per_token = flops.train_flops_per_token(cfg.model, cfg.model.max_len)
        self.peak = flops.peak_tflops(jax.devices()[0].device_kind, cfg.peak_tflops_per_device)

    def _early_stopping_state(self, start: int):
        """(best, best step, evaluations without improvement), replayed from metrics.jsonl so a
        resumed run keeps counting where it stopped."""
        e = self.cfg.eval
        if not e.early_stop_by or not start:
            return None, 0, 0
        lines = [r for r in metrics_lib.read_metrics(os.path.dirname(self.writer.path))
                 if r.get("split") == "early_stopping" and r["step"] <= start]
        state = np.array([np.nan, 0, 0], np.float64)
        if lines:
            last = lines[-1]
            state[:] = (last[f"best_{e.early_stop_by}"], last["best_step"],
                        last["evals_without_improvement"])
        if jax.process_count() > 1:  # process 0 has the metrics file; all must agree
            state = multihost_utils.broadcast_one_to_all(state)
        best = None if np.isnan(state[0]) else float(state[0])
        return best, int(state[1]), int(state[2])

    def evaluate(self, state, step: int, write: bool = True) -> dict[str, float]:
        result = evaluate(self.eval_step, state["params"], self.eval_batches(),
                          max_steps=self.cfg.eval.steps, local_batch=self.local_eval_batch,
                          max_len=self.cfg.model.max_len, mesh=self.mesh,
                          token_bytes=self.token_bytes)
        if write:
            self.writer.write(step, result, split="validation")
        return result

    def log(self, step: int, metrics, elapsed: float, steps_done: int) -> None:
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if steps_done:
            tokens_per_sec = self.tokens_per_step * steps_done / elapsed
            metrics["tokens_per_sec"] = tokens_per_sec
            metrics["tflops_per_sec_per_device"] = (
                self.flops_per_token * tokens_per_sec / jax.device_count() / 1e12)
            if self.peak:
                metrics["mfu"] = metrics["tflops_per_sec_per_device"] / self.peak
        if self.cfg.task == "sft":
            metrics["sft_truncated"] = self.example_counts["truncated"]
            metrics["sft_dropped"] = self.example_counts["dropped"]
        self.writer.write(step, metrics)
        self.warn_lost(step)

    def warn_lost(self, step: int) -> None:
        """A WARNING, once per kind, when more than LOST_WARN_FRACTION of the examples encoded
        so far were dropped or truncated for length: the run is not training on its data."""
        counts = self.example_counts
        total = counts["encoded"]
        if total < LOST_WARN_MIN:
            return
        for kind in ("dropped", "truncated"):
            if kind in self.warned or counts[kind] <= LOST_WARN_FRACTION * total:
                continue
            self.warned.add(kind)
            limit = self.cfg.model.max_len
            if self.cfg.task == "rl":
                limit -= self.cfg.rl.max_new_tokens + 1
            logging.warning(
                "Step %d: %s of the %s examples encoded so far (%.0f%%) were %s because they are "
                "longer than the %d tokens they may take (model.max_len%s); raise "
                "--config.model.max_len%s, or use data with shorter examples.", step,
                f"{counts[kind]:,}", f"{total:,}", 100 * counts[kind] / total, kind, limit,
                " - rl.max_new_tokens - 1" if self.cfg.task == "rl" else "",
                " (data.on_long=split keeps long conversations whole, in pieces)"
                if self.cfg.task == "sft" and self.cfg.data.on_long != "split" else "")

    def check_finite(self, step: int, metrics, skipped_before: int) -> int:
        """Stops the run (optimizer.on_nonfinite=stop) when a step's gradients were not finite,
        and always when a step had no tokens to learn from (an empty loss mask is a data
        problem, never a silent zero loss).

        Reads the previous step's values, so the device is never left idle waiting."""
        skipped, tokens = jax.device_get((metrics["nonfinite_steps"], metrics["loss_tokens"]))
        skipped = int(skipped)
        if float(tokens) == 0:  # (NaN weights are the non-finite case below, not this one)
            raise UserError(
                f"step {step}: the batch has no tokens to learn from (every loss weight is 0); "
                "check the data and data.loss_on (SFT learns only assistant turns).")
        if skipped > skipped_before:
            logging.warning("Step %d: non-finite loss or gradients; the update was skipped "
                            "(%d so far).", step, skipped)
            if self.cfg.optimizer.on_nonfinite == "stop":
                raise UserError(
                    f"step {step}: the loss or gradients became NaN/Inf; the update was not "
                    f"applied and training stopped. Lower optimizer.lr, check the data, or set "
                    f"optimizer.on_nonfinite=skip. The last checkpoint is step "
                    f"{self.ckpt.latest_step()}.")
        return skipped

    def early_stop(self, step: int, result: dict) -> bool:
        """True when eval.early_stop_by has not improved for eval.patience evaluations."""
        e = self.cfg.eval
        if not e.early_stop_by:
            return False
        value = result[e.early_stop_by]
        sign = 1.0 if e.early_stop_mode == "min" else -1.0
        if self.best is None or sign * (self.best - value) > e.min_delta:
            self.best, self.best_step, self.stale = value, step, 0
        else:
            self.stale += 1
        self.writer.write(step, {f"best_{e.early_stop_by}": self.best, "best_step": self.best_step,
                                 "evals_without_improvement": self.stale}, split="early_stopping")
        return self.stale >= e.patience

    def run(self, state, train_batches) -> dict[str, float]:
        cfg = self.cfg
        start, steps = int(jax.device_get(state["step"])), cfg.steps
        final: dict[str, float] = {}
        self.best, self.best_step, self.stale = self._early_stopping_state(start)
        if self.stale >= cfg.eval.patience:
            logging.info("This run already stopped early at step %d; evaluating it.", start)
            return {**self.evaluate(state, start, write=False), "early_stopped": True,
                    "step": start}
        bar = tqdm.tqdm(total=steps, initial=start, desc="train", dynamic_ncols=True,
                        disable=jax.process_index() != 0 or not sys.stderr.isatty())
        last_time, last_step = time.perf_counter(), start
        previous, skipped = None, 0
        for step in range(start + 1, steps + 1):
            batch = global_batch(next(train_batches), self.mesh)
            state, metrics = self.train_step(state, batch)
            bar.update(1)
            if previous is not None:
                skipped = self.check_finite(step - 1, previous, skipped)
            previous = metrics
            if step == start + 1:  # keep compilation out of tokens/s
                jax.block_until_ready(metrics)
                last_time, last_step = time.perf_counter(), step
            if step % cfg.log_every_steps == 0 or step == steps:
                now = time.perf_counter()
                self.log(step, metrics, now - last_time, step - last_step)
                last_time, last_step = now, step
                bar.set_postfix(loss=f"{float(metrics['loss']):.3f}")
            evaluated, stop_early = None, False
            if (cfg.eval.every_steps and step % cfg.eval.every_steps == 0) or step == steps:
                evaluated = final = self.evaluate(state, step)
                stop_early = self.early_stop(step, evaluated)
                last_time = time.perf_counter()  # keep eval time out of tokens/s
            preempted = self.preemption.reached(step)
            if (step % cfg.checkpoint.every_steps == 0 or step == steps or preempted
                    or stop_early):
                skipped = self.check_finite(step, metrics, skipped)
                self.ckpt.save(step, state, train_batches, metrics=evaluated)
            if preempted:
                self.ckpt.wait()
                logging.warning("Preempted (SIGTERM) at step %d: checkpoint saved; rerun the same "
                                "command to resume.", step)
                bar.close()
                return {**final, "preempted": True, "step": step}
            if stop_early:
                logging.warning("Early stopping at step %d: validation %s has not improved for %d "
                                "evaluations (best %.4g at step %d).", step, cfg.eval.early_stop_by,
                                cfg.eval.patience, self.best, self.best_step)
                bar.close()
                return {**final, "early_stopped": True, "step": step}
        bar.close()
        if start >= steps:
            logging.info("Already trained for %d steps; evaluating the final checkpoint.", steps)
            final = self.evaluate(state, start, write=False)
        return final
