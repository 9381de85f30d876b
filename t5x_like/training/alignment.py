"""Preference tuning inside the trainer: task=reward, task=dpo and task=rl.

    python -m t5x_like.train --config=configs/reward.py --workdir=runs/rm --config.init_from=runs/sft
    python -m t5x_like.train --config=configs/dpo.py    --workdir=runs/dpo --config.init_from=runs/sft
    python -m t5x_like.train --config=configs/rl.py     --workdir=runs/rl --config.init_from=runs/sft

trainer.train_and_evaluate prepares the data, the tokenizer (inherited from init_from) and the
mesh, then hands these tasks to `train_and_evaluate` here. Everything else is the trainer's:
the train state and optimizer (trainer.state_spec, so a parameter filter there applies here
too), checkpoints with exact resume, the loop with logging, evaluation, early stopping and
preemption. What differs per task:

    task     data (record kind)            step                               validation
    reward   preference pairs [B, 2, T]    Bradley-Terry on the scores        pairwise accuracy,
                                           (preference.py)                    margin, loss
    dpo      preference pairs [B, 2, T]    DPO / IPO against the reference    same + KL
    rl       chat prompts                  sample, reward, GRPO (rl.py)       greedy reward,
                                                                              accuracy

The reference model (dpo, rl) is the init_from model: restored once more onto the same mesh
with the policy's shardings, passed to every step as an argument that is never donated nor
differentiated, and never saved (a resumed run restores it from init_from again). With PEFT
(t5x_like/modeling/peft.py) the reference is the frozen base itself and the policy is base + adapters,
so the weights are held once; task=reward trains the adapters and the (new) reward head.
"""

import collections

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from data_pipelines import preference_data
from t5x_like.training import batches as batches_lib
from t5x_like.training import checkpoints
from t5x_like.core import config as config_lib
from t5x_like.modeling import decoding
from t5x_like.modeling import partitioning
from t5x_like.modeling import peft
from t5x_like.training import preference
from t5x_like.training import rl
from t5x_like.training import trainer
from t5x_like.core.errors import UserError
from t5x_like.core.metrics import MetricWriter


def reward_state_from_init(cfg, spec: trainer.StateSpec, init_dir: str, init_step) -> dict:
    """A reward model from a chat model: its parameters, plus the head at zero."""
    source = config_lib.load_json(f"{init_dir}/config.json").model
    if source.get("reward_head"):  # already a reward model: everything comes from it
        return trainer._state_from_init(cfg, spec, init_dir, init_step)
    config_lib.check_same_model(source, cfg.model, f"{init_dir}/config.json")
    body = {k: v for k, v in spec.abstract["params"].items() if k != "reward_head"}
    params, step = checkpoints.restore_params(init_dir, body, init_step)
    head = spec.abstract["params"]["reward_head"]
    params["reward_head"] = jax.jit(lambda: jnp.zeros(head.shape, head.dtype),
                                    out_shardings=head.sharding)()
    logging.info("Reward model from %s step %d, reward head at zero", init_dir, step)
    opt_state = jax.jit(spec.tx.init, out_shardings=spec.shardings["opt_state"])(params)
    return {"step": jax.device_put(jnp.zeros((), jnp.int32), spec.shardings["step"]),
            "params": params, "opt_state": opt_state}


class _Loop(trainer._Loop):
    """The trainer's loop; evaluation is the task's (`eval_step` here is params -> metrics)."""

    def evaluate(self, state, step: int, write: bool = True) -> dict[str, float]:
        result = self.eval_step(state["params"])
        if write:
            self.writer.write(step, result, split="validation")
        return result

    def log(self, step, metrics, elapsed, steps_done) -> None:
        metrics = dict(metrics)
        if self.example_counts:
            metrics.update({f"{self.cfg.task}_{k}": v for k, v in self.example_counts.items()})
        super().log(step, metrics, elapsed, steps_done)


def _pair_evaluator(cfg, eval_jit, reference, eval_source, encode, local_batch, mesh):
    T = cfg.model.max_len
    template = {k: np.zeros((local_batch, 2, T), np.float32 if k == "weights" else np.int32)
                for k in preference_data.PAIR_FEATURES}

    def evaluate(params) -> dict[str, float]:
        batches = iter(preference_data.pair_dataset(
            eval_source, encode, batch_size=local_batch, seed=cfg.seed, train=False,
            process_index=jax.process_index(), process_count=jax.process_count()))
        totals: dict[str, float] = collections.Counter()
        steps = 0
        while cfg.eval.steps == 0 or steps < cfg.eval.steps:
            local = next(batches, None)
            if trainer._all_done(local is None):
                break
            batch = trainer.global_batch(trainer._pad_rows(local, local_batch, template), mesh)
            for k, v in jax.device_get(eval_jit(params, reference, batch)).items():
                totals[k] += float(v)
            steps += 1
        if not totals.get("pairs"):
            raise UserError("the validation split gave no preference pairs to evaluate; check "
                            "data.eval_split and data.source.")
        return preference.summarize(totals)

    return evaluate


def check_config(cfg, mesh) -> None:
    """What task=reward/dpo/rl need of the config and mesh (the trainer asks before the data)."""
    if cfg.optimizer.grad_accum_steps != 1:
        raise UserError(f"config key 'optimizer.grad_accum_steps': task={cfg.task} takes whole "
                        "batches only; set it to 1 and lower data.batch_size instead.")
    if cfg.task == "rl":
        _check_rl(cfg, mesh)


def _check_rl(cfg, mesh) -> None:
    if jax.process_count() > 1:
        raise UserError("task=rl samples on one process (the decoder's host loop); run it with "
                        "one process over that host's devices.")
    rows = cfg.data.batch_size * cfg.rl.group_size
    if rows % partitioning.data_parallel_size(mesh):
        raise UserError(f"config key 'rl.group_size': data.batch_size x rl.group_size = {rows} "
                        "reply rows per step do not divide over the data-parallel size "
                        f"{partitioning.data_parallel_size(mesh)}.")
    if cfg.rl.max_new_tokens + 8 > cfg.model.max_len:
        raise UserError(f"config key 'rl.max_new_tokens': {cfg.rl.max_new_tokens} leaves no room "
                        f"for a prompt in model.max_len ({cfg.model.max_len}).")


def train_and_evaluate(cfg, workdir: str, *, prepared, tokenizer, mesh, init_dir: str,
                       init_step, resume_data: bool = True) -> dict[str, float]:
    """Runs task=reward / dpo / rl (see the module docstring); the trainer's result format.
    `resume_data` False: a resumed run starts its data order afresh (trainer's resume check)."""
    check_config(cfg, mesh)
    kind = trainer.TASK_KINDS[cfg.task]
    train_source = prepared.data_source(cfg.data.train_split, kind=kind)
    eval_source = prepared.data_source(cfg.data.eval_split, kind=kind)
    counts: collections.Counter = collections.Counter()
    num_shards = cfg.data.num_shards or jax.process_count()
    if cfg.task == "rl":
        prompt_len = cfg.model.max_len - cfg.rl.max_new_tokens - 1
        encode = preference_data.prompt_encoder(tokenizer, max_len=prompt_len, counts=counts)
        make_dataset = preference_data.prompt_dataset
    else:
        encode = preference_data.pair_encoder(tokenizer, max_len=cfg.model.max_len, counts=counts)
        make_dataset = preference_data.pair_dataset
    encode = trainer.counting(encode, counts)  # the trainer warns when many are cut or dropped
    train_batches = batches_lib.ShardedBatches(
        lambda shard: iter(make_dataset(
            train_source, encode, batch_size=cfg.data.batch_size // num_shards, seed=cfg.seed,
            train=True, process_index=shard, process_count=num_shards)),
        batches_lib.local_shards(num_shards))
    local_eval_batch = cfg.eval.batch_size // jax.process_count()
    primary = jax.process_index() == 0

    c = cfg.checkpoint
    rules = partitioning.rules_with_overrides(cfg.mesh.rules)
    with jax.set_mesh(mesh), partitioning.axis_rules(rules):
        spec = trainer.state_spec(cfg, mesh)
        ckpt = checkpoints.Checkpointer(
            checkpoints.checkpoint_dir(workdir), max_to_keep=c.max_to_keep,
            async_save=c.async_save, keep_best_by=c.keep_best_by, keep_best=c.keep_best,
            best_mode=c.best_mode)
        writer = MetricWriter(workdir, enabled=primary)
        preemption = trainer.Preemption(c.save_on_preemption)
        try:
            # PEFT: the frozen base is the reference (the policy is base + adapters), so the
            # weights are held once; it is recorded in base.json and checked on resume.
            base = None
            if spec.adapt is not None:
                trainer._check_init_model(cfg, init_dir)
                base = peft.run_base(spec.adapt, workdir, init_dir, init_step,
                                     spec.base_shardings)
                logging.info(peft.summary(spec.adapt))
            state = ckpt.restore_newest_valid(spec.abstract,
                                              batches=train_batches if resume_data else None)
            if state is not None:
                logging.info("Resuming from step %d", int(jax.device_get(state["step"])))
            elif cfg.task == "reward" and base is None:
                state = reward_state_from_init(cfg, spec, init_dir, init_step)
            else:
                state = trainer._state_from_init(cfg, spec, init_dir, init_step, base=base)
            writer.truncate_after(int(jax.device_get(state["step"])))
            # The frozen reference: the init_from model again, on the policy's shardings.
            if base is not None:
                reference = base
            else:
                reference = (None if cfg.task == "reward" else
                             trainer._state_from_init(cfg, spec, init_dir, init_step)["params"])
            if cfg.task == "rl":
                train_step, evaluate = _rl_steps(cfg, spec, mesh, tokenizer, reference, state,
                                                 eval_source)
            else:
                train_step, evaluate = _pair_steps(cfg, spec, mesh, reference, eval_source,
                                                   encode, local_eval_batch)
            loop = _Loop(cfg, train_step, evaluate, ckpt, writer, mesh, None, local_eval_batch,
                         None, preemption, counts)
            return loop.run(state, train_batches)
        finally:
            preemption.close()
            try:
                ckpt.close()  # waits for the last save: EnvironmentFailure if it was not written
            finally:
                writer.close()


def _pair_steps(cfg, spec, mesh, reference, eval_source, encode, local_eval_batch):
    if cfg.task == "reward":
        stats_fn = preference.reward_stats(spec.graphdef, spec.adapt)
    else:
        stats_fn = preference.dpo_stats(spec.graphdef, beta=cfg.dpo.beta, loss_type=cfg.dpo.loss,
                                        label_smoothing=cfg.dpo.label_smoothing,
                                        rpo_alpha=cfg.dpo.rpo_alpha, adapt=spec.adapt)
    step = preference.make_train_step(
        stats_fn, spec.tx, spec.schedule, seed=cfg.seed,
        dropout=cfg.model.dropout or (spec.adapt is not None and spec.adapt.dropout))
    batch_sharding = {k: partitioning.batch_sharding(mesh) for k in preference_data.PAIR_FEATURES}
    replicated = partitioning.replicated(mesh)
    ref_sharding = (None if reference is None else spec.base_shardings if spec.adapt is not None
                    else spec.shardings["params"])
    train_jit = jax.jit(step, in_shardings=(spec.shardings, ref_sharding, batch_sharding),
                        out_shardings=(spec.shardings, replicated), donate_argnums=0)
    eval_jit = jax.jit(preference.make_eval_step(stats_fn),
                       in_shardings=(spec.shardings["params"], ref_sharding, batch_sharding),
                       out_shardings=replicated)
    evaluate = _pair_evaluator(cfg, eval_jit, reference, eval_source, encode, local_eval_batch,
                               mesh)
    return (lambda state, batch: train_jit(state, reference, batch)), evaluate


def _rl_steps(cfg, spec, mesh, tokenizer, reference, state, eval_source):
    rows = {k: partitioning.batch_sharding(mesh) for k in (*preference_data.PAIR_FEATURES,
                                                            "advantages")}
    update = jax.jit(rl.make_update(spec.graphdef, spec.tx, spec.schedule, kl_coef=cfg.rl.kl_coef,
                                    adapt=spec.adapt),
                     in_shardings=(spec.shardings, spec.base_shardings or spec.shardings["params"],
                                   rows),
                     out_shardings=(spec.shardings, partitioning.replicated(mesh)),
                     donate_argnums=0)
    reward_fn = rl.reward_function(cfg.rl.reward, mesh=mesh)
    if spec.adapt is None:
        policy = rl._whole
    else:  # PEFT: decode with base (+ tuned parameters) and the LoRA adapters unmerged
        def policy(params):
            full, lora = peft.combine(spec.adapt, params, reference)
            return full, (lora or None)
    decoder = decoding.Decoder(spec.graphdef, state["params"], cfg.model, tokenizer,
                               max_batch=cfg.data.batch_size * cfg.rl.group_size,
                               max_len=cfg.model.max_len, mesh=mesh)
    train_step = rl.make_train_step(decoder, tokenizer,
                                    lambda s, batch: update(s, reference, batch), reward_fn,
                                    cfg.rl, seed=cfg.seed, max_len=cfg.model.max_len, mesh=mesh,
                                    policy=policy)
    prompt_len = cfg.model.max_len - cfg.rl.max_new_tokens - 1
    encode = preference_data.prompt_encoder(tokenizer, max_len=prompt_len)
    # eval.steps batches of eval.batch_size prompts at most (0 = rl.eval_prompts of them).
    limit = cfg.rl.eval_prompts if not cfg.eval.steps else min(
        cfg.rl.eval_prompts, cfg.eval.steps * cfg.eval.batch_size)
    prompts = []
    for i in range(len(eval_source)):
        if len(prompts) >= limit:
            break
        encoded = encode(eval_source[i])
        if encoded is not None:
            prompts.append(encoded["prompt"][:int(encoded["prompt_len"])].tolist())
    eval_decoder = decoding.Decoder(spec.graphdef, state["params"], cfg.model, tokenizer,
                                    max_batch=64, max_len=cfg.model.max_len, mesh=mesh)

    def evaluate(params):
        if not prompts:
            raise UserError("the validation split gave no prompts to evaluate (rl.eval_prompts "
                            "is 0 or every prompt is too long); check data.eval_split.")
        return rl.evaluate(eval_decoder, tokenizer, params, prompts, reward_fn, cfg.rl, policy)

    return train_step, evaluate
