"""Token-level losses, returned as sums so micro-batches and devices add up exactly.

Every function takes per-target `weights` (0 on padding, 0 outside the assistant's turns in
SFT) and returns sums; callers divide by the summed weight once, after all micro-batches.
"""

import functools

import jax
import jax.numpy as jnp

from t5x_like.modeling import partitioning


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


def chunked_loss(logits_fn, head, h, targets, weights, *, chunk: int, z_loss: float = 0.0,
                 token_bytes=None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """(nll_sum + z_loss * z_sum, token_stats sums) of the logits `logits_fn(head, h)`, computed
    `chunk` positions at a time so that the [B, T, V] float32 logits never exist whole.

    h [B, T, d] final hidden states; head: the output layer's arrays (model.apply_hidden).
    Each chunk's gradients (to h and to head) are taken in the forward pass, while its logits
    are at hand, so the backward pass only scales them: no logits are kept or recomputed, and
    the FLOPs are those of the unchunked loss. Chunks run along the sequence with the batch dim
    whole, so a batch sharded over devices stays sharded. The stats come back without gradient.
    """
    g = partitioning.axis_size("act_len")  # the sequence axis
    hs, ts, ws = (split_positions(x, chunk, g) for x in (h, targets, weights))
    loss, stats = _fused_loss(logits_fn, float(z_loss), head, hs, ts, ws, token_bytes)
    return loss, jax.lax.stop_gradient(stats)


def split_positions(x, chunk: int, g: int = 1):
    """[B, T, ...] -> [n, B, chunk, ...], T padded with zeros to n * chunk (callers give the
    padded positions weight 0).

    g > 1 (chunked_loss with the sequence split over the mesh's sequence axis; moe helper):
    each device's T / g positions are cut on their own, [B, T] -> [n, B * g, chunk], so every
    chunk keeps its positions where they are (no all-gather of h, no output layer repeated on
    each device); chunk shrinks to T / g when it does not divide it. Same sums."""
    B, T = x.shape[:2]
    if g > 1 and T % g == 0:
        t = T // g
        chunk = chunk if t % chunk == 0 else t
        x = x.reshape(B, g, t // chunk, chunk, *x.shape[2:])
        return jnp.moveaxis(x, 2, 0).reshape(t // chunk, B * g, chunk, *x.shape[4:])
    n = -(-T // chunk)
    x = jnp.pad(x, [(0, 0), (0, n * chunk - T)] + [(0, 0)] * (x.ndim - 2))
    return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)


def chunked_sums(fn, consts, xs: tuple, *, chunk: int):
    """sum over chunks of fn(consts, *chunk of each x in xs): xs are [B, T, ...] arrays cut
    `chunk` positions at a time; fn returns a pytree of per-row partial sums ([B] arrays).

    For per-row quantities over the vocabulary (a sequence's log-probability, its KL to a
    reference) whose loss is not a plain sum over positions (DPO's sigmoid of a difference of
    sums), so `chunked_loss`'s gradients-in-the-forward-pass do not apply. Each chunk is
    rematerialized instead: its [B, chunk, V] logits exist during its own forward and backward
    pass only, never [B, T, V]; the backward pass recomputes them (one more output-layer
    matmul per chunk). Values and gradients are the unchunked ones up to float rounding."""
    parts = tuple(split_positions(x, chunk) for x in xs)
    one = jax.checkpoint(fn, prevent_cse=False)

    def body(carry, c):
        return jax.tree.map(jnp.add, carry, one(consts, *c)), None

    shapes = jax.eval_shape(fn, consts, *(p[0] for p in parts))
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    return jax.lax.scan(body, zeros, parts)[0]


def _chunks(logits_fn, z_loss, head, hs, ts, ws, token_bytes, with_grads: bool):
    def chunk_loss(head, hc, tc, wc):
        s = token_stats(logits_fn(head, hc), tc, wc, token_bytes)
        return s["nll_sum"] + z_loss * s["z_sum"], s

    def body(carry, xs):
        hc, tc, wc = xs
        if not with_grads:
            loss, stats = chunk_loss(head, hc, tc, wc)
            return jax.tree.map(jnp.add, carry, (loss, stats)), None
        loss, vjp, stats = jax.vjp(lambda p, x: chunk_loss(p, x, tc, wc), head, hc,
                                   has_aux=True)
        d_head, d_h = vjp(jnp.ones_like(loss))
        return jax.tree.map(jnp.add, carry, (loss, stats, d_head)), d_h

    first = jax.tree.map(lambda x: x[0], (hs, ts, ws))
    shapes = jax.eval_shape(lambda: chunk_loss(head, *first))
    if with_grads:
        shapes = (*shapes, head)
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    # A while loop, not a scan (moe helper): this runs inside a custom VJP, and a scan there,
    # itself inside another scan (micro-batches, grad_accum_steps > 1), gets every chunk's
    # intermediates saved for a reverse pass that never comes: all the [B, chunk, V] logits
    # (JAX 0.10; the same as scan otherwise).
    d_hs = jnp.zeros_like(hs) if with_grads else None

    def step(i, carry):
        acc, d_hs = carry
        acc, d_h = body(acc, jax.tree.map(lambda x: x[i], (hs, ts, ws)))
        if with_grads:
            d_hs = jax.lax.dynamic_update_index_in_dim(d_hs, d_h.astype(d_hs.dtype), i, 0)
        return acc, d_hs

    return jax.lax.while_loop(lambda c: c[0] < hs.shape[0],
                              lambda c: (c[0] + 1, step(c[0], c[1])),
                              (jnp.int32(0), (zeros, d_hs)))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _fused_loss(logits_fn, z_loss, head, hs, ts, ws, token_bytes):
    return _chunks(logits_fn, z_loss, head, hs, ts, ws, token_bytes, with_grads=False)[0]


def _fused_loss_fwd(logits_fn, z_loss, head, hs, ts, ws, token_bytes):
    (loss, stats, d_head), d_hs = _chunks(logits_fn, z_loss, head, hs, ts, ws, token_bytes,
                                          with_grads=True)
    return (loss, stats), (d_head, d_hs)


def _fused_loss_bwd(logits_fn, z_loss, grads, cotangent):
    g = cotangent[0]  # the stats leave through stop_gradient: only the loss has a cotangent
    d_head, d_hs = grads
    d_head = jax.tree.map(lambda x: (x * g).astype(x.dtype), d_head)
    return d_head, (d_hs * g).astype(d_hs.dtype), None, None, None


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)


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
