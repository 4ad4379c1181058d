#!/usr/bin/env python
"""Signal propagation through deep models, per layer, for every norm placement, depth and
output-projection init, at initialization and optionally after N training steps: the
`spannorm-signal-propagation` console script (spannorm_megatron/lab/cli.py; `--help` for its
flags).

    python tools/signal_propagation.py --out runs/sigprop              # the default grid
    python tools/signal_propagation.py --placements spannorm postnorm --depths 32 128 \\
        --scale-init sqrt_depth none --train-steps 50

docs/stability.md shows what it measures and the results on this project's CPU machines.

Needs the package importable: `bash tools/setup_env.sh` makes .venv with an editable install
(from a clean clone without it: `PYTHONPATH=. python tools/...`, as tools/gpu/check.sh does).
"""

import sys

from spannorm_megatron.lab.cli import main

if __name__ == "__main__":
    sys.exit(main())
