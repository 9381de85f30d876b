"""The one train step of every task: gradients (over micro-batches), the optimizer update,
the metrics; and its jit with explicit shardings.

A task supplies its loss as a sum over the examples of a batch (tokens for a language model,
pairs for reward and DPO, reply tokens for RL) with what it summed over:

    loss_fn(params, batch, rng, frozen) -> (objective_sum, sums)      sums[count] = examples

`frozen` is what the step reads but never trains: the PEFT base, or DPO's / RL's reference
model (None when there is none). With optimizer.grad_accum_steps = A the batch is cut into A
micro-batches whose gradients and sums add up before one division by the total count, so the
loss and the gradients are those of the whole batch (up to float rounding), in 1/A the memory.

    train_step(state, batch, frozen=None) -> (state, metrics)    pure; jitted by `jit_step`
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from t5x_like.modeling import partitioning
from t5x_like.training import optimizer as optimizer_lib


def micro_batches(batch: dict, accum_steps: int) -> dict:
    """[B, ...] -> [A, B/A, ...], micro-batch i taking rows i, i + A, i + 2A, ...: a batch
    sharded in row blocks over devices keeps each device's rows on that device."""
    return jax.tree.map(
        lambda x: x.reshape(x.shape[0] // accum_steps, accum_steps, *x.shape[1:]).swapaxes(0, 1),
        batch)


def gradients(loss_fn: Callable, params, batch: dict, rng, frozen, accum_steps: int = 1):
    """(summed gradients, summed sums) of `loss_fn` over the batch's micro-batches (not yet
    divided by the count). Micro-batch i gets the dropout key fold_in(rng, i)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if accum_steps == 1:
        (_, sums), grads = grad_fn(params, batch, rng, frozen)
        return grads, sums
    micro = micro_batches(batch, accum_steps)

    def body(carry, xs):
        mb, i = xs
        mb_rng = None if rng is None else jax.random.fold_in(rng, i)
        (_, sums), grads = grad_fn(params, mb, mb_rng, frozen)
        return jax.tree.map(jnp.add, carry, (grads, sums)), None

    first = jax.tree.map(lambda x: x[0], micro)
    (_, sums), grads = jax.eval_shape(grad_fn, params, first, rng, frozen)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (grads, sums))
    (grads, sums), _ = jax.lax.scan(body, zeros, (micro, jnp.arange(accum_steps)))
    return grads, sums


def make_train_step(loss_fn: Callable, tx, schedule, *, count: str,
                    metrics: Callable[[dict], dict], seed: int = 0, dropout: float = 0.0,
                    accum_steps: int = 1) -> Callable:
    """train_step(state, batch, frozen=None) -> (state, metrics).

    count: the key of `sums` that the objective was summed over; metrics(sums) -> the task's
    metrics from the batch's sums. Every task's metrics also have grad_norm, learning_rate,
    loss_tokens (the count: the loop stops on a batch with nothing to learn from) and
    nonfinite_steps (the optimizer skipped that many non-finite updates so far)."""
    def train_step(state, batch, frozen=None):
        params = state["params"]
        rng = jax.random.fold_in(jax.random.key(seed), state["step"]) if dropout else None
        grads, sums = gradients(loss_fn, params, batch, rng, frozen, accum_steps)
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums[count], 1.0), grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        out = dict(metrics(sums))
        out.update(grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]),
                   loss_tokens=sums[count],
                   nonfinite_steps=optimizer_lib.nonfinite_steps(opt_state))
        return new_state, out

    return train_step


def jit_step(train_step: Callable, spec, mesh, batch_shardings=None, frozen_shardings=None):
    """The train step jitted with explicit shardings (pjit style), the state donated; the
    frozen tree, when there is one, is an input that is never donated."""
    batch_shardings = batch_shardings or partitioning.batch_sharding(mesh)
    frozen = () if frozen_shardings is None else (frozen_shardings,)
    return jax.jit(train_step, in_shardings=(spec.shardings, batch_shardings, *frozen),
                   out_shardings=(spec.shardings, partitioning.replicated(mesh)),
                   donate_argnums=0)
