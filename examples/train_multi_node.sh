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
node_rank_args=()
[ -n "${NODE_RANK:-}" ] && node_rank_args=(--node_rank "$NODE_RANK")
exec torchrun --nnodes "${NNODES:?set NNODES}" --nproc_per_node "${NPROC_PER_NODE:-8}" \
  "${node_rank_args[@]}" --rdzv_backend c10d --rdzv_id "${RDZV_ID:-spannorm}" \
  --rdzv_endpoint "${MASTER_ADDR:?set MASTER_ADDR}:${MASTER_PORT:-29500}" \
  -m spannorm_megatron.train --config "$config" \
  --data-path "${DATA:?set DATA}" --tokenizer-model "${TOKENIZER:?set TOKENIZER}" \
  --save "$run/checkpoints" --load "$run/checkpoints" --tensorboard-dir "$run/tensorboard" "$@"
