#!/usr/bin/env python
"""Preprocessing throughput (tokens/s, MB/s), one worker against all workers: the
`spannorm-benchmark-data` console script (spannorm_megatron/benchmarks/data.py; `--help` for its
flags).

Needs the package importable: `bash tools/setup_env.sh` makes .venv with an editable install
(from a clean clone without it: `PYTHONPATH=. python tools/...`, as tools/gpu/check.sh does).
"""

import sys

from spannorm_megatron.benchmarks.data import main

if __name__ == "__main__":
    sys.exit(main())
