"""Pure steps of the pairwise tasks: the reward model (Bradley-Terry) and DPO / IPO.

    stats_fn(params, ref_params, batch, rng) -> sums      per-pair values summed over the batch
    train_step(state, ref_params, batch) -> (state, metrics)
    eval_step(params, ref_params, batch) -> sums          summed over the split on the host

A batch holds pairs [B, 2, T] (data_pipelines/preference_data.py: row 0 chosen, row 1
rejected); padding pairs (all weights 0) count for nothing. The reference parameters are an
argument of every step, never part of the state: they are read, never updated or donated.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from t5x_like.modeling import model
from t5x_like.modeling import peft
from t5x_like.training import preference_losses
from t5x_like.training import optimizer as optimizer_lib


def _flat(batch):
    """[B, 2, T] -> [2B, T] (rows chosen_0, rejected_0, chosen_1, ...)."""
    return {k: v.reshape(-1, v.shape[-1]) for k, v in batch.items()}


def last_index(weights):
    """[N, T] -> [N]: index of each row's last weighted target (the reply's last token is the
    input there, so the hidden state at it has read the whole reply)."""
    T = weights.shape[-1]
    return (T - 1 - jnp.argmax(weights[:, ::-1] > 0, axis=-1)).astype(jnp.int32)


def _pairs(values):
    pairs = values.reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def reward_stats(graphdef, adapt: peft.Peft | None = None) -> Callable:
    """Bradley-Terry on the reward model's scores of chosen and rejected. With PEFT (`adapt`)
    `params` is the trainable tree (adapters and the head) and `ref_params` the frozen base."""
    def stats_fn(params, ref_params, batch, rng):
        flat = _flat(batch)
        lora, lora_dropout = None, 0.0
        if adapt is not None:
            params, lora = peft.combine(adapt, params, ref_params)
            lora_dropout = adapt.dropout
        scores = model.bind(graphdef, params).score(
            flat["inputs"], last_index(flat["weights"]), positions=flat["positions"],
            segment_ids=flat["segment_ids"], dropout_rng=rng, lora=lora,
            lora_dropout=lora_dropout)
        chosen, rejected = _pairs(scores)
        valid = (batch["weights"][:, 0].sum(-1) > 0).astype(jnp.float32)
        loss = preference_losses.bradley_terry(chosen, rejected)
        return {"loss_sum": jnp.sum(valid * loss), "pairs": jnp.sum(valid),
                "correct_sum": jnp.sum(valid * (chosen > rejected)),
                "margin_sum": jnp.sum(valid * (chosen - rejected)),
                "chosen_sum": jnp.sum(valid * chosen), "rejected_sum": jnp.sum(valid * rejected)}
    return stats_fn


def dpo_stats(graphdef, *, beta: float, loss_type: str, label_smoothing: float,
              rpo_alpha: float = 0.0, adapt: peft.Peft | None = None) -> Callable:
    """DPO (or IPO) of the policy against the frozen reference, plus rpo_alpha times the chosen
    reply's per-token NLL (RPO; 0 = plain DPO). With PEFT (`adapt`) `params` is the trainable
    tree and `ref_params` the frozen base: the policy is base + adapters and the reference the
    base alone, so the weights are held once."""
    forward, reference = peft.forward(graphdef, adapt), peft.reference_forward(graphdef)

    def stats_fn(params, ref_params, batch, rng):
        flat = _flat(batch)
        kw = dict(positions=flat["positions"], segment_ids=flat["segment_ids"])
        logits = forward(params, ref_params, flat["inputs"], dropout_rng=rng, **kw)
        ref_logits = jax.lax.stop_gradient(reference(ref_params, flat["inputs"], **kw))
        logp, n = preference_losses.sequence_logprobs(logits, flat["targets"], flat["weights"])
        ref_logp, _ = preference_losses.sequence_logprobs(ref_logits, flat["targets"],
                                                          flat["weights"])
        nll = preference_losses.chosen_nll(_pairs(logp)[0], _pairs(n)[0])
        if loss_type == "ipo":  # IPO compares length-averaged log-probabilities
            logp, ref_logp = logp / jnp.maximum(n, 1), ref_logp / jnp.maximum(n, 1)
        pc, pr = _pairs(logp)
        rc, rr = _pairs(ref_logp)
        loss, chosen, rejected = preference_losses.dpo(
            pc, pr, rc, rr, beta=beta, loss_type=loss_type, label_smoothing=label_smoothing)
        if rpo_alpha:
            loss = loss + rpo_alpha * nll
        valid = (batch["weights"][:, 0].sum(-1) > 0).astype(jnp.float32)
        kl = preference_losses.token_kl(jax.lax.stop_gradient(logits), ref_logits,
                                        flat["weights"])
        return {"loss_sum": jnp.sum(valid * loss), "pairs": jnp.sum(valid),
                "correct_sum": jnp.sum(valid * (chosen > rejected)),
                "margin_sum": jnp.sum(valid * (chosen - rejected)),
                "chosen_sum": jnp.sum(valid * chosen), "rejected_sum": jnp.sum(valid * rejected),
                "chosen_nll_sum": jnp.sum(valid * jax.lax.stop_gradient(nll)),
                "kl_sum": jnp.sum(kl), "kl_tokens": jnp.sum(flat["weights"])}
    return stats_fn


def summarize(sums: dict) -> dict[str, float]:
    """Sums over pairs -> loss, pairwise accuracy, margin, mean chosen / rejected reward (the
    reward model's scores, or DPO's implicit rewards), and the per-token KL and the chosen
    replies' per-token NLL (DPO)."""
    pairs = max(float(sums["pairs"]), 1e-9)
    out = {"loss": float(sums["loss_sum"]) / pairs, "accuracy": float(sums["correct_sum"]) / pairs,
           "margin": float(sums["margin_sum"]) / pairs,
           "chosen_reward": float(sums["chosen_sum"]) / pairs,
           "rejected_reward": float(sums["rejected_sum"]) / pairs, "pairs": float(sums["pairs"])}
    if "kl_sum" in sums:
        out["kl"] = float(sums["kl_sum"]) / max(float(sums["kl_tokens"]), 1e-9)
        out["chosen_nll"] = float(sums["chosen_nll_sum"]) / pairs
    return out


def make_train_step(stats_fn, tx, schedule, *, seed: int, dropout: float) -> Callable:
    """train_step(state, ref_params, batch) -> (state, metrics): mean loss over the batch's
    pairs; the same state layout and optimizer as every other task (trainer.state_spec)."""
    def loss_fn(params, ref_params, batch, rng):
        stats = stats_fn(params, ref_params, batch, rng)
        return stats["loss_sum"] / jnp.maximum(stats["pairs"], 1.0), stats

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def train_step(state, ref_params, batch):
        params = state["params"]
        rng = jax.random.fold_in(jax.random.key(seed), state["step"]) if dropout else None
        (_, stats), grads = grad_fn(params, ref_params, batch, rng)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_state = {"step": state["step"] + 1, "params": optax.apply_updates(params, updates),
                     "opt_state": opt_state}
        pairs = jnp.maximum(stats["pairs"], 1.0)
        metrics = {k.removesuffix("_sum"): v / pairs for k, v in stats.items()
                   if k.endswith("_sum") and k != "kl_sum"}
        metrics.update(grad_norm=optax.global_norm(grads), learning_rate=schedule(state["step"]),
                       loss_tokens=stats["pairs"],  # the loop stops on a batch of no pairs
                       nonfinite_steps=optimizer_lib.nonfinite_steps(opt_state))
        metrics["accuracy"] = metrics.pop("correct")
        metrics["chosen_reward"] = metrics.pop("chosen")
        metrics["rejected_reward"] = metrics.pop("rejected")
        if "kl_sum" in stats:
            metrics["kl"] = stats["kl_sum"] / jnp.maximum(stats["kl_tokens"], 1.0)
        return new_state, metrics

    return train_step


def make_eval_step(stats_fn) -> Callable:
    def eval_step(params, ref_params, batch):
        return stats_fn(params, ref_params, batch, None)
    return eval_step
