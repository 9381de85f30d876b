#!/usr/bin/env bash
# The accelerator check (benchmarks/accelerator_check.py) from the source tree, as on the GPU
# image (no pip install of this project); arguments are passed through; JSON to --out, else $OUT.
# That image has jax, flax, optax, orbax but not ml-collections: bring its pure-Python wheel
# (on a machine with PyPI: pip download --no-deps -d benchmarks/wheels ml-collections==1.1.0,
# then carry benchmarks/wheels); every wheel there goes on PYTHONPATH (Python imports them as zips).
# JAX may take 90% of the GPU's memory (its default 75% caps the batch sweep early).
#   bash launch/accelerator_check.sh            # --tiny to rehearse on a CPU
cd "$(dirname "$0")/.." || exit 1
path="."
for wheel in benchmarks/wheels/*.whl; do [[ -e "$wheel" ]] && path="$path:$wheel"; done
PYTHONPATH="$path${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
  XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-.9}" \
  exec "${PYTHON:-python3}" -m benchmarks.accelerator_check --profile "$@"
