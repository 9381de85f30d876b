"""The pairwise tasks: task=reward (a Bradley-Terry reward model) and task=dpo (DPO / IPO).

    python -m t5x_like.train --config=configs/reward.py --workdir=runs/rm --config.init_from=runs/sft
    python -m t5x_like.train --config=configs/dpo.py    --workdir=runs/dpo --config.init_from=runs/sft

Data: preference pairs [B, 2, T] (data_pipelines/preference_data.py); the losses and the pure
steps are preference.py's. Validation: pairwise accuracy, margin, loss (and DPO's KL) over the
split. DPO's reference is the init_from model, restored once more onto the policy's shardings
and passed to every step as an input that is never donated nor differentiated, and never saved
(a resumed run restores it from init_from again). With PEFT (modeling/peft.py) the reference is
the frozen base itself and the policy is base + adapters, so the weights are held once;
task=reward trains the adapters and the (new) reward head.
"""

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from data_pipelines import preference_data
from t5x_like.core import config as config_lib
from t5x_like.core.errors import UserError
from t5x_like.modeling import partitioning
from t5x_like.training import batches as batches_lib
from t5x_like.training import checkpoints
from t5x_like.training import preference
from t5x_like.training import state as state_lib
from t5x_like.training import steps
from t5x_like.training.tasks import base as task_base


def reward_state_from_init(cfg, spec: state_lib.StateSpec, init_dir: str, init_step) -> dict:
    """A reward model from a chat model: its parameters, plus the head at zero."""
    source = config_lib.load_json(f"{init_dir}/config.json").model
    if source.get("reward_head"):  # already a reward model: everything comes from it
        return state_lib.state_from_init(cfg, spec, init_dir, init_step)
    config_lib.check_same_model(source, cfg.model, f"{init_dir}/config.json")
    body = {k: v for k, v in spec.abstract["params"].items() if k != "reward_head"}
    params, step = checkpoints.restore_params(init_dir, body, init_step)
    head = spec.abstract["params"]["reward_head"]
    params["reward_head"] = jax.jit(lambda: jnp.zeros(head.shape, head.dtype),
                                    out_shardings=head.sharding)()
    logging.info("Reward model from %s step %d, reward head at zero", init_dir, step)
    return state_lib.with_params(spec, params)


def stats_function(cfg, spec):
    """The task's per-pair sums (preference.reward_stats or dpo_stats) for this config."""
    if cfg.task == "reward":
        return preference.reward_stats(spec.graphdef, spec.adapt)
    return preference.dpo_stats(spec.graphdef, beta=cfg.dpo.beta, loss_type=cfg.dpo.loss,
                                label_smoothing=cfg.dpo.label_smoothing,
                                rpo_alpha=cfg.dpo.rpo_alpha, adapt=spec.adapt,
                                loss_chunk=cfg.model.loss_chunk)


class Pairs(task_base.Task):
    """task=reward and task=dpo."""

    kind = "preference"

    def encoder(self, cfg, tokenizer, text_field, counts):
        return preference_data.pair_encoder(tokenizer, max_len=cfg.model.max_len, counts=counts)

    def dataset(self, cfg, source, encode, *, batch_size, train, index, count):
        return iter(preference_data.pair_dataset(
            source, encode, batch_size=batch_size, seed=cfg.seed, train=train,
            process_index=index, process_count=count))

    def initial_state(self, cfg, spec, init_dir, init_step, base):
        if cfg.task == "reward" and base is None:
            return reward_state_from_init(cfg, spec, init_dir, init_step)
        return super().initial_state(cfg, spec, init_dir, init_step, base)

    def build(self, job: task_base.Job):
        cfg, spec, mesh = job.cfg, job.spec, job.mesh
        # The frozen reference: PEFT's base, else the init_from model again (a reward model
        # has none).
        if job.base is not None:
            reference, ref_sharding = job.base, spec.base_shardings
        elif cfg.task == "reward":
            reference, ref_sharding = None, None
        else:
            reference = state_lib.params_from_init(cfg, spec, job.init_dir, job.init_step)[0]
            ref_sharding = spec.shardings["params"]
        stats_fn = stats_function(cfg, spec)
        step = preference.make_train_step(
            stats_fn, spec.tx, spec.schedule, seed=cfg.seed,
            dropout=cfg.model.dropout or (spec.adapt is not None and spec.adapt.dropout),
            accum_steps=cfg.optimizer.grad_accum_steps)
        train_jit = steps.jit_step(step, spec, mesh, None, ref_sharding)
        frozen = () if reference is None else (reference,)
        batch_sharding = partitioning.batch_sharding(mesh)
        eval_jit = jax.jit(preference.make_eval_step(stats_fn),
                           in_shardings=(spec.shardings["params"], ref_sharding, batch_sharding),
                           out_shardings=partitioning.replicated(mesh))
        local_batch = cfg.eval.batch_size // jax.process_count()
        template = {k: np.zeros((local_batch, 2, cfg.model.max_len),
                                np.float32 if k == "weights" else np.int32)
                    for k in preference_data.PAIR_FEATURES}

        def train_step(state, local):
            return train_jit(state, batches_lib.global_batch(local, mesh), *frozen)

        def evaluate(params) -> dict[str, float]:
            split = self.dataset(cfg, job.eval_source, job.encode, batch_size=local_batch,
                                 train=False, index=jax.process_index(),
                                 count=jax.process_count())
            totals = batches_lib.sum_over_batches(
                lambda batch: eval_jit(params, reference, batch), split, template,
                max_steps=cfg.eval.steps, mesh=mesh)
            if not totals.get("pairs"):
                raise UserError("the validation split gave no preference pairs to evaluate; "
                                "check data.eval_split and data.source.")
            return preference.summarize(totals)

        return train_step, evaluate

    def counted_metrics(self, cfg, counts):
        return {f"{cfg.task}_{k}": float(v) for k, v in counts.items()}
