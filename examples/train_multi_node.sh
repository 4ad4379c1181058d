#!/usr/bin/env bash
# Run the same command on every node. Rendezvous through MASTER_ADDR:MASTER_PORT (c10d);
# each node takes its rank from NODE_RANK (or lets the rendezvous assign one).
#
#   NNODES=4 NODE_RANK=0 MASTER_ADDR=node0 MASTER_PORT=29500 \
#   CONFIG=examples/configs/spannorm_moe.yaml DATA=... TOKENIZER=... RUN=runs/moe \
#   bash examples/train_multi_node.sh
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # TP overlap relies on it, as in Megatron-LM
config=${CONFIG:-examples/configs/spannorm_moe.yaml}
run=${RUN:-runs/$(basename "$config" .yaml)}
nnodes=${NNODES:?set NNODES}
# A node rank the others cannot agree with makes the rendezvous wait for ever: refuse it here.
if ! [[ "$nnodes" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: NNODES=$nnodes must be a positive integer (the number of nodes)." >&2; exit 2
fi
node_rank_args=()
if [ -n "${NODE_RANK:-}" ]; then
  if ! [[ "$NODE_RANK" =~ ^[0-9]+$ ]] || [ "$NODE_RANK" -ge "$nnodes" ]; then
    echo "error: NODE_RANK=$NODE_RANK must be an integer in 0..$((nnodes - 1)) (NNODES=$nnodes):" \
      "give each node its own rank, or unset NODE_RANK to let the rendezvous assign one." >&2
    exit 2
  fi
  node_rank_args=(--node_rank "$NODE_RANK")
fi
exec torchrun --nnodes "$nnodes" --nproc_per_node "${NPROC_PER_NODE:-8}" \
  --max-restarts "${MAX_RESTARTS:-0}" \
  "${node_rank_args[@]}" --rdzv_backend c10d --rdzv_id "${RDZV_ID:-spannorm}" \
  --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
  -m spannorm_megatron.train --config "$config" \
  --data-path "${DATA:?set DATA}" --tokenizer-model "${TOKENIZER:?set TOKENIZER}" \
  --save "$run/checkpoints" --load "$run/checkpoints" --tensorboard-dir "$run/tensorboard" "$@"
