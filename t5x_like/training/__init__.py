"""Training: the loop and its sharded steps (trainer), the preference tasks (alignment,
preference, rl), losses, the optimizer, batches across processes, checkpoints (where they are
written) and the multi-controller runtime (distributed).
"""
