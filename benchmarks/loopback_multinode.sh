#!/usr/bin/env bash
# Rehearse a multi-node launch on one machine: 2 "machines" x 1 process on 127.0.0.1, with the shipped
# accelerate_configs/multi_node.yaml (its addresses and fp16 overridden, so it also runs on a CPU box).
# Both "machines" share this filesystem; on real machines the run dir must be on storage every node sees.
#   bash benchmarks/loopback_multinode.sh [recipe.toml] [key=value ...]
# tests/test_distributed.py::test_loopback_two_machines runs the same thing, tiny, under a timeout.
set -euo pipefail
cd "$(dirname "$0")/.."
recipe=${1:-recipes/demo.toml}
shift || true
port=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
out=${OUT_DIR:-runs/loopback}
mkdir -p "$out"
pids=()
for rank in 0 1; do
  timeout "${TIMEOUT:-1800}" accelerate launch --config_file accelerate_configs/multi_node.yaml \
    --num_processes 2 --machine_rank "$rank" --main_process_ip 127.0.0.1 --main_process_port "$port" \
    --mixed_precision no -m accel_det.train "$recipe" mission.name=loopback "$@" \
    >"$out/machine$rank.log" 2>&1 &
  pids+=($!)
done
status=0
for i in 0 1; do
  if ! wait "${pids[$i]}"; then
    echo "machine $i failed; see $out/machine$i.log" >&2
    status=1
  fi
done
[ "$status" -eq 0 ] && tail -n 3 "$out/machine0.log"
exit "$status"
