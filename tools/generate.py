#!/usr/bin/env python
"""Generate text from a megatron checkpoint or a Hugging Face folder: the `spannorm-generate`
console script (spannorm_megatron/hf/generation_cli.py; `--help` for its flags).

Needs the package importable: `bash tools/setup_env.sh` makes .venv with an editable install
(from a clean clone without it: `PYTHONPATH=. python tools/...`, as tools/gpu/check.sh does).
"""

import sys

from spannorm_megatron.hf.generation_cli import main

if __name__ == "__main__":
    sys.exit(main())
