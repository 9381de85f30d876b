"""The RL task: task=rl, online RL with a reward (the algorithm is training/rl.py).

    python -m t5x_like.train --config=configs/rl.py --workdir=runs/rl --config.init_from=runs/sft

Data: chat prompts. A step samples rl.group_size replies to each prompt with the current
policy, rates them and takes the one train step (steps.py) on the reply rows against the
frozen reference (the init_from model, or PEFT's base). Validation: greedy replies to held-out
prompts, their mean reward (and accuracy for exact_answer).

Every process samples its own prompts on its own devices (distributed.local_mesh): with one
process that is the training mesh itself and the policy is sampled as it is sharded; with
several, each process decodes with a copy of the policy on its devices (distributed.local_copy)
and the reply rows of all processes make the global batch of the update.
"""

import jax

from data_pipelines import preference_data
from t5x_like.core.errors import UserError
from t5x_like.modeling import decoding
from t5x_like.modeling import partitioning
from t5x_like.modeling import peft
from t5x_like.training import batches as batches_lib
from t5x_like.training import distributed
from t5x_like.training import rl
from t5x_like.training import state as state_lib
from t5x_like.training import steps
from t5x_like.training.tasks import base as task_base


def prompt_len(cfg) -> int:
    """The longest prompt: model.max_len less room for the reply and its <|end|>."""
    return cfg.model.max_len - cfg.rl.max_new_tokens - 1


class RL(task_base.Task):
    kind = "chat"

    def check(self, cfg, mesh) -> None:
        dp = partitioning.data_parallel_size(mesh)
        rows = cfg.data.batch_size * cfg.rl.group_size
        if rows % dp:
            raise UserError(f"config key 'rl.group_size': data.batch_size x rl.group_size = "
                            f"{rows} reply rows per step do not divide over the data-parallel "
                            f"size {dp}.")
        micro = rows // cfg.optimizer.grad_accum_steps
        if micro % dp:
            raise UserError(f"config key 'optimizer.grad_accum_steps': micro-batches of {micro} "
                            f"reply rows do not divide over the data-parallel size {dp}.")
        if cfg.rl.max_new_tokens + 8 > cfg.model.max_len:
            raise UserError(f"config key 'rl.max_new_tokens': {cfg.rl.max_new_tokens} leaves no "
                            f"room for a prompt in model.max_len ({cfg.model.max_len}).")

    def encoder(self, cfg, tokenizer, text_field, counts):
        return preference_data.prompt_encoder(tokenizer, max_len=prompt_len(cfg), counts=counts)

    def dataset(self, cfg, source, encode, *, batch_size, train, index, count):
        return iter(preference_data.prompt_dataset(
            source, encode, batch_size=batch_size, seed=cfg.seed, train=train,
            process_index=index, process_count=count))

    def build(self, job: task_base.Job):
        cfg, spec, mesh, tokenizer = job.cfg, job.spec, job.mesh, job.tokenizer
        if job.base is not None:  # PEFT: the frozen base is the reference
            reference, ref_sharding = job.base, spec.base_shardings
        else:
            reference = state_lib.params_from_init(cfg, spec, job.init_dir, job.init_step)[0]
            ref_sharding = spec.shardings["params"]
        step = steps.make_train_step(
            rl.make_loss(spec.graphdef, kl_coef=cfg.rl.kl_coef, adapt=spec.adapt,
                         loss_chunk=cfg.model.loss_chunk),
            spec.tx, spec.schedule, count="tokens", metrics=rl.train_metrics(cfg.rl.kl_coef),
            accum_steps=cfg.optimizer.grad_accum_steps)
        update_jit = steps.jit_step(step, spec, mesh, None, ref_sharding)

        def update(state, rows):
            return update_jit(state, batches_lib.global_batch(rows, mesh), reference)

        local = distributed.local_mesh(mesh)

        def policy(params):  # the decoder's (params, LoRA) on this process's devices
            if spec.adapt is None:
                full, lora = params, None
            else:  # PEFT: base (+ tuned parameters) and the LoRA adapters unmerged
                full, lora = peft.combine(spec.adapt, params, reference)
                lora = lora or None
            return (distributed.local_copy(full, mesh, local),
                    distributed.local_copy(lora, mesh, local))

        reward_fn = rl.reward_function(cfg.rl.reward, mesh=mesh)
        start = policy(job.state["params"])[0]
        with jax.set_mesh(local):  # the decoders lay out their copies on it
            decoder = decoding.Decoder(
                spec.graphdef, start, cfg.model, tokenizer,
                max_batch=cfg.data.batch_size // jax.process_count() * cfg.rl.group_size,
                max_len=cfg.model.max_len, mesh=local)
            eval_decoder = decoding.Decoder(spec.graphdef, start, cfg.model, tokenizer,
                                            max_batch=64, max_len=cfg.model.max_len, mesh=local)
        train_step = rl.make_train_step(decoder, tokenizer, update, reward_fn, cfg.rl,
                                        seed=cfg.seed, max_len=cfg.model.max_len, policy=policy)

        # eval.steps batches of eval.batch_size prompts at most (0 = rl.eval_prompts of them);
        # each process replies to its share.
        encode = preference_data.prompt_encoder(tokenizer, max_len=prompt_len(cfg))
        limit = cfg.rl.eval_prompts if not cfg.eval.steps else min(
            cfg.rl.eval_prompts, cfg.eval.steps * cfg.eval.batch_size)
        prompts = []
        for i in range(len(job.eval_source)):
            if len(prompts) >= limit:
                break
            encoded = encode(job.eval_source[i])
            if encoded is not None:
                prompts.append(encoded["prompt"][:int(encoded["prompt_len"])].tolist())
        mine = prompts[jax.process_index()::jax.process_count()]

        def evaluate(params):
            if not prompts:
                raise UserError("the validation split gave no prompts to evaluate "
                                "(rl.eval_prompts is 0 or every prompt is too long); check "
                                "data.eval_split.")
            return rl.evaluate(eval_decoder, tokenizer, params, mine, reward_fn, cfg.rl, policy)

        return train_step, evaluate

    def counted_metrics(self, cfg, counts):
        return {f"rl_{k}": float(v) for k, v in counts.items()}
