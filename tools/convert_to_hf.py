#!/usr/bin/env python
"""Convert a megatron checkpoint (any TP/PP/EP layout) into a Hugging Face model folder: the
`spannorm-convert-to-hf` console script (spannorm_megatron/hf/export_cli.py; `--help` for its
flags).

Needs the package importable: `bash tools/setup_env.sh` makes .venv with an editable install
(from a clean clone without it: `PYTHONPATH=. python tools/...`, as tools/gpu/check.sh does).
"""

import sys

from spannorm_megatron.hf.export_cli import main

if __name__ == "__main__":
    sys.exit(main())
