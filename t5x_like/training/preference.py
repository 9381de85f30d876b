"""Pure steps of the pairwise tasks: the reward model (Bradley-Terry) and DPO / IPO.

    stats_fn(params, ref_params, batch, rng) -> sums      per-pair values summed over the batch
    make_train_step(stats_fn, ...)(state, batch, ref_params) -> (state, metrics)
    eval_step(params, ref_params, batch) -> sums          summed over the split on the host

A batch holds pairs [B, 2, T] (data_pipelines/preference_data.py: row 0 chosen, row 1
rejected); padding pairs (all weights 0) count for nothing. The reference parameters are an
argument of every step, never part of the state: they are read, never updated or donated.
The loss is summed over pairs and divided by the pairs of the whole batch in the one train
step of every task (steps.py), so optimizer.grad_accum_steps gives the loss and gradients of
the whole batch. With `loss_chunk` (model.loss_chunk) DPO's sequence log-probs are summed that
many positions at a time (preference_losses.sequence_stats), without [2B, T, V] logits.
"""

from typing import Callable

import jax
import jax.numpy as jnp

from t5x_like.modeling import model
from t5x_like.modeling import peft
from t5x_like.training import preference_losses
from t5x_like.training import steps


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
              rpo_alpha: float = 0.0, adapt: peft.Peft | None = None,
              loss_chunk: int = 0) -> Callable:
    """DPO (or IPO) of the policy against the frozen reference, plus rpo_alpha times the chosen
    reply's per-token NLL (RPO; 0 = plain DPO). With PEFT (`adapt`) `params` is the trainable
    tree and `ref_params` the frozen base: the policy is base + adapters and the reference the
    base alone, so the weights are held once. loss_chunk > 0: log-probs a chunk of positions
    at a time (same values and gradients)."""
    hidden = bool(loss_chunk)
    forward = peft.forward(graphdef, adapt, hidden=hidden)
    reference = peft.reference_forward(graphdef, hidden=hidden)

    def stats_fn(params, ref_params, batch, rng):
        flat = _flat(batch)
        kw = dict(positions=flat["positions"], segment_ids=flat["segment_ids"])
        seq = preference_losses.sequence_stats(
            forward(params, ref_params, flat["inputs"], dropout_rng=rng, **kw),
            reference(ref_params, flat["inputs"], **kw), flat["targets"], flat["weights"],
            chunk=loss_chunk)
        logp, ref_logp, n = seq["logp"], seq["ref_logp"], seq["tokens"]
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
        return {"loss_sum": jnp.sum(valid * loss), "pairs": jnp.sum(valid),
                "correct_sum": jnp.sum(valid * (chosen > rejected)),
                "margin_sum": jnp.sum(valid * (chosen - rejected)),
                "chosen_sum": jnp.sum(valid * chosen), "rejected_sum": jnp.sum(valid * rejected),
                "chosen_nll_sum": jnp.sum(valid * jax.lax.stop_gradient(nll)),
                "kl_sum": jnp.sum(seq["kl"]), "kl_tokens": jnp.sum(flat["weights"])}
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


def loss(stats_fn) -> Callable:
    """The pairs' loss for the one train step (steps.py): summed over pairs, with the frozen
    reference (or PEFT base) as the step's frozen input."""
    def loss_fn(params, batch, rng, ref_params):
        sums = stats_fn(params, ref_params, batch, rng)
        return sums["loss_sum"], sums
    return loss_fn


def train_metrics(sums: dict) -> dict:
    """A train step's sums -> per-pair means (loss, accuracy, margin, implicit or model
    rewards, the chosen replies' NLL) and DPO's per-token KL."""
    pairs = jnp.maximum(sums["pairs"], 1.0)
    metrics = {k.removesuffix("_sum"): v / pairs for k, v in sums.items()
               if k.endswith("_sum") and k != "kl_sum"}
    metrics["accuracy"] = metrics.pop("correct")
    metrics["chosen_reward"] = metrics.pop("chosen")
    metrics["rejected_reward"] = metrics.pop("rejected")
    if "kl_sum" in sums:
        metrics["kl"] = sums["kl_sum"] / jnp.maximum(sums["kl_tokens"], 1.0)
    return metrics


def make_train_step(stats_fn, tx, schedule, *, seed: int, dropout: float,
                    accum_steps: int = 1) -> Callable:
    """train_step(state, batch, ref_params) -> (state, metrics): mean loss over the batch's
    pairs; the same state, optimizer and step as every other task (steps.make_train_step)."""
    return steps.make_train_step(loss(stats_fn), tx, schedule, count="pairs",
                                 metrics=train_metrics, seed=seed, dropout=dropout,
                                 accum_steps=accum_steps)


def make_eval_step(stats_fn) -> Callable:
    def eval_step(params, ref_params, batch):
        return stats_fn(params, ref_params, batch, None)
    return eval_step
