#!/usr/bin/env bash
# Train on every GPU of this machine (or N CPU ranks without GPUs).
#
#   CONFIG=examples/configs/spannorm_dense_1b.yaml DATA=data/corpus_text_document \
#   TOKENIZER=tokenizers/stdlib.model RUN=runs/dense bash examples/train_single_node.sh [flags]
set -euo pipefail
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # TP overlap relies on it, as in Megatron-LM
config=${CONFIG:-examples/configs/spannorm_dense_1b.yaml}
run=${RUN:-runs/$(basename "$config" .yaml)}
nproc=${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 2)')}  # one rank per GPU
# MAX_RESTARTS=N: torchrun restarts every rank after a failure, up to N times; each restart
# resumes from the last checkpoint (--load is --save).
exec torchrun --standalone --nproc_per_node "$nproc" --max-restarts "${MAX_RESTARTS:-0}" \
  -m spannorm_megatron.train \
  --config "$config" --data-path "${DATA:?set DATA to a preprocessed prefix}" \
  --tokenizer-model "${TOKENIZER:?set TOKENIZER to a SentencePiece .model}" \
  --save "$run/checkpoints" --load "$run/checkpoints" --tensorboard-dir "$run/tensorboard" "$@"
