"""Token-level losses, returned as sums so micro-batches and devices add up exactly.

Every function takes per-target `weights` (0 on padding, 0 outside the assistant's turns in
SFT) and returns sums; callers divide by the summed weight once, after all micro-batches.
"""

import jax
import jax.numpy as jnp


def token_stats(logits, targets, weights, token_bytes=None) -> dict[str, jax.Array]:
    """Sums over weighted targets of: nll, log(Z)^2 (for z-loss), correct argmax, weight.

    logits [B, T, V] float32; targets [B, T] int; weights [B, T] float.
    With `token_bytes` ([V] int, UTF-8 bytes per token id) also the nats and bytes that bits per
    byte needs; tokens that stand for no bytes (markers, bos/eos) are left out of both.
    """
    logits = logits.astype(jnp.float32)
    # One max serves both logsumexp and accuracy: argmax is a two-operand reduction that XLA's
    # CPU backend does not vectorize (7x slower than this on a [4096, 8192] batch).
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1))
    log_z = jnp.log(jnp.sum(jnp.exp(logits - top[..., None]), axis=-1)) + top
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    nll = log_z - target_logit
    correct = (target_logit >= top).astype(jnp.float32)  # the target is (one of) the argmax
    w = weights.astype(jnp.float32)
    stats = {"nll_sum": jnp.sum(w * nll), "z_sum": jnp.sum(w * log_z**2),
             "correct_sum": jnp.sum(w * correct), "weight_sum": jnp.sum(w)}
    if token_bytes is not None:
        nbytes = jnp.take(token_bytes, targets).astype(jnp.float32)
        stats["byte_nats_sum"] = jnp.sum(w * nll * (nbytes > 0))
        stats["bytes_sum"] = jnp.sum(w * nbytes)
    return stats


def summarize(stats: dict) -> dict[str, float]:
    """Host-side: sums -> loss, perplexity, accuracy and bits per byte."""
    import math

    weight = max(float(stats["weight_sum"]), 1e-9)
    loss = float(stats["nll_sum"]) / weight
    out = {"loss": loss, "perplexity": math.exp(min(loss, 700.0)),
           "accuracy": float(stats["correct_sum"]) / weight, "tokens": float(stats["weight_sum"])}
    if "bytes_sum" in stats and float(stats["bytes_sum"]) > 0:
        out["bits_per_byte"] = float(stats["byte_nats_sum"]) / (math.log(2) * float(stats["bytes_sum"]))
    return out
