"""Rank program of tests/test_metrics.py, launched by torchrun on 2 ranks.

    torchrun --standalone --nproc_per_node 2 tests/_metrics_worker.py REF_DIR OUT_DIR

For every layout in _metrics.LAYOUTS and each model it lists: set up the layout, load
REF_DIR/<combo>/init, train one unmeasured and one measured step, log to a TensorBoard
directory OUT_DIR/<layout>/<combo>/tb, and write this rank's record to
OUT_DIR/<layout>/<combo>/rank<r>.json. The test compares the records with one process.
"""

import spannorm_megatron  # noqa: F401  (before megatron-core: see its machine.py)

import os
import sys

import _metrics
from launch import reporting, write_result
from spannorm_megatron.metrics import TensorBoardWriter, is_writer_rank
from spannorm_megatron.process import initialize
from spannorm_megatron.runtime import destroy


def run_one(layout, combo, ref_dir, where):
    placement, moe, overrides = _metrics.COMBOS[combo]
    chunks, optimizer = _metrics.setup(_metrics.model_config(placement, moe, **overrides), layout)
    _metrics.load_initial(chunks, optimizer, os.path.join(ref_dir, combo, "init"))
    batches = _metrics.micro_batches(_metrics.global_batch())
    _metrics.measured_step(chunks, optimizer, batches, measure=False)
    record = _metrics.measured_step(chunks, optimizer, batches)
    with TensorBoardWriter(os.path.join(where, "tb")) as writer:
        record["writer_enabled"] = writer.enabled
        writer.log_training(2, 2 * _metrics.GLOBAL_BATCH, lm_loss=record["loss"],
                            learning_rate=_metrics.LR, batch_size=_metrics.GLOBAL_BATCH,
                            grad_norm=record["grad_norm"], num_zeros=record["num_zeros"],
                            params_norm=record["params_norm"])
        writer.log_stability(2, record["signals"], record["parts"])
    record["is_writer_rank"] = is_writer_rank()
    return record


def main(ref_dir: str, out_dir: str) -> None:
    for layout_name, (layout, combos) in _metrics.LAYOUTS.items():
        # Re-initializing replaces megatron-core's groups and keeps the default group.
        initialize(layout, seed=1234)
        for combo in combos:
            where = os.path.join(out_dir, layout_name, combo)
            os.makedirs(where, exist_ok=True)
            with reporting(where):
                record = run_one(layout, combo, ref_dir, where)
            write_result(where, _metrics.to_json(record))
    destroy()


if __name__ == "__main__":
    main(*sys.argv[1:3])
