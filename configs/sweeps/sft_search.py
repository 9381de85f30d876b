"""SFT search: learning rate, warmup, weight decay and dropout for configs/sft_chat.py, by TPE,
each trial stopping early on its validation loss (the recipe's eval.early_stop_by).

    python -m t5x_like.sweep --config=configs/sweeps/sft_search.py --workdir=sweeps/sft \
        --config.fixed.init_from=runs/tiny
    python -m t5x_like.sweep --config=configs/sweeps/sft_search.py --workdir=sweeps/sft_alpaca \
        --config.fixed.init_from=runs/shk \
        --config.fixed.data.source=alpaca:../shared/data/sft/alpaca_subset.json --config.trials=30

The objective is the best validation loss of a trial (an early-stopped run's last evaluation
is past its best; the run keeps its best checkpoint). Successive halving stops the weaker
trials at 50, 150 and 450 steps (rate 3), so most of the budget goes to the promising ones.
"""

import ml_collections

from configs.sweeps import common


def get_config():
    cfg = common.sweep()
    cfg.config = "configs/sft_chat.py"
    cfg.fixed = ml_collections.ConfigDict({
        "init_from": "runs/tiny",  # the pretrained run every trial fine-tunes
        "data": {"source": "synthetic:arithmetic_chat"},
        "checkpoint": {"max_to_keep": 1},
    })
    cfg.space = ml_collections.ConfigDict({
        "optimizer": {
            "lr": common.log_uniform(1e-4, 3e-3),
            "warmup_steps": common.integer(0, 100, step=10),
            "weight_decay": common.choice(0.0, 0.01, 0.1),
        },
        "model": {"dropout": common.uniform(0.0, 0.3)},
    })
    cfg.objective.reduce = "best"
    cfg.sampler = "tpe"
    cfg.trials = 20
    cfg.startup_trials = 5
    cfg.pruner = "successive_halving"
    cfg.halving_min_steps = 50
    cfg.halving_rate = 3
    return cfg
