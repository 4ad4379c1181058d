#!/usr/bin/env python
"""Training-step speed and memory of each norm placement, against PreNorm, in one run: the
`spannorm-benchmark` console script (spannorm_megatron/benchmarks/training.py; `--help` for its
flags).

Under torchrun: `torchrun --nproc_per_node 8 tools/benchmark.py --preset moe ...`.

Needs the package importable: `bash tools/setup_env.sh` makes .venv with an editable install
(from a clean clone without it: `PYTHONPATH=. python tools/...`, as tools/gpu/check.sh does).
"""

import sys

from spannorm_megatron.benchmarks.training import main

if __name__ == "__main__":
    sys.exit(main())
