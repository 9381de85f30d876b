#!/usr/bin/env bash
# The whole lifecycle on this host, stage by stage, with report.md at the end:
#   bash launch/lifecycle.sh                                     # the demo, CPU, ~20 minutes
#   bash launch/lifecycle.sh --quick                             # a few steps per stage
#   bash launch/lifecycle.sh --recipe=shakespeare_chat --data=../shared/data
#   bash launch/lifecycle.sh --workdir=runs/lc --config.stages.sft.args="steps=800"
#   bash launch/lifecycle.sh --recipe=hf --hf_dir=~/models/Qwen2.5-0.5B-Instruct  # an open model
# --recipe=NAME is configs/lifecycle/NAME.py; every other argument goes to
# `python -m t5x_like.lifecycle` (rerunning resumes; finished stages are skipped).
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=demo
args=()
for a in "$@"; do
  case "$a" in
    --recipe=*) recipe="${a#--recipe=}" ;;
    *) args+=("$a") ;;
  esac
done
config="configs/lifecycle/${recipe}.py"
if [[ ! -f "$config" ]]; then
  echo "lifecycle.sh: no recipe '$recipe' ($config does not exist); recipes: $(ls configs/lifecycle | grep -v __ | sed 's/\.py$//' | tr '\n' ' ')" >&2
  exit 2
fi
exec "${PYTHON:-python}" -m t5x_like.lifecycle --config="$config" ${args[@]+"${args[@]}"}
