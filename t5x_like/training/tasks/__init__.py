"""The tasks of the one training job (training/trainer.py): what differs between them.

    lm.py      pretrain, sft      text or chat examples, next-token loss, loss / perplexity
    pairs.py   reward, dpo        preference pairs, Bradley-Terry or DPO, pairwise accuracy
    rl.py      rl                 chat prompts, sample + reward + policy gradient, greedy reward

Each is a `base.Task`: how examples are encoded and batched, where the state starts, and its
train step and evaluation. Everything else (mesh, data shards, state, checkpoints, metrics,
preemption, the loop, gradient accumulation) is the job's, written once.
"""
