#!/usr/bin/env bash
# Train on this host: every argument is passed through to `python -m t5x_like.train`.
#   bash launch/local.sh --config=configs/pretrain_tiny.py --workdir=runs/tiny --config.steps=100
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m t5x_like.train "$@"
