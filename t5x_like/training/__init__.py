"""Training: one job for every task (trainer), its loop (loop), state (state) and train step
(steps); the tasks (tasks/: language model, preference pairs, RL) and their losses (losses,
preference_losses, preference, rl); the optimizer, batches across processes, checkpoints and
the multi-controller runtime (distributed).
"""
