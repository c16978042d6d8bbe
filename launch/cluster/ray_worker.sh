#!/usr/bin/env bash
# Join this node to a running prime Ray cluster as a worker.
#
# Usage:
#   RAY_HEAD_ADDRESS=10.0.0.1:6379 bash launch/cluster/ray_worker.sh
#   bash launch/cluster/ray_worker.sh 10.0.0.1:6379      # the address may also be the first argument
#   RAY_BLOCK=1 RAY_NUM_GPUS=8 bash launch/cluster/ray_worker.sh 10.0.0.1:6379
#
# Settings (environment variables, all optional except the head address):
#   RAY_HEAD_ADDRESS         <head ip>:<port> printed by ray_head.sh (required, or pass it as $1)
#   RAY_NODE_IP              IP this node advertises (default: first of `hostname -I`)
#   RAY_NUM_CPUS             CPUs Ray may schedule on this node (default: detected)
#   RAY_NUM_GPUS             GPUs Ray may schedule on this node (default: detected from CUDA_VISIBLE_DEVICES)
#   RAY_RESOURCES            extra custom resources as JSON, e.g. '{"rollout_node": 1}'
#   RAY_OBJECT_STORE_MEMORY  object store size in bytes (default: Ray's choice)
#   RAY_TEMP_DIR             Ray's temp/session folder (default /tmp/ray)
#   RAY_BLOCK                1 to keep `ray start` in the foreground (default 0)
set -euo pipefail

head_address="${1:-${RAY_HEAD_ADDRESS:-}}"
if [[ -z "${head_address}" ]]; then
  echo "ray_worker.sh: no head address; set RAY_HEAD_ADDRESS=<head ip>:<port> or pass it as the first argument" >&2
  exit 2
fi

node_ip="${RAY_NODE_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
if [[ -z "${node_ip}" ]]; then
  echo "ray_worker.sh: cannot detect this node's IP; set RAY_NODE_IP" >&2
  exit 2
fi

args=(
  --address="${head_address}"
  --node-ip-address="${node_ip}"
  --disable-usage-stats
)
[[ -n "${RAY_NUM_CPUS:-}" ]] && args+=(--num-cpus="${RAY_NUM_CPUS}")
[[ -n "${RAY_NUM_GPUS:-}" ]] && args+=(--num-gpus="${RAY_NUM_GPUS}")
[[ -n "${RAY_RESOURCES:-}" ]] && args+=(--resources="${RAY_RESOURCES}")
[[ -n "${RAY_OBJECT_STORE_MEMORY:-}" ]] && args+=(--object-store-memory="${RAY_OBJECT_STORE_MEMORY}")
[[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir="${RAY_TEMP_DIR}")
[[ "${RAY_BLOCK:-0}" == "1" ]] && args+=(--block)

echo "ray_worker.sh: ray start ${args[*]}"
exec ray start "${args[@]}"
