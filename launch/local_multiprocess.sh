#!/usr/bin/env bash
# One training job as N processes on this machine, the way multi-host runs work (JAX's
# multi-controller runtime, coordinator on 127.0.0.1), each process with its own fake CPU devices.
#
#   bash launch/local_multiprocess.sh 2 --config=configs/pretrain_tiny.py --workdir=runs/mp
#   DEVICES_PER_PROCESS=2 bash launch/local_multiprocess.sh 2 --config=... --workdir=... --config.mesh.fsdp=2
#
# Every argument after N goes to `python -m t5x_like.train` in every process, with
# --config.distributed.* added. Logs: <workdir>/logs/process_<i>.log (process 0 is also shown).
# If one process fails, the others are stopped and its log tail is printed; the exit status is
# the first failure's. Env: DEVICES_PER_PROCESS (default 1), PORT (default: a free one), PYTHON.
set -euo pipefail
if [[ $# -lt 1 || ! "$1" =~ ^[0-9]+$ || "$1" -lt 1 ]]; then
  echo "usage: $0 NUM_PROCESSES --config=... --workdir=... [--config.key=value ...]" >&2
  exit 2
fi
num=$1; shift
cd "$(dirname "$0")/.."
python_bin="${PYTHON:-python}"
devices="${DEVICES_PER_PROCESS:-1}"
workdir=""
for arg in "$@"; do [[ "$arg" == --workdir=* ]] && workdir="${arg#--workdir=}"; done
if [[ -z "$workdir" ]]; then echo "$0: --workdir=... is required" >&2; exit 2; fi
port="${PORT:-$("$python_bin" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
mkdir -p "$workdir/logs"

pids=()
for ((i = 0; i < num; i++)); do
  XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=$devices" JAX_PLATFORMS=cpu \
    "$python_bin" -m t5x_like.train "$@" \
      --config.distributed.coordinator_address="127.0.0.1:$port" \
      --config.distributed.num_processes="$num" --config.distributed.process_id="$i" \
      > "$workdir/logs/process_$i.log" 2>&1 &
  pids+=($!)
done
tail -n +1 -f "$workdir/logs/process_0.log" --pid="${pids[0]}" 2>/dev/null &
tail_pid=$!

status=0
remaining=("${!pids[@]}")
while ((${#remaining[@]})); do
  for idx in "${!remaining[@]}"; do
    i=${remaining[$idx]}
    if ! kill -0 "${pids[$i]}" 2>/dev/null; then
      rc=0; wait "${pids[$i]}" || rc=$?
      unset 'remaining[idx]'
      if [[ $rc -ne 0 && $status -eq 0 ]]; then
        status=$rc
        echo "process $i failed (exit $rc); stopping the others. Last lines of its log:" >&2
        tail -n 20 "$workdir/logs/process_$i.log" >&2
        for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
      fi
    fi
  done
  sleep 0.2
done
kill "$tail_pid" 2>/dev/null || true
exit $status
