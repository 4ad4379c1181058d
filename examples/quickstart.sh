#!/usr/bin/env bash
# The main job on the embedded default, end to end on this machine (2 ranks with gloo on CPU; on
# GPUs one rank per GPU, at most 2, with NCCL), with nothing downloaded:
#   1. the corpus: the Python standard library's own sources (deterministic, every machine has it)
#   2. a SentencePiece tokenizer trained on it          (tools/train_tokenizer.py)
#   3. Megatron's indexed dataset (.bin/.idx)            (tools/preprocess_data.py)
#   4. a small SpanNorm model trained for 300 steps      (spannorm-train, examples/configs/quickstart.yaml)
#      with evaluation, checkpoints and TensorBoard logs under $RUN_DIR
#   5. the checkpoint converted to a Hugging Face folder  (tools/convert_to_hf.py)
#   6. text sampled from that folder                     (tools/generate.py)
#
#   bash examples/quickstart.sh [extra spannorm-train flags, e.g. --norm-placement prenorm]
#
# Steps 1-3 (tools/prepare_embedded_data.sh) are skipped when their outputs exist.
# RUN_DIR defaults to runs/quickstart; NPROC overrides the rank count.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=$(bash "$root/tools/setup_env.sh" | tail -n 1)
python="$venv/bin/python"
run=${RUN_DIR:-$root/runs/quickstart}
mkdir -p "$run/data"
cd "$root"

echo "== 1-3/6 the embedded data set (corpus, tokenizer, indexed dataset)"
bash tools/prepare_embedded_data.sh "$run/data" "$python"

nproc=${NPROC:-$("$python" -c 'from spannorm_megatron.runtime import ranks_per_node; print(ranks_per_node(2))')}
echo "== 4/6 training ($nproc ranks)"
export CUDA_DEVICE_MAX_CONNECTIONS=${CUDA_DEVICE_MAX_CONNECTIONS:-1}  # as Megatron-LM's launchers
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$venv/bin/torchrun" --standalone --nproc_per_node "$nproc" \
  -m spannorm_megatron.train --config examples/configs/quickstart.yaml \
  --data-path "$run/data/stdlib_text_document" --tokenizer-model "$run/data/tokenizer.model" \
  --save "$run/checkpoints" --load "$run/checkpoints" --tensorboard-dir "$run/tensorboard" "$@"

echo "== 5/6 converting the last checkpoint to a Hugging Face folder"
"$python" tools/convert_to_hf.py --load "$run/checkpoints" --save "$run/hf" \
  --tokenizer-model "$run/data/tokenizer.model" --overwrite

echo "== 6/6 sampling from the Hugging Face folder"
"$python" tools/generate.py --load "$run/hf" --prompt "def read_config(path):" \
  --max-new-tokens 48 --temperature 0.8 --top-k 40 --seed 0

echo
echo "Checkpoints:  $run/checkpoints"
echo "HF folder:    $run/hf   (AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True))"
echo "TensorBoard:  $venv/bin/tensorboard --logdir $run/tensorboard"
