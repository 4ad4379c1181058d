#!/usr/bin/env python
"""Convert a Hugging Face model folder into a megatron checkpoint that training loads: the
`spannorm-convert-from-hf` console script (spannorm_megatron/hf/importer_cli.py; `--help` for
its flags).

Under torchrun: `torchrun --nproc_per_node 4 tools/convert_from_hf.py ...` (or `-m
spannorm_megatron.hf.importer_cli`).

Needs the package importable: `bash tools/setup_env.sh` makes .venv with an editable install
(from a clean clone without it: `PYTHONPATH=. python tools/...`, as tools/gpu/check.sh does).
"""

import sys

from spannorm_megatron.hf.importer_cli import main

if __name__ == "__main__":
    sys.exit(main())
