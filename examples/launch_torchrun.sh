#!/usr/bin/env bash
# Multi-node launch with torchrun: run this same command on every node, with NODE_RANK set.
# Lightning sees torchrun's environment and uses its processes (devices = processes per node).
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 GPUS_PER_NODE=8 bash examples/launch_torchrun.sh --tp 2
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 GPUS_PER_NODE=8 bash examples/launch_torchrun.sh --tp 2
#
# Extra arguments go to the training script (default examples/demo.py; set SCRIPT=... for another).
set -euo pipefail

GPUS_PER_NODE=${GPUS_PER_NODE:-8}
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
SCRIPT=${SCRIPT:-$(dirname "$0")/demo.py}

export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
export NCCL_NVLS_ENABLE=${NCCL_NVLS_ENABLE:-0}  # NVLink SHARP off: it needs extra setup on many hosts

exec torchrun \
    --nproc-per-node "$GPUS_PER_NODE" \
    --nnodes "$NNODES" \
    --node-rank "$NODE_RANK" \
    --master-addr "$MASTER_ADDR" \
    --master-port "$MASTER_PORT" \
    "$SCRIPT" --devices "$GPUS_PER_NODE" --num-nodes "$NNODES" "$@"
