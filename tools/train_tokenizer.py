#!/usr/bin/env python
"""Train a SentencePiece tokenizer for preprocessing and training: the `spannorm-train-tokenizer`
console script (spannorm_megatron/data/tokenizer_training_cli.py; `--help` for its flags).

Needs the package importable: `bash tools/setup_env.sh` makes .venv with an editable install
(from a clean clone without it: `PYTHONPATH=. python tools/...`, as tools/gpu/check.sh does).
"""

import sys

from spannorm_megatron.data.tokenizer_training_cli import main

if __name__ == "__main__":
    sys.exit(main())
