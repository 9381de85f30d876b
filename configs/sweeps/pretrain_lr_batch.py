"""Learning rate x batch size grid for pretraining: configs/pretrain_tiny.py on Tiny Shakespeare.

    python -m t5x_like.sweep --config=configs/sweeps/pretrain_lr_batch.py --workdir=sweeps/lr
    python -m t5x_like.sweep --config=configs/sweeps/pretrain_lr_batch.py --workdir=sweeps/lr2 \
        --config.fixed.steps=2000 --config.fixed.data.source=prepared:data/shk --parallel=2

Six short runs (3 learning rates x 2 batch sizes), each evaluated every 50 steps; the median
pruner stops a run whose validation loss is worse than the median of the finished runs at the
same step (after step 100, once 2 runs finished). The data is prepared once for every trial.
Runs of different batch sizes see different numbers of tokens in the same steps: compare
learning rates within a batch size, or scale `steps` with the batch for equal tokens.
"""

import ml_collections

from configs.sweeps import common


def get_config():
    cfg = common.sweep()
    cfg.config = "configs/pretrain_tiny.py"
    cfg.fixed = ml_collections.ConfigDict({
        "steps": 200,
        "data": {"source": "text:../shared/data/pretrain/tinyshakespeare.txt"},
        "model": {"dropout": 0.1},  # pretrain_tiny's default (0) is the arithmetic task's
        "eval": {"every_steps": 50, "steps": 10},
        "checkpoint": {"every_steps": 100, "max_to_keep": 1},
    })
    cfg.space = ml_collections.ConfigDict({
        "optimizer": {"lr": common.choice(1e-3, 3e-3, 1e-2)},
        "data": {"batch_size": common.choice(8, 16)},
    })
    cfg.sampler = "grid"
    cfg.pruner = "median"
    cfg.prune_startup_trials = 2
    cfg.prune_warmup_steps = 100
    return cfg
