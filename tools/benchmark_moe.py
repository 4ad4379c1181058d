#!/usr/bin/env python
"""Training-step speed of expert-parallel MoE variants against the dense model of the same
active parameters: the `spannorm-benchmark-moe` console script
(spannorm_megatron/benchmarks/moe.py; `--help` for its flags).

Under torchrun: `torchrun --nproc_per_node 2 tools/benchmark_moe.py`.

Needs the package importable: `bash tools/setup_env.sh` makes .venv with an editable install
(from a clean clone without it: `PYTHONPATH=. python tools/...`, as tools/gpu/check.sh does).
"""

import sys

from spannorm_megatron.benchmarks.moe import main

if __name__ == "__main__":
    sys.exit(main())
