"""Tiny Shakespeare, cleaned and split 90/10, with a 2k tokenizer: the held-out text for
tokenizer comparisons.

    python -m data_pipelines.prepare --config=configs/data/shakespeare.py --out=data/shk
    python -m data_pipelines.tokenizer_eval --data=prepared:data/shk --vocab_sizes=2048,8192,32768
"""

import ml_collections

from configs import base


def get_config():
    cfg = base.get_config()
    cfg.data.sources.shakespeare = ml_collections.ConfigDict(
        {"source": "text:../shared/data/pretrain/tinyshakespeare.txt", "weight": 1.0})
    cfg.data.validation_fraction = 0.1
    cfg.data.vocab_size = 2048
    return cfg
