"""Every default of every t5x_like job, in one place: t5x_like/core/defaults.py.

Recipes (`configs/pretrain_tiny.py`, ...) call `get_config()` and override a few values; the
command line overrides any key: `--config=configs/pretrain_tiny.py --config.optimizer.lr=3e-4`.
Unknown keys and values of the wrong type are errors before any compute. The resolved config
is written to `<workdir>/config.json`. README.md ("Config keys") explains each section. The
defaults live in the library so that it never imports configs/ (`hf import` builds a complete
config from them).
"""

import ml_collections

from t5x_like.core import defaults


def get_config() -> ml_collections.ConfigDict:
    return defaults.get_config()
