#!/usr/bin/env bash
# Train on a Cloud TPU VM slice: create it (or reuse it), copy this checkout to every worker,
# install, and run the same training command on all workers at once (JAX finds its peers itself
# on TPU VMs). Logs: each worker writes ~/t5x_like/logs/<run>-worker-<hostname>.log, and the
# combined output is kept in launch_logs/<tpu>-<run>.log here.
#
#   bash launch/tpu_pod.sh --tpu=my-v5p-8 --zone=us-east5-a --accelerator=v5p-8 [--project=P] \
#       [--version=v2-alpha-tpuv5] [--spot] [--dry-run] -- \
#       --config=configs/llama_1b.py --workdir=gs://my-bucket/runs/1b --config.data.source=...
#
# --dry-run prints every command instead of running it. The workdir should be a GCS path
# (gs://...) so that every worker writes checkpoints to the same place.
set -euo pipefail
cd "$(dirname "$0")/.."

tpu="" zone="" accelerator="" project="" version="v2-alpha-tpuv5" spot="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --accelerator=*) accelerator="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --version=*) version="${1#*=}" ;;
    --spot) spot="--spot" ;;
    --dry-run) dry_run=1 ;;
    --) shift; break ;;
    *) echo "$0: unknown option $1 (training arguments go after --)" >&2; exit 2 ;;
  esac
  shift
done
if [[ -z "$tpu" || -z "$zone" || -z "$accelerator" || $# -eq 0 ]]; then
  echo "usage: $0 --tpu=NAME --zone=ZONE --accelerator=TYPE [--project=P] [--dry-run] -- TRAIN_ARGS..." >&2
  exit 2
fi

gcloud_tpu=(gcloud compute tpus tpu-vm)
where=(--zone="$zone")
[[ -n "$project" ]] && where+=(--project="$project")
run_name="$(date +%Y%m%d-%H%M%S)"
train_args="$(printf ' %q' "$@")"
archive="/tmp/t5x_like-$run_name.tar.gz"

run() {  # prints the command; runs it unless --dry-run
  printf '+'; printf ' %q' "$@"; printf '\n'
  if [[ $dry_run -eq 0 ]]; then "$@"; fi
}

if [[ $dry_run -eq 1 ]] || ! "${gcloud_tpu[@]}" describe "$tpu" "${where[@]}" >/dev/null 2>&1; then
  run "${gcloud_tpu[@]}" create "$tpu" "${where[@]}" --accelerator-type="$accelerator" \
    --version="$version" $spot
fi
run git archive --format=tar.gz --prefix=t5x_like/ -o "$archive" HEAD
run "${gcloud_tpu[@]}" scp "$archive" "$tpu:~/t5x_like.tar.gz" --worker=all "${where[@]}"
run "${gcloud_tpu[@]}" ssh "$tpu" --worker=all "${where[@]}" --command="rm -rf ~/t5x_like && \
tar xzf ~/t5x_like.tar.gz -C ~ && python3 -m venv ~/t5x_like/.venv && \
~/t5x_like/.venv/bin/pip install -q -e ~/t5x_like 'jax[tpu]' && mkdir -p ~/t5x_like/logs"
mkdir -p launch_logs
run "${gcloud_tpu[@]}" ssh "$tpu" --worker=all "${where[@]}" --command="cd ~/t5x_like && \
.venv/bin/python -m t5x_like.train$train_args 2>&1 | tee logs/$run_name-worker-\$(hostname).log" \
  | { if [[ $dry_run -eq 1 ]]; then cat; else tee "launch_logs/$tpu-$run_name.log"; fi; }
