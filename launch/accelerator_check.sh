#!/usr/bin/env bash
# The accelerator check (benchmarks/accelerator_check.py) from the source tree, as on the GPU
# image (no pip install of this project); arguments are passed through; JSON to --out, else $OUT.
# JAX may take 90% of the GPU's memory (its default 75% caps the batch sweep early).
#   bash launch/accelerator_check.sh            # --tiny to rehearse on a CPU
cd "$(dirname "$0")/.." && PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-.9}" exec "${PYTHON:-python3}" -m benchmarks.accelerator_check --profile "$@"
