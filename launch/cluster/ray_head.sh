#!/usr/bin/env bash
# Start the Ray head node of a prime cluster.
#
# Usage:
#   bash launch/cluster/ray_head.sh                      # start in the background and return
#   RAY_BLOCK=1 bash launch/cluster/ray_head.sh          # stay in the foreground (SLURM, containers)
#   RAY_NUM_GPUS=8 RAY_PORT=6380 bash launch/cluster/ray_head.sh
#
# Then start one worker per other node with ray_worker.sh (RAY_HEAD_ADDRESS=<head ip>:<port>)
# and run the driver on the head: `RAY_ADDRESS=<head ip>:<port> prime train configs/prime_7b.yaml`.
#
# Settings (environment variables, all optional):
#   RAY_NODE_IP              IP this node advertises to the others (default: first of `hostname -I`)
#   RAY_PORT                 GCS port workers connect to (default 6379)
#   RAY_DASHBOARD_HOST       dashboard bind address (default 0.0.0.0)
#   RAY_DASHBOARD_PORT       dashboard / job-submission port (default 8265)
#   RAY_CLIENT_SERVER_PORT   Ray client port (default 10001)
#   RAY_NUM_CPUS             CPUs Ray may schedule on this node (default: detected)
#   RAY_NUM_GPUS             GPUs Ray may schedule on this node (default: detected from CUDA_VISIBLE_DEVICES)
#   RAY_RESOURCES            extra custom resources as JSON, e.g. '{"rollout_node": 1}'
#   RAY_OBJECT_STORE_MEMORY  object store size in bytes (default: Ray's choice)
#   RAY_TEMP_DIR             Ray's temp/session folder (default /tmp/ray)
#   RAY_BLOCK                1 to keep `ray start` in the foreground (default 0)
set -euo pipefail

node_ip="${RAY_NODE_IP:-$(hostname -I 2>/dev/null | awk '{print $1}')}"
if [[ -z "${node_ip}" ]]; then
  echo "ray_head.sh: cannot detect this node's IP; set RAY_NODE_IP" >&2
  exit 2
fi

args=(
  --head
  --node-ip-address="${node_ip}"
  --port="${RAY_PORT:-6379}"
  --dashboard-host="${RAY_DASHBOARD_HOST:-0.0.0.0}"
  --dashboard-port="${RAY_DASHBOARD_PORT:-8265}"
  --ray-client-server-port="${RAY_CLIENT_SERVER_PORT:-10001}"
  --disable-usage-stats
)
[[ -n "${RAY_NUM_CPUS:-}" ]] && args+=(--num-cpus="${RAY_NUM_CPUS}")
[[ -n "${RAY_NUM_GPUS:-}" ]] && args+=(--num-gpus="${RAY_NUM_GPUS}")
[[ -n "${RAY_RESOURCES:-}" ]] && args+=(--resources="${RAY_RESOURCES}")
[[ -n "${RAY_OBJECT_STORE_MEMORY:-}" ]] && args+=(--object-store-memory="${RAY_OBJECT_STORE_MEMORY}")
[[ -n "${RAY_TEMP_DIR:-}" ]] && args+=(--temp-dir="${RAY_TEMP_DIR}")
[[ "${RAY_BLOCK:-0}" == "1" ]] && args+=(--block)

echo "ray_head.sh: ray start ${args[*]}"
exec ray start "${args[@]}"
