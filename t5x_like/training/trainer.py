"""The training job: one `train_and_evaluate(cfg, workdir)` for every task.

    python -m t5x_like.train --config=configs/pretrain_tiny.py --workdir=runs/tiny

It checks the config and the mesh before any data is read, prepares the data, sets up the
state (fresh, resumed from the workdir's newest checkpoint, or from init_from), the
checkpoints, the metrics and preemption, and runs the loop (loop.py). A task (tasks/) supplies
what differs: how examples are encoded and batched, where the state starts, its train step and
its evaluation:

    task       tasks/     record kind    step                                 validation
    pretrain   lm.py      text           next-token loss                      loss, ppl, bpb
    sft        lm.py      chat           next-token loss, assistant turns     same
    reward     pairs.py   preference     Bradley-Terry on scores              pairwise accuracy
    dpo        pairs.py   preference     DPO / IPO against the reference      same + KL
    rl         rl.py      chat           sample, reward, policy gradient      greedy reward

Every task's step is the one of steps.py (gradients over optimizer.grad_accum_steps
micro-batches, the optimizer update, the metrics) on the one state of state.py.
"""

import collections
import os
from typing import Callable, Collection

import jax
from absl import logging
from jax.experimental import multihost_utils

from data_pipelines import chat_template
from data_pipelines import tokenizer as tokenizer_lib
from t5x_like.core import config as config_lib
from t5x_like.core.errors import UserError
from t5x_like.core.metrics import MetricWriter
from t5x_like.modeling import model
from t5x_like.modeling import partitioning
from t5x_like.modeling import peft
from t5x_like.training import batches as batches_lib
from t5x_like.training import checkpoints
from t5x_like.training import loop as loop_lib
from t5x_like.training import state as state_lib
from t5x_like.training.tasks import base as task_base
from t5x_like.training.tasks import lm
from t5x_like.training.tasks import pairs
from t5x_like.training.tasks import rl as rl_task

TASKS = {"pretrain": lm.LanguageModel("text"), "sft": lm.LanguageModel("chat"),
         "reward": pairs.Pairs(), "dpo": pairs.Pairs(), "rl": rl_task.RL()}
# The record kind each task trains on (data_pipelines/records.py).
TASK_KINDS = {name: task.kind for name, task in TASKS.items()}


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


def counting(encode: Callable, counts: collections.Counter) -> Callable:
    """`encode` that also counts its calls in counts["encoded"]: what the "dropped" and
    "truncated" counts it keeps are shares of (loop.Loop.warn_lost)."""
    def counted(record):
        counts["encoded"] += 1
        return encode(record)
    return counted


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
    TASKS[cfg.task].check(early, mesh)
    with jax.set_mesh(mesh), partitioning.axis_rules(
            partitioning.rules_with_overrides(cfg.mesh.rules)):
        state_lib.state_spec(early, mesh)  # a UserError names a parameter the mesh does not divide
    if init_dir and not resuming:
        state_lib.check_init_model(early, init_dir)


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


def inherit_tokenizer(cfg, init_dir: str):
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


def train_and_evaluate(cfg, workdir: str, *, overrides: Collection[str] = (),
                       allow_changes: Collection[str] = ()) -> dict[str, float]:
    """Trains `cfg` in `workdir` (resuming from its latest checkpoint); returns final eval.

    `overrides`: the config keys the user set explicitly (train's --config.<key>=...): with
    model_from_init, one that contradicts the init_from model is an error, never replaced.
    `allow_changes`: keys a resumed run may change besides config.RESUME_FREE_KEYS.
    The result also has "preempted": True when SIGTERM stopped the run early (after saving).
    """
    init_dir, init_step = checkpoints.locate(cfg.init_from) if cfg.init_from else (None, None)
    if init_dir:
        cfg = inherit_tokenizer(cfg, init_dir)
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
    batches_lib.check_batch(cfg, mesh)
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

    task = TASKS[cfg.task]
    counts: collections.Counter = collections.Counter()  # what the encoder cut or dropped
    encode = counting(task.encoder(cfg, tokenizer, prepared.text_field, counts), counts)
    train_source = prepared.data_source(cfg.data.train_split, kind=task.kind)
    eval_source = prepared.data_source(cfg.data.eval_split, kind=task.kind)
    task.check_data(cfg, encode, {cfg.data.train_split: train_source,
                                  cfg.data.eval_split: eval_source})
    num_shards = cfg.data.num_shards or jax.process_count()
    train_batches = batches_lib.ShardedBatches(
        lambda shard: task.dataset(cfg, train_source, encode,
                                   batch_size=cfg.data.batch_size // num_shards, train=True,
                                   index=shard, count=num_shards),
        batches_lib.local_shards(num_shards))

    c = cfg.checkpoint
    rules = partitioning.rules_with_overrides(cfg.mesh.rules)
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
        spec = state_lib.state_spec(cfg, mesh)
        base = None
        if spec.adapt is not None:  # PEFT: the frozen base goes into every step as an input
            # (and is the reference of DPO and RL); recorded in base.json, checked on resume.
            state_lib.check_init_model(cfg, init_dir)
            base = peft.run_base(spec.adapt, workdir, init_dir, init_step, spec.base_shardings)
            logging.info(peft.summary(spec.adapt))
        ckpt = checkpoints.Checkpointer(
            checkpoints.checkpoint_dir(workdir), max_to_keep=c.max_to_keep,
            async_save=c.async_save, keep_best_by=c.keep_best_by, keep_best=c.keep_best,
            best_mode=c.best_mode)
        writer = MetricWriter(workdir, enabled=primary)
        preemption = loop_lib.Preemption(c.save_on_preemption)
        try:
            state = ckpt.restore_newest_valid(spec.abstract,
                                              batches=train_batches if resume_data else None)
            if state is not None:
                logging.info("Resuming from step %d", int(jax.device_get(state["step"])))
            elif init_dir:
                state = task.initial_state(cfg, spec, init_dir, init_step, base)
            else:
                state = state_lib.init_state(cfg, spec)
            # Lines logged after the restored step (or by a run killed before its first
            # checkpoint) describe work that is being redone.
            writer.truncate_after(int(jax.device_get(state["step"])))
            logging.info("Model: %s parameters", f"{model.count_params(state['params']):,}")
            train_step, evaluate = task.build(task_base.Job(
                cfg=cfg, spec=spec, mesh=mesh, tokenizer=tokenizer, state=state, base=base,
                init_dir=init_dir, init_step=init_step, encode=encode, eval_source=eval_source))
            loop = loop_lib.Loop(cfg, train_step, evaluate, ckpt, writer, preemption, counts,
                                 lambda counts: task.counted_metrics(cfg, counts))
            return loop.run(state, train_batches)
        finally:
            preemption.close()
            try:
                ckpt.close()  # waits for the last save: EnvironmentFailure if it was not written
            finally:
                writer.close()
