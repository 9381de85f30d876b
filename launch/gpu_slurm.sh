#!/usr/bin/env bash
# Train on a SLURM GPU cluster: one task per node, all of the node's GPUs per task. JAX's
# multi-controller runtime detects SLURM (jax.distributed.initialize() reads SLURM_* variables),
# so every task runs the same command. Logs: logs/<job name>-<job id>-<node>.log per task.
#
#   bash launch/gpu_slurm.sh --nodes=2 --gpus-per-node=8 [--partition=P] [--time=24:00:00] \
#       [--account=A] [--venv=.venv] [--dry-run] -- \
#       --config=configs/llama_1b.py --workdir=/shared/runs/1b
#
# Writes the batch script to launch_logs/<job>.sbatch and submits it with sbatch; --dry-run
# prints the script and the sbatch command instead. The workdir must be on a filesystem every
# node sees.
set -euo pipefail
cd "$(dirname "$0")/.."

nodes=1 gpus=8 partition="" time_limit="24:00:00" account="" venv=".venv" job="t5x_like" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes=*) nodes="${1#*=}" ;;
    --gpus-per-node=*) gpus="${1#*=}" ;;
    --partition=*) partition="${1#*=}" ;;
    --time=*) time_limit="${1#*=}" ;;
    --account=*) account="${1#*=}" ;;
    --venv=*) venv="${1#*=}" ;;
    --job-name=*) job="${1#*=}" ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "$0: unknown option $1 (training arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ $# -eq 0 ]]; then
  echo "usage: $0 [--nodes=N] [--gpus-per-node=G] [--dry-run] -- TRAIN_ARGS..." >&2
  exit 2
fi

train_args="$(printf ' %q' "$@")"
script="#!/bin/bash
#SBATCH --job-name=$job
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=$gpus
#SBATCH --exclusive
#SBATCH --time=$time_limit
#SBATCH --output=logs/%x-%j.out${partition:+
#SBATCH --partition=$partition}${account:+
#SBATCH --account=$account}
set -euo pipefail
cd $(printf '%q' "$PWD")
mkdir -p logs
# One process per node sees all its GPUs; jax.distributed picks up SLURM_* itself.
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9
srun --output=logs/%x-%j-%N.log $venv/bin/python -m t5x_like.train$train_args
"
mkdir -p launch_logs
path="launch_logs/$job-$(date +%Y%m%d-%H%M%S).sbatch"
if [[ $dry_run -eq 1 ]]; then
  printf '%s' "$script"
  echo "+ sbatch $path"
else
  printf '%s' "$script" > "$path"
  sbatch "$path"
fi
