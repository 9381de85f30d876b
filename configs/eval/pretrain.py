"""Likelihood on a pretraining run's own validation split: loss, perplexity, bits per byte,
token accuracy over the whole split (training logs them over eval.steps batches only).

    python -m t5x_like.evaluate --workdir=runs/shk --config=configs/eval/pretrain.py

Add a text file to compare models with different tokenizers by bits per byte:
`--config.tasks.validation.source=text:../shared/data/pretrain/tinyshakespeare.txt`.
"""

from configs.eval import common


def get_config():
    cfg = common.suite()
    cfg.tasks.validation = common.task("likelihood", "run")
    return cfg
