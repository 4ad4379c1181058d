"""`save_checkpoint`: one crash-safe, reshardable checkpoint of model, optimizer, scheduler, RNG
and training position.

Order of a save (every step is collective unless marked rank 0):

1. rank 0: create the save directory, clear debris of interrupted saves (``*.tmp-*``
   directories and pointer temp files; an ``.old-`` copy is deleted, or renamed back into
   place if its replacement never arrived), create ``iter_NNNNNNN.tmp-<nonce>``.
2. all ranks write their shards there with megatron-core's ``dist_checkpointing.save``
   (torch_dist); rank 0 adds ``run.json``.
3. all ranks fsync and checksum the files (split between them); rank 0 writes
   ``manifest.json`` last. Only now is the directory complete.
4. rank 0: rename it to ``iter_NNNNNNN`` (moving an existing copy of the same iteration aside
   first), then atomically replace ``latest_checkpointed_iteration.txt``, then delete the
   moved-aside copy.

A crash before 4 leaves a ``.tmp-`` directory that loading ignores, the previous checkpoints
and the pointer untouched; a crash inside 4 leaves the pointer on the old iteration (or, when
re-saving the pointer's own iteration, a complete ``.old-`` copy that loading falls back to).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import uuid
from typing import Optional, Sequence

from megatron.core import dist_checkpointing
from torch.distributed.checkpoint.api import CheckpointException

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.errors import STORAGE_ERRNOS

from . import _dist, manifest, megatron_args, rng, run_record, state
from .atomic import atomic_write_text, fsync_path, publish_dir, remove_tree, retire_dir
from .errors import CheckpointError, SaveFailedError
from .tracker import complete_iterations, last_good_checkpoint
from .naming import (
    RUN_RECORD_FILENAME,
    TMP_INFIX,
    TRACKER_FILENAME,
    iteration_dir,
    side_dirs,
)

logger = logging.getLogger(__name__)


def clean_debris(save_dir: str) -> None:
    """Remove what interrupted saves left in `save_dir` (rank 0; never touches complete
    ``iter_*`` directories or the pointer file)."""
    for iteration, infix, _nonce, path in side_dirs(save_dir):
        if infix == TMP_INFIX:
            remove_tree(path)
            continue
        final = iteration_dir(save_dir, iteration)
        if manifest.is_complete(final):
            retire_dir(path)
        elif not os.path.exists(final) and manifest.is_complete(path):
            os.rename(path, final)  # the replacement never arrived: put the old copy back
            fsync_path(save_dir)
    for name in os.listdir(save_dir):
        if name.startswith(TRACKER_FILENAME + TMP_INFIX):
            os.remove(os.path.join(save_dir, name))




def storage_problem(error: BaseException) -> Optional[str]:
    """The storage error (no space, quota, file size limit, read-only, permission) behind a
    failed save, or None. megatron-core reports writer failures as text (a CheckpointException
    holding each rank's traceback), so the text is searched as well as the exception chain."""
    seen = error
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in STORAGE_ERRNOS:
            return os.strerror(seen.errno)
        seen = seen.__cause__ or seen.__context__
    text = str(error)
    for code in STORAGE_ERRNOS:
        if os.strerror(code) in text:
            return os.strerror(code)
    return None


def _probe_storage(save_dir: str, nbytes: int = 4 << 20) -> Optional[str]:
    """Whether `save_dir` still takes a few megabytes: a writer that died of a short write may
    report only the symptom (torch's zip writer: "unexpected pos")."""
    probe = os.path.join(save_dir, f".space-probe{TMP_INFIX}{uuid.uuid4().hex[:8]}")
    try:
        with open(probe, "wb") as stream:
            stream.write(b"\0" * nbytes)
            stream.flush()
            os.fsync(stream.fileno())
    except OSError as error:
        return os.strerror(error.errno) if error.errno in STORAGE_ERRNOS else None
    finally:
        if os.path.exists(probe):
            os.remove(probe)
    last = _size_of_last(save_dir)
    if last and shutil.disk_usage(save_dir).free < last:
        return os.strerror(errno.ENOSPC)
    return None


def _size_of_last(save_dir: str) -> int:
    latest = complete_iterations(save_dir) if os.path.isdir(save_dir) else []
    if not latest:
        return 0
    entries = (manifest.read(iteration_dir(save_dir, max(latest))) or {}).get("files") or {}
    return sum(int(entry.get("size", 0)) for entry in entries.values())


def _prepare(save_dir: str, iteration: int, nonce: str) -> str:
    os.makedirs(save_dir, exist_ok=True)
    clean_debris(save_dir)
    tmp = f"{iteration_dir(save_dir, iteration)}{TMP_INFIX}{nonce}"
    os.makedirs(tmp)
    fsync_path(save_dir)
    return tmp


def _finish(save_dir: str, iteration: int, tmp: str, entries: dict, nonce: str) -> str:
    manifest.write(tmp, iteration, entries, nonce)
    final = iteration_dir(save_dir, iteration)
    old = publish_dir(tmp, final, nonce)
    atomic_write_text(os.path.join(save_dir, TRACKER_FILENAME), f"{iteration}\n", nonce)
    if old is not None:
        retire_dir(old)
    return final


def save_checkpoint(
    save_dir: str,
    iteration: int,
    model_chunks: Sequence,
    optimizer,
    scheduler,
    *,
    model_config: ModelConfig,
    parallel_config: ParallelConfig,
    consumed_train_samples: int,
    consumed_valid_samples: int = 0,
    args: Optional[dict] = None,
    no_save_optim: bool = False,
    no_save_rng: bool = False,
    sharded_strategy=None,
) -> str:
    """Save a checkpoint of `iteration` into ``save_dir/iter_NNNNNNN`` and point
    ``latest_checkpointed_iteration.txt`` at it. Call on every rank. Returns the directory.

    `model_chunks` are this rank's chunks (DDP-wrapped or bare GPTModels), `optimizer` a
    megatron-core optimizer (or None), `scheduler` an `OptimizerParamScheduler` (or None).
    `args` is the run's flags (a dict or argparse namespace, Megatron-LM's names), stored in
    the run record and, with the model, layout and position, as Megatron-LM's ``args``
    (`megatron_args`). `no_save_optim` / `no_save_rng` leave the optimizer + scheduler / RNG
    state out (Megatron-LM's ``--no-save-optim`` / ``--no-save-rng``). Saving the iteration
    that is already on disk replaces it. `sharded_strategy` replaces megatron-core's default
    torch_dist writer (e.g. `streaming.StreamingSaveStrategy` for a model built on the meta device).
    """
    if isinstance(iteration, bool) or not isinstance(iteration, int) or iteration < 0:
        raise CheckpointError(f"iteration={iteration!r} must be a non-negative integer.")
    if not model_chunks:
        raise CheckpointError("model_chunks is empty: pass this rank's model chunks.")
    save_dir = os.path.abspath(save_dir)
    contents = {
        "optimizer": optimizer is not None and not no_save_optim,
        "opt_param_scheduler": scheduler is not None and not no_save_optim,
        "rng": not no_save_rng,
    }
    rng_sharding = (rng.sharding(run_record.current_layout()["expert_model_parallel_size"])
                    if contents["rng"] else None)
    record = _dist.broadcast(run_record.build(
        model_config, parallel_config,
        iteration=iteration,
        consumed_train_samples=int(consumed_train_samples),
        consumed_valid_samples=int(consumed_valid_samples),
        contents=contents,
        optimizer=state.optimizer_description(optimizer) if contents["optimizer"] else None,
        args=args,
        rng_sharding=rng_sharding,
    ))
    # Megatron-LM's own record of the run, read by its load_checkpoint (rank 0's copy is saved).
    mlm_args = _dist.broadcast(megatron_args.build(
        model_config, parallel_config, record["layout"], flags=args, iteration=iteration,
        consumed_train_samples=int(consumed_train_samples),
        consumed_valid_samples=int(consumed_valid_samples), contents=contents))
    nonce = _dist.broadcast(uuid.uuid4().hex[:12])
    tmp = _dist.on_rank0(lambda: _prepare(save_dir, iteration, nonce))

    metadata = dict(state.SHARDING_METADATA)
    sharded = state.model_state(model_chunks, metadata)
    if contents["optimizer"]:
        sharded["optimizer"] = state.optimizer_state(optimizer, dict(sharded), metadata,
                                                     is_loading=False)
    if contents["opt_param_scheduler"]:
        sharded["opt_param_scheduler"] = scheduler.state_dict()
    if contents["rng"]:
        sharded[rng.KEY] = rng.save_request(rng_sharding)
    sharded.update(
        args=mlm_args,
        checkpoint_version=state.CHECKPOINT_VERSION,
        iteration=iteration,
        # Also at the top level, where this package's loader has always read them.
        consumed_train_samples=int(consumed_train_samples),
        consumed_valid_samples=int(consumed_valid_samples),
        run=record,
    )
    def write_record():
        path = os.path.join(tmp, RUN_RECORD_FILENAME)
        with open(path, "w") as f:
            f.write(run_record.dumps(record))

    try:
        dist_checkpointing.save(sharded, tmp, sharded_strategy=sharded_strategy,
                               content_metadata=dict(metadata))
        _dist.on_rank0(write_record)
        entries = manifest.collect_entries(tmp)
    except (Exception, CheckpointException) as error:  # torch's is a BaseException
        problem = storage_problem(error) or _probe_storage(save_dir)
        if problem is None:
            raise
        if _dist.rank() == 0:  # no collective here: the other ranks may have failed elsewhere
            remove_tree(tmp)
        last = _size_of_last(save_dir)
        raise SaveFailedError(
            f"Saving iteration {iteration} to {save_dir} failed: {problem} ("
            f"{shutil.disk_usage(save_dir).free:,} bytes free there"
            + (f"; the last checkpoint took {last:,} bytes" if last else "")
            + f"). Nothing of iteration {iteration} was kept, and "
            + last_good_checkpoint(save_dir) + ". Free space or fix the permissions, then run "
            "the same command again; or pass another --save."
        ) from None
    final = _dist.on_rank0(lambda: _finish(save_dir, iteration, tmp, entries, nonce))
    logger.info("checkpoint: saved iteration %d to %s", iteration, final)
    return final
