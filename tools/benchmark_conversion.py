#!/usr/bin/env python
"""The Hugging Face conversion's time and peak memory against checkpoint size: the
`spannorm-benchmark-conversion` console script (spannorm_megatron/benchmarks/conversion.py;
`--help` for its flags).

Needs the package importable: `bash tools/setup_env.sh` makes .venv with an editable install
(from a clean clone without it: `PYTHONPATH=. python tools/...`, as tools/gpu/check.sh does).
"""

import sys

from spannorm_megatron.benchmarks.conversion import main

if __name__ == "__main__":
    sys.exit(main())
