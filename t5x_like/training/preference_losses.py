"""Losses of preference tuning: Bradley-Terry (reward model), DPO / conservative DPO / IPO, and
the per-token KL between a policy and its reference.

All take per-sequence quantities and return per-pair values; callers weight them (0 on the
padding pairs of a short batch) and sum, like losses.py, so micro-batches and devices add up.

    Bradley-Terry   P(chosen > rejected) = sigmoid(r_c - r_r);  loss = -log sigmoid(r_c - r_r)
    DPO             h = beta * ((pi_c - ref_c) - (pi_r - ref_r));  loss = -log sigmoid(h)
                    (Rafailov et al. 2023); label_smoothing e > 0 is conservative DPO:
                    (1 - e) * -log sigmoid(h) + e * -log sigmoid(-h), for pairs whose labels
                    are wrong with probability e
    IPO             u = (pi_c - ref_c) - (pi_r - ref_r) on length-averaged log-probs;
                    loss = (u - 1 / (2 beta))^2 (Azar et al. 2023): a target margin instead of
                    a margin pushed to infinity, so it does not overfit deterministic pairs
    RPO             DPO (or IPO) + alpha * NLL of the chosen reply per token (Pang et al. 2024,
                    "Iterative Reasoning Preference Optimization"; TRL's rpo_alpha): DPO alone
                    may lower the chosen reply's likelihood along with the rejected one's, which
                    on answers with one right form (math, the demo) costs accuracy; the NLL
                    term keeps the chosen reply likely while the margin grows

pi_x / ref_x are the log-probabilities of reply x given the prompt under the policy and the
frozen reference; beta * (pi_x - ref_x) is DPO's implicit reward of x.
"""

import jax
import jax.numpy as jnp

from t5x_like.training import losses

DPO_LOSSES = ("sigmoid", "ipo")


def sequence_logprobs(logits, targets, weights):
    """Sum over weighted targets of log p(target) per row: logits [N, T, V] -> [N], and the
    number of weighted targets per row [N]."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    token_logp = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    w = weights.astype(jnp.float32)
    return jnp.sum(w * token_logp, axis=-1), jnp.sum(w, axis=-1)


def bradley_terry(chosen_rewards, rejected_rewards):
    """Per pair: -log sigmoid(r_c - r_r) (the reward model's loss)."""
    return jax.nn.softplus(rejected_rewards - chosen_rewards)


def dpo(policy_chosen, policy_rejected, ref_chosen, ref_rejected, *, beta: float,
        loss_type: str = "sigmoid", label_smoothing: float = 0.0):
    """Per pair: (loss, chosen implicit reward, rejected implicit reward).

    For loss_type="ipo" pass length-averaged log-probs (sum / tokens), as the IPO paper does.
    """
    chosen_ratio = policy_chosen - ref_chosen
    rejected_ratio = policy_rejected - ref_rejected
    margin = chosen_ratio - rejected_ratio
    if loss_type == "ipo":
        loss = (margin - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "sigmoid":
        h = beta * margin
        loss = (1.0 - label_smoothing) * jax.nn.softplus(-h) + label_smoothing * jax.nn.softplus(h)
    else:
        raise ValueError(f"loss_type={loss_type!r}; choose one of {DPO_LOSSES}")
    return loss, beta * jax.lax.stop_gradient(chosen_ratio), beta * jax.lax.stop_gradient(
        rejected_ratio)


def chosen_nll(policy_chosen, chosen_tokens):
    """Per pair: the chosen reply's negative log-likelihood per token (RPO's extra term)."""
    return -policy_chosen / jnp.maximum(chosen_tokens, 1.0)


def token_kl(logits, ref_logits, weights):
    """Sum over weighted positions of KL(policy || reference) of the next-token distributions,
    exact over the vocabulary: logits [N, T, V] -> [N]. Differentiable in `logits` only."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    ref_logp = jax.lax.stop_gradient(jax.nn.log_softmax(ref_logits.astype(jnp.float32), axis=-1))
    kl = jnp.sum(jnp.exp(logp) * (logp - ref_logp), axis=-1)
    return jnp.sum(weights.astype(jnp.float32) * kl, axis=-1)


def sequence_stats(policy, reference, targets, weights, *, chunk: int = 0,
                   kl_grad: bool = False) -> dict:
    """Per row [N]: "logp" and "ref_logp" (sequence_logprobs of the policy and the frozen
    reference), "tokens" (weighted targets) and "kl" (token_kl, summed over the row).

    chunk = 0: `policy` and `reference` are logits [N, T, V]. chunk > 0: each is
    (hidden [N, T, d], head, logits_fn) (model.apply_hidden), and the same values are summed
    `chunk` positions at a time (losses.chunked_sums), never holding [N, T, V] logits. Only
    the policy's log-probs carry gradients, and the KL too when `kl_grad` (RL's penalty; DPO
    only reports it)."""
    def stats(logits, ref_logits, t, w):
        ref_logits = jax.lax.stop_gradient(ref_logits)
        logp, n = sequence_logprobs(logits, t, w)
        ref_logp, _ = sequence_logprobs(ref_logits, t, w)
        kl = token_kl(logits if kl_grad else jax.lax.stop_gradient(logits), ref_logits, w)
        return {"logp": logp, "tokens": n, "ref_logp": ref_logp, "kl": kl}

    if not chunk:
        return stats(policy, reference, targets, weights)
    (h, head, logits_fn), (ref_h, ref_head, ref_logits_fn) = policy, reference
    ref_h, ref_head = jax.lax.stop_gradient((ref_h, ref_head))
    return losses.chunked_sums(
        lambda heads, hc, ref_hc, tc, wc: stats(logits_fn(heads[0], hc),
                                                ref_logits_fn(heads[1], ref_hc), tc, wc),
        (head, ref_head), (h, ref_h, targets, weights), chunk=chunk)
