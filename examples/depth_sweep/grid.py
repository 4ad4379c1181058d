#!/usr/bin/env python
"""The depth sweep's grid mode: factor cells varied alone from the sweep's base setting, run one
at a time, unattended and resumable, into one results table (results.jsonl / results.csv /
summary.md under --out). See spannorm_megatron/lab/grid.py for the grid file and the columns.

    python examples/depth_sweep/grid.py [--grid examples/depth_sweep/grid.yaml] [--out runs/grid]
        [--dry-run] [--retry-failed] [--max-runs N] [--summary]

Run it again with the same --out to resume: runs already in results.jsonl are kept.
"""

import os
import sys

if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from spannorm_megatron.lab.grid import main

    sys.exit(main())
