#!/usr/bin/env bash
# Prepare the embedded default data set in DATA_DIR, skipping steps whose outputs exist:
#   DATA_DIR/stdlib.jsonl                 the corpus (Python stdlib sources, first 4 MB)
#   DATA_DIR/tokenizer.model              a SentencePiece tokenizer trained on it (vocab 4096)
#   DATA_DIR/stdlib_text_document.{bin,idx}  Megatron's indexed dataset (--data-path prefix)
#
#   bash tools/prepare_embedded_data.sh DATA_DIR [PYTHON]
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
data=${1:?usage: prepare_embedded_data.sh DATA_DIR [PYTHON]}
python=${2:-python}
mkdir -p "$data"
cd "$root"

if [ ! -f "$data/stdlib.jsonl" ]; then
  echo "== data 1/3: writing the embedded corpus (Python stdlib sources, first 4 MB)"
  "$python" -m spannorm_megatron.data.corpus --max-bytes 4000000 "$data/stdlib.jsonl"
fi
if [ ! -f "$data/tokenizer.model" ]; then
  echo "== data 2/3: training the tokenizer"
  "$python" tools/train_tokenizer.py --input "$data/stdlib.jsonl" \
    --model-prefix "$data/tokenizer" --vocab-size 4096
fi
if [ ! -f "$data/stdlib_text_document.idx" ]; then
  echo "== data 3/3: preprocessing into Megatron's indexed dataset"
  "$python" tools/preprocess_data.py --input "$data/stdlib.jsonl" \
    --output-prefix "$data/stdlib" --tokenizer-type SentencePieceTokenizer \
    --tokenizer-model "$data/tokenizer.model" --append-eod --workers 2
fi
