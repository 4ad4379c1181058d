#!/usr/bin/env python
"""Tokenize text into Megatron's indexed dataset (.bin/.idx), as Megatron-LM's tool does: the
`spannorm-preprocess` console script (spannorm_megatron/data/preprocess_cli.py; `--help` for its
flags).

Needs the package importable: `bash tools/setup_env.sh` makes .venv with an editable install
(from a clean clone without it: `PYTHONPATH=. python tools/...`, as tools/gpu/check.sh does).
"""

import sys

from spannorm_megatron.data.preprocess_cli import main

if __name__ == "__main__":
    sys.exit(main())
