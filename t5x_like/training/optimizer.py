"""The optimizer: AdamW with warmup + decay, global-norm clipping, and a weight-decay mask."""

import jax
import optax


def learning_rate(opt_cfg, total_steps: int) -> optax.Schedule:
    """Linear warmup to `lr`, then cosine / linear decay to lr * min_lr_ratio (or constant)."""
    peak, warmup = opt_cfg.lr, min(opt_cfg.warmup_steps, total_steps)
    floor = peak * opt_cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if opt_cfg.schedule == "cosine":
        decay = optax.cosine_decay_schedule(peak, decay_steps, alpha=opt_cfg.min_lr_ratio)
    elif opt_cfg.schedule == "linear":
        decay = optax.linear_schedule(peak, floor, decay_steps)
    else:
        decay = optax.constant_schedule(peak)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), decay], [warmup])


def decay_mask(params):
    """True where weight decay applies: matrices and embeddings, never norm scales or biases."""
    def decays(path, _):
        name = "/".join(str(getattr(k, "key", k)) for k in path)
        return not ("norm" in name or "bias" in name)
    return jax.tree.map_with_path(decays, params)


def make(opt_cfg, total_steps: int) -> optax.GradientTransformation:
    """clip -> AdamW, wrapped so that a step with non-finite gradients changes nothing.

    The wrapper's state counts skipped steps (`nonfinite_steps`); the loop stops or goes on
    per optimizer.on_nonfinite. Parameters and moments never become NaN, so a checkpoint with
    NaN/Inf cannot be written.
    """
    parts = []
    if opt_cfg.grad_clip > 0:
        parts.append(optax.clip_by_global_norm(opt_cfg.grad_clip))
    parts.append(optax.adamw(learning_rate(opt_cfg, total_steps), b1=opt_cfg.b1, b2=opt_cfg.b2,
                             eps=opt_cfg.eps, weight_decay=opt_cfg.weight_decay,
                             mask=decay_mask))
    # Never give up skipping (optax would apply the update after that many in a row).
    return optax.apply_if_finite(optax.chain(*parts), max_consecutive_errors=2**31 - 1)


def nonfinite_steps(opt_state):
    """How many steps so far had non-finite gradients (and were not applied)."""
    return opt_state.total_notfinite
