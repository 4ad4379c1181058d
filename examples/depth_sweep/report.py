#!/usr/bin/env python
"""Report of a depth sweep: final training/validation loss, divergence, first loss spike and
grad-norm history of every run under SWEEP_DIR/runs/, as report.md, report.csv, report.json and
loss_curves.png (written into SWEEP_DIR, or --out).

    python examples/depth_sweep/report.py runs/depth_sweep [--out DIR]

Definitions (spannorm_megatron/lab/training_log.py): start loss = first logged training loss;
diverged = NaN/Inf loss or grad norm, or final logged loss above the start loss; loss spike =
training's own rule (spannorm_megatron/training/spikes.py at the defaults of
--loss-spike-factor and --loss-spike-window), applied to the logged losses.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from spannorm_megatron.lab.sweep import main

    sys.exit(main())
