#!/usr/bin/env python
"""Signal propagation through deep models, per layer, for every norm placement, depth and
output-projection init: at initialization and optionally after N training steps.

    python tools/signal_propagation.py --help
    python tools/signal_propagation.py --out runs/sigprop              # the default grid
    python tools/signal_propagation.py --placements spannorm postnorm --depths 32 128 \
        --scale-init sqrt_depth none --train-steps 50

The logic lives in spannorm_megatron.lab (cli, propagation, results, plots); docs/stability.md
shows what it measures and the results on this project's CPU machines.
"""

import os
import sys

if __name__ == "__main__":
    # Runs from a checkout without installing: the package is next to tools/.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from spannorm_megatron.lab.cli import main

    sys.exit(main())
