#!/usr/bin/env python
"""Loss, perplexity and bits per byte of a megatron checkpoint or a Hugging Face folder on a
text file: the `spannorm-evaluate` console script
(spannorm_megatron/evaluation/cli.py; `--help` for its flags).

Under torchrun: `torchrun --nproc_per_node 2 tools/evaluate.py ...` (or `-m
spannorm_megatron.evaluation.cli`).

Needs the package importable: `bash tools/setup_env.sh` makes .venv with an editable install
(from a clean clone without it: `PYTHONPATH=. python tools/...`, as tools/gpu/check.sh does).
"""

import sys

from spannorm_megatron.evaluation.cli import main

if __name__ == "__main__":
    sys.exit(main())
