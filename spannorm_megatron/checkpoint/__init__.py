"""Checkpoints in Megatron-LM's layout, written through megatron-core dist checkpointing.

    SAVE_DIR/latest_checkpointed_iteration.txt   "100"
    SAVE_DIR/iter_0000100/                       torch_dist shards + common.pt + metadata.json
                                                 + run.json + manifest.json (written last)

One checkpoint holds the model (all virtual-pipeline chunks), the optimizer state in a fully
reshardable form, the LR scheduler, every rank's RNG state, the training position and a record
of the run, and loads under any other tensor / pipeline / expert / data parallel layout. Saves
are crash safe (temporary directory, renamed into place once complete, pointer replaced
atomically); loads check directory, architecture, files and keys before touching anything.

Modules, one job each: `naming` (names on disk), `atomic` (crash-safe file operations),
`manifest` (completion marker and checksums), `tracker` (which checkpoint to load),
`rollbacks` (the course a run took after
rolling back), `run_record` (what wrote it, and the architecture check), `megatron_args` (the ``args``
namespace Megatron-LM's loader reads), `rng` (per-rank RNG state, sharded as Megatron-LM shards
it), `state` (the sharded state dicts), `save` and `load`.
"""

from .errors import CheckpointError
from .load import load_checkpoint, read_position, read_run_record
from .naming import MANIFEST_FILENAME, RUN_RECORD_FILENAME, TRACKER_FILENAME, iteration_dirname
from .save import save_checkpoint
from .tracker import complete_iterations, find_latest, last_good_checkpoint, resolve

__all__ = [
    "CheckpointError",
    "MANIFEST_FILENAME",
    "RUN_RECORD_FILENAME",
    "TRACKER_FILENAME",
    "complete_iterations",
    "find_latest",
    "iteration_dirname",
    "last_good_checkpoint",
    "load_checkpoint",
    "read_position",
    "read_run_record",
    "resolve",
    "save_checkpoint",
]
