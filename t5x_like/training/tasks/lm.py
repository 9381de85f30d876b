"""The language-model task: pretraining (text) and SFT (chats, assistant turns only).

    make_loss(graphdef, ...)        the next-token loss (chunked: model.loss_chunk)
    make_train_step / compile_steps the one train step (steps.py) with it, jitted with shardings
    make_eval_step, evaluate        loss, perplexity, accuracy, bits per byte over a split

The train and eval steps take global batches; `LanguageModel.build` feeds them this process's
rows. Imports no data pipeline (grain) at module level, so the steps alone run where only JAX
is installed (benchmarks/accelerator_check.py).
"""

import collections
from typing import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np

from data_pipelines import chat_data
from t5x_like.core.errors import UserError
from t5x_like.modeling import model
from t5x_like.modeling import partitioning
from t5x_like.modeling import peft
from t5x_like.training import batches as batches_lib
from t5x_like.training import losses
from t5x_like.training import steps
from t5x_like.training.tasks import base as task_base


def make_loss(graphdef, adapt: peft.Peft | None = None, *, z_loss: float = 0.0,
              loss_chunk: int = 0) -> Callable:
    """loss(params, base, batch, rng=None, token_bytes=None) -> (nll_sum + z_loss * z_sum,
    losses.token_stats sums): the language-model loss of pretraining, SFT and evaluation.

    With `loss_chunk` (model.loss_chunk) the output layer and the loss run that many positions
    at a time (losses.chunked_loss): same values and gradients, without the [B, T, V] logits.
    """
    forward = peft.forward(graphdef, adapt, hidden=bool(loss_chunk))

    def loss(params, base, batch, rng=None, token_bytes=None):
        out, aux = forward(params, base, batch["inputs"], positions=batch["positions"],
                           segment_ids=batch["segment_ids"], dropout_rng=rng, with_aux=True)
        if loss_chunk:
            h, head, logits_fn = out
            total, stats = losses.chunked_loss(logits_fn, head, h, batch["targets"],
                                               batch["weights"], chunk=loss_chunk,
                                               z_loss=z_loss, token_bytes=token_bytes)
        else:
            stats = losses.token_stats(out, batch["targets"], batch["weights"], token_bytes)
            total = stats["nll_sum"] + z_loss * stats["z_sum"]
        return model.add_moe_aux(total, stats, aux)  # MoE router losses (moe helper)
    return loss


def train_metrics(z_loss: float) -> Callable:
    """A step's token sums -> mean loss (NLL per target), accuracy and the z-loss."""
    def metrics(stats):
        denom = jnp.maximum(stats["weight_sum"], 1.0)
        out = {"loss": stats["nll_sum"] / denom, "accuracy": stats["correct_sum"] / denom}
        if z_loss:
            out["z_loss"] = stats["z_sum"] / denom
        # MoE router statistics (model.add_moe_aux; moe helper): moe_load_balance, ...
        out.update({k[:-4]: v / denom for k, v in stats.items() if k.startswith("moe_")})
        return out
    return metrics


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

    return steps.make_train_step(loss_fn, tx, schedule, count="weight_sum",
                                 metrics=train_metrics(z_loss), seed=seed, dropout=dropout,
                                 accum_steps=accum_steps)


def make_eval_step(graphdef, adapt: peft.Peft | None = None, loss_chunk: int = 0) -> Callable:
    loss = make_loss(graphdef, adapt, loss_chunk=loss_chunk)

    def eval_step(params, batch, token_bytes, base=None):
        return loss(params, base, batch, token_bytes=token_bytes)[1]
    return eval_step


def compile_steps(cfg, spec, mesh):
    """The jitted train and eval steps with explicit shardings (pjit style); state donated.
    Both take global batches (batches.global_batch); with PEFT the frozen base is their last
    argument."""
    batch_sharding = partitioning.batch_sharding(mesh)  # every feature of the batch dict
    train_step = make_train_step(spec.graphdef, spec.tx, spec.schedule, seed=cfg.seed,
                                 z_loss=cfg.optimizer.z_loss,
                                 accum_steps=cfg.optimizer.grad_accum_steps,
                                 dropout=cfg.model.dropout or (spec.adapt and spec.adapt.dropout),
                                 adapt=spec.adapt, loss_chunk=cfg.model.loss_chunk)
    train_jit = steps.jit_step(train_step, spec, mesh, batch_sharding,
                               None if spec.adapt is None else spec.base_shardings)
    base = () if spec.adapt is None else (spec.base_shardings,)  # PEFT: base is an input
    eval_jit = jax.jit(make_eval_step(spec.graphdef, spec.adapt, cfg.model.loss_chunk),
                       in_shardings=(spec.shardings["params"], batch_sharding,
                                     partitioning.replicated(mesh), *base),
                       out_shardings=partitioning.replicated(mesh))
    return train_jit, eval_jit


def example_encoder(cfg, tokenizer, text_field: str, counts: collections.Counter) -> Callable:
    """record -> {"tokens", "weights"} for the task: plain text, or a chat rendered by the one
    chat template with its loss mask (data_pipelines/chat_data.py)."""
    if cfg.task == "sft":
        return chat_data.encoder(tokenizer, loss_on=cfg.data.loss_on, max_len=cfg.model.max_len,
                                 on_long=cfg.data.on_long, counts=counts)
    from data_pipelines import pipeline

    return pipeline.text_encoder(tokenizer, text_field)


def check_learnable(source, encode, split: str, probe: int = 100) -> None:
    """Refuses a split whose first records give nothing to learn from (an all-zero loss mask
    would otherwise train on nothing, or loop forever looking for a non-empty example)."""
    n = min(len(source), probe)
    if not any(encode(source[i])["weights"].any() for i in range(n)):
        raise UserError(f"none of the first {n} records of the {split} split has a token to "
                        "learn from (an empty loss mask): SFT learns only assistant turns "
                        "(data.loss_on); check that the conversations have them, or that "
                        "data.on_long does not drop them all.")


def evaluate(eval_step, params, batches: Iterator[dict], *, max_steps: int, local_batch: int,
             max_len: int, mesh, token_bytes) -> dict[str, float]:
    """Sums the eval statistics over the split (or max_steps batches) -> loss, ppl, bpb, acc."""
    from data_pipelines import pipeline

    template = {k: np.zeros((local_batch, max_len), np.float32 if k == "weights" else np.int32)
                for k in pipeline.FEATURES}
    totals = batches_lib.sum_over_batches(lambda batch: eval_step(params, batch, token_bytes),
                                          batches, template, max_steps=max_steps, mesh=mesh)
    if not totals.get("weight_sum"):
        raise UserError("the validation split gave no tokens to evaluate; check data.eval_split.")
    return losses.summarize(totals)


class LanguageModel(task_base.Task):
    """task=pretrain (kind "text") and task=sft (kind "chat")."""

    def __init__(self, kind: str):
        self.kind = kind

    def encoder(self, cfg, tokenizer, text_field, counts):
        return example_encoder(cfg, tokenizer, text_field, counts)

    def dataset(self, cfg, source, encode, *, batch_size, train, index, count):
        from data_pipelines import pipeline

        workers = dict(worker_count=cfg.data.worker_count) if train else {}
        return iter(pipeline.make_dataset(
            source, encode, batch_size=batch_size, train=train, process_index=index,
            process_count=count, max_len=cfg.model.max_len, seed=cfg.seed,
            packing=cfg.data.packing, **workers))

    def check_data(self, cfg, encode, splits):
        for split, source in splits.items():
            check_learnable(source, encode, split)

    def build(self, job: task_base.Job):
        cfg, mesh = job.cfg, job.mesh
        train_jit, eval_jit = compile_steps(cfg, job.spec, mesh)
        if job.base is not None:  # the frozen base goes into every step as an input
            train_jit, eval_jit = peft.with_base(train_jit, eval_jit, job.base)
        token_bytes = jax.device_put(jnp.asarray(job.tokenizer.token_bytes()),
                                     partitioning.replicated(mesh))
        # Evaluation sums over records, so any split over processes will do.
        local_batch = cfg.eval.batch_size // jax.process_count()

        def train_step(state, local):
            return train_jit(state, batches_lib.global_batch(local, mesh))

        def evaluate_params(params):
            split = self.dataset(cfg, job.eval_source, job.encode, batch_size=local_batch,
                                 train=False, index=jax.process_index(),
                                 count=jax.process_count())
            return evaluate(eval_jit, params, split, max_steps=cfg.eval.steps,
                            local_batch=local_batch, max_len=cfg.model.max_len, mesh=mesh,
                            token_bytes=token_bytes)

        return train_step, evaluate_params

    def counted_metrics(self, cfg, counts):
        if cfg.task != "sft":
            return {}
        return {"sft_truncated": counts["truncated"], "sft_dropped": counts["dropped"]}
