#!/usr/bin/env bash
# The main job on the embedded default: sets up .venv if needed, then, on 2 ranks of this
# machine (gloo on CPU, NCCL on GPUs), builds a small SpanNorm model with tensor + sequence
# parallelism and trains it on a fixed synthetic batch until the loss has visibly fallen.
#
#   bash examples/quickstart.sh [extra selfcheck flags, e.g. --norm-placement prenorm]
#
# (Grows into the full pipeline - tokenizer, data, training, checkpoints, TensorBoard,
# HF export, sampling - as those parts land.)
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$root/tools/setup_env.sh" | tail -n 1)
cd "$root"
exec "$venv/bin/torchrun" --standalone --nproc_per_node 2 -m spannorm_megatron.selfcheck \
  --norm-placement spannorm --num-layers 4 --hidden-size 64 --num-attention-heads 4 \
  --tensor-model-parallel-size 2 --sequence-parallel --train-iters 20 "$@"
