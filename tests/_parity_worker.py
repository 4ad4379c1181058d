"""Rank program of tests/test_parallel_parity.py, launched by torchrun on 4 ranks.

    torchrun --standalone --nproc_per_node 4 tests/_parity_worker.py REF_DIR OUT_DIR

For every layout in _parity.LAYOUTS and every model in _parity.COMBOS it applies to, and every
recipe layout in _parity.RECIPE_LAYOUTS with its model: set up the layout, load REF_DIR/<combo>/init, train, save OUT_DIR/<layout>/<combo>/final and write
this rank's record to OUT_DIR/<layout>/<combo>/rank<r>.json. The test judges the records.
"""

import spannorm_megatron  # noqa: F401  (before megatron-core: see its machine.py)

import os
import sys

import _parity
from launch import reporting, write_result
from spannorm_megatron.process import initialize
from spannorm_megatron.runtime import destroy


def _cases():
    """(layout name, layout, [model names]): every placement under LAYOUTS, then the recipes."""
    for layout_name, layout in _parity.LAYOUTS.items():
        yield layout_name, layout, [combo for combo, (_, moe) in _parity.COMBOS.items()
                                    if _parity.applies(layout, moe)]
    for layout_name, (layout, recipe) in _parity.RECIPE_LAYOUTS.items():
        yield layout_name, layout, [recipe]


def main(ref_dir: str, out_dir: str) -> None:
    for layout_name, layout, combos in _cases():
        initialize(layout, seed=1234)
        for combo in combos:
            placement, moe, overrides = _parity.model_of(combo)
            where = os.path.join(out_dir, layout_name, combo)
            os.makedirs(where, exist_ok=True)
            with reporting(where):
                record = _parity.run(placement, moe, layout, os.path.join(ref_dir, combo, "init"),
                                     os.path.join(where, "final"), overrides)
            write_result(where, record)
    destroy()


if __name__ == "__main__":
    main(*sys.argv[1:3])
