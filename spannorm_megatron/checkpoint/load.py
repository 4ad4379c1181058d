"""`load_checkpoint`: resume (or start a fine-tune) from a checkpoint, under any parallel layout.

Everything that can be checked is checked before the model, optimizer, scheduler or RNG are
touched, and identically on every rank (rank 0 reads, all ranks see the same answer, so no rank
is left waiting in a collective while another raises):

1. which directory (pointer file / explicit iteration / newest complete), and that it is
   complete (``manifest.json``);
2. that the saved `ModelConfig` describes the same architecture as the current one;
3. that every file is present with its recorded size and checksum;
4. that every tensor and object this rank is about to request exists in the checkpoint.

Only then does megatron-core's ``dist_checkpointing.load`` read the shards this layout needs
and the state is applied: model, optimizer (its own ``load_state_dict``, which for the
distributed optimizer re-flattens the fully reshardable tensors into this rank's shard; on
the torch-Adam path that needs ``patches/distopt_step_load.py``, applied by
``process.initialize``), scheduler, and last the RNG states. Loading never writes to the checkpoint directory.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Sequence

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import (
    LocalNonpersistentObject,
    ShardedBase,
    ShardedTensor,
)
from megatron.core.dist_checkpointing.serialization import load_sharded_metadata
from megatron.core.dist_checkpointing.state_dict_utils import load_preprocess

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.runtime import current_device

from . import _dist, manifest, rng, run_record, state, tracker
from .errors import CheckpointError
from .naming import RUN_RECORD_FILENAME, TRACKER_FILENAME

logger = logging.getLogger(__name__)


def read_run_record(directory: str) -> dict:
    """The run record of a checkpoint.

    `directory` is a checkpoint directory (``iter_NNNNNNN``) or a save directory, in which case
    the checkpoint `load_checkpoint` would resume from is read.
    """
    directory = os.path.abspath(directory)
    if manifest.is_complete(directory):
        return run_record.read_file(directory)
    if os.path.isfile(os.path.join(directory, RUN_RECORD_FILENAME)):
        raise CheckpointError(
            f"{directory} is incomplete (no {manifest.MANIFEST_FILENAME}: the save that wrote it "
            f"did not finish); read another iteration."
        )
    _iteration, path = tracker.resolve(directory)
    return run_record.read_file(path)


def _requested_keys(sharded: dict) -> dict:
    """{checkpoint key: top-level entry} of every ShardedTensor/ShardedObject in `sharded`
    (after megatron-core's factories are applied, without modifying `sharded`)."""
    keys = {}
    for top, value in sharded.items():
        if not isinstance(value, (dict, list, ShardedBase)):
            continue
        preprocessed, _nonpersistent, _factories = load_preprocess({top: value})
        for item in nested_values(preprocessed):
            if isinstance(item, ShardedBase):
                keys[item.key] = top
    return keys


def _check_keys(sharded: dict, path: str, strict: bool, model_keys: list) -> dict:
    """Compare what this rank requests with what the checkpoint holds (collective).

    strict: any requested key the checkpoint lacks raises (on every rank). Not strict: such
    model tensors are dropped from the request (they keep their current values) and such
    optimizer tensors are replaced by fresh state (the parameter's current value, zero
    moments), as for a parameter the optimizer has never stepped; all of it is logged.
    """
    available = {item.key for item in load_sharded_metadata(path).values()}
    requested = _requested_keys(sharded)
    absent = sorted(set(requested) - available)
    # Transformer Engine modules carry `_extra_state` (FP8 scaling history) that local, CPU-made
    # and HF-imported checkpoints lack; TE starts such state afresh, so it is never required.
    optional = {key for key in absent if _is_optional(key)}
    absent = [key for key in absent if key not in optional]
    everyone = sorted({key for part in _dist.all_gather(absent) for key in part})
    if optional:
        sharded = _without(sharded, optional, {})
    if not everyone:
        return sharded
    if strict:
        shown = ", ".join(everyone[:12]) + (f" and {len(everyone) - 12} more"
                                            if len(everyone) > 12 else "")
        raise CheckpointError(
            f"{path} lacks {len(everyone)} tensor(s) this model needs: {shown}. The model or "
            f"optimizer differs from the one saved: build the model as saved (--use-checkpoint-"
            f"args, or the flags in {os.path.join(path, RUN_RECORD_FILENAME)}), or, when only "
            f"the optimizer differs, start it afresh with --no-load-optim (from Python: "
            f"strict=False keeps the current values of what is missing)."
        )
    _warn("%s lacks %d tensor(s); keeping their current values (fresh optimizer state): %s",
          path, len(everyone), everyone)
    model_data = {item.key: item.data for key in model_keys
                  for item in nested_values(sharded[key])
                  if isinstance(item, ShardedTensor) and item.flattened_range is None}
    return _without(sharded, set(absent), model_data)


_OPTIMIZER_PREFIX = "optimizer.state."
_OPTIONAL_SUFFIX = "_extra_state"


def _is_optional(key: str) -> bool:
    return key.endswith(_OPTIONAL_SUFFIX)


def _load_module(module, state_dict: dict, strict: bool, path: str) -> None:
    """`module.load_state_dict`, with absent `*_extra_state` entries allowed (see _check_keys)."""
    missing, unexpected = module.load_state_dict(state_dict, strict=False)
    missing = [key for key in missing if not _is_optional(key)]
    if strict and (missing or unexpected):
        raise CheckpointError(
            f"{path} does not fit this model: missing {missing[:8]}, unexpected "
            f"{unexpected[:8]}. Load with the saved configuration (see "
            f"{os.path.join(path, RUN_RECORD_FILENAME)}).")


def _without(value, absent: set, model_data: dict):
    """`value` with the sharded entries whose keys are `absent` dropped (model) or replaced by
    fresh optimizer state (see `_check_keys`)."""
    if isinstance(value, ShardedBase):
        if value.key not in absent:
            return value
        if isinstance(value, ShardedTensor) and value.key.startswith(_OPTIMIZER_PREFIX):
            name, _, model_key = value.key[len(_OPTIMIZER_PREFIX):].partition(".")
            current = model_data.get(model_key)
            if name in ("param", "fp32_param") and current is not None:
                data = current.detach().clone().to(value.dtype)
            else:
                data = torch.zeros(value.local_shape, dtype=value.dtype, device=current_device())
            return LocalNonpersistentObject(data)
        return _DROP
    if isinstance(value, dict):
        kept = {k: _without(v, absent, model_data) for k, v in value.items()}
        return {k: v for k, v in kept.items() if v is not _DROP}
    if isinstance(value, list):
        return [_without(v, absent, model_data) for v in value]
    return value


_DROP = object()


def _read(path: str, model_chunks, optimizer, load_rng: Optional[str], strict: bool):
    """Build this rank's request (model chunks, optimizer if given, RNG sharded as `load_rng`
    says, or none), check its keys against the checkpoint, and read it. Returns (loaded state,
    the model chunks' keys in it)."""
    metadata = dist_checkpointing.load_content_metadata(path) or dict(state.SHARDING_METADATA)
    request = state.model_state(model_chunks, metadata)
    model_keys = list(request)
    if optimizer is not None:
        request["optimizer"] = state.optimizer_state(optimizer, dict(request), metadata,
                                                     is_loading=True)
    if load_rng:
        request[rng.KEY] = rng.load_request(load_rng)
    request = _check_keys(request, path, strict, model_keys)
    try:
        loaded = dist_checkpointing.load(request, path)
    except Exception as err:
        raise CheckpointError(f"Reading {path} failed: {type(err).__name__}: {err}") from err
    return loaded, model_keys


def _warn(message: str, *args) -> None:
    """Log once per job, not once per rank (every rank reaches the same conclusion)."""
    if _dist.rank() == 0:
        logger.warning("checkpoint: " + message, *args)


def _check_model(record: dict, path: str, model_config: ModelConfig, strict: bool) -> None:
    """Refuse (strict) or log a checkpoint of a different architecture."""
    where = os.path.join(path, RUN_RECORD_FILENAME)
    architecture, other = run_record.compare(run_record.saved_model_config(record, where),
                                             model_config)
    if architecture:
        message = (f"{path} holds a different model: "
                   f"{run_record.format_differences(architecture)} (from {where}).")
        if strict:
            raise CheckpointError(
                message + " Build the model with the checkpoint's configuration "
                "(--use-checkpoint-args), or pick a checkpoint of this model (from Python: "
                "strict=False loads what fits anyway).")
        _warn("%s Loading anyway (strict=False).", message)
    if other and _dist.rank() == 0:
        logger.info("checkpoint: settings changed since the save: %s",
                    run_record.format_differences(other))


def _plan(record: dict, path: str, optimizer, scheduler, *, load_optim: bool,
          load_rng: bool):
    """(load optimizer, load scheduler, load RNG): what was asked for, what the checkpoint
    holds and what this layout can take. Raises when the optimizer state cannot be used."""
    contents = record.get("contents", {})
    saved = record.get("optimizer") or {}
    if load_optim:
        current = state.optimizer_description(optimizer)
        if not contents.get("optimizer"):
            raise CheckpointError(
                f"{path} was saved without optimizer state (no_save_optim): pass "
                f"no_load_optim=True (or finetune=True) to load the weights into a fresh "
                f"optimizer."
            )
        if saved.get("kind") != current["kind"]:
            raise CheckpointError(
                f"{path} holds {saved.get('kind')} optimizer state, this run uses the "
                f"{current['kind']} optimizer (use_distributed_optimizer differs); their "
                f"non-tensor state is not interchangeable. Resume with the saved "
                f"use_distributed_optimizer, or pass no_load_optim=True to load the weights into "
                f"a fresh optimizer."
            )
        if current["kind"] == "local" and saved.get("chained") != current["chained"]:
            raise CheckpointError(
                f"{path} was saved with {saved.get('chained')} chained optimizer(s) (dense / "
                f"expert-parallel groups), this run has {current['chained']} (expert "
                f"parallelism switched between 1 and > 1). With use_distributed_optimizer=False "
                f"that state cannot be regrouped: resume with the distributed optimizer, keep "
                f"EP = 1 or EP > 1 as saved, or pass no_load_optim=True."
            )
    load_scheduler = load_optim and scheduler is not None
    if load_scheduler and not contents.get("opt_param_scheduler"):
        _warn("%s has no scheduler state; the scheduler starts fresh", path)
        load_scheduler = False
    if load_rng and not contents.get("rng"):
        _warn("%s was saved without RNG state; keeping this run's", path)
        load_rng = False
    if load_rng:
        load_rng, reason = rng.restorable(record, run_record.current_layout())
        if reason:
            _warn("%s", reason)
    return load_optim, load_scheduler, load_rng


_SCHEDULE_FLAGS = {
    "max_lr": "--lr", "min_lr": "--min-lr", "lr_warmup_steps": "--lr-warmup-iters",
    "lr_decay_steps": "--lr-decay-iters", "lr_decay_style": "--lr-decay-style",
    "wsd_decay_steps": "--lr-wsd-decay-iters", "start_wd": "--weight-decay",
    "end_wd": "--weight-decay",
}


# The schedule's lengths: in samples, iterations x --global-batch-size under --train-iters.
_SCHEDULE_LENGTHS = ("lr_warmup_steps", "lr_decay_steps", "wsd_decay_steps")


def _check_scheduler(scheduler, saved: dict, path: str, saved_batch: Optional[int],
                     batch: Optional[int]) -> None:
    """Refuse a learning-rate schedule that disagrees with the checkpoint's, as Megatron-LM does
    by default. megatron-core's own default keeps the checkpoint's values without a word, which
    after a longer --train-iters can mean training on at the old schedule's final rate.

    Megatron-LM counts the schedule in samples (iterations x global batch): another
    --global-batch-size (`batch`, the checkpoint's `saved_batch`) changes every length given in
    iterations, and is named as the cause of the lengths it explains."""
    differ = {key: f"{flag} ({key}: checkpoint {saved[key]!r}, this run "
                   f"{getattr(scheduler, key)!r})"
              for key, flag in _SCHEDULE_FLAGS.items()
              if key in saved and saved[key] != getattr(scheduler, key, saved[key])}
    if not differ:
        return
    # A setting, not damage: --load-fallback must not try older checkpoints for it.
    choices = ("pass --override-opt-param-scheduler to take this run's (the step count "
               "continues), or --use-checkpoint-opt-param-scheduler to keep the checkpoint's.")
    by_batch = [key for key in _SCHEDULE_LENGTHS if key in differ and saved_batch and batch
                and saved_batch != batch and saved[key] is not None
                and saved[key] * batch == getattr(scheduler, key) * saved_batch]
    if by_batch:
        others = [text for key, text in differ.items() if key not in by_batch]
        lengths = "; ".join(f"{key} {saved[key]} -> {getattr(scheduler, key)}"
                            for key in by_batch)
        raise ConfigError(
            f"{path}: --global-batch-size {batch} differs from the checkpoint's {saved_batch}. "
            f"The learning-rate schedule counts samples (iterations x global batch, as in "
            f"Megatron-LM), so the lengths given in iterations changed with it ({lengths} "
            f"samples)" + (f"; also {'; '.join(others)}" if others else "") + ". Resume with "
            f"--global-batch-size {saved_batch}, or " + choices)
    raise ConfigError(
        f"{path}: this run's learning-rate schedule differs from the checkpoint's (steps "
        f"count samples): {'; '.join(differ.values())}. Resume with the checkpoint's values, "
        f"or " + choices)


def read_position(load_dir: str, iteration: int) -> dict:
    """Where checkpoint `iteration` of `load_dir` stands, read from its common state without
    loading it (call on every rank; rank 0 reads): dict(consumed_train_samples,
    scheduler_steps), the latter None when it holds no scheduler."""
    def read():
        _, path = tracker.resolve(os.path.abspath(load_dir), iteration)
        common = dist_checkpointing.load_common_state_dict(path)
        scheduler = common.get("opt_param_scheduler") or {}
        steps = scheduler.get("num_steps", scheduler.get("num_iters"))
        return {"consumed_train_samples": int(common.get("consumed_train_samples", 0)),
                "scheduler_steps": None if steps is None else int(steps)}

    return _dist.on_rank0(read)


def load_checkpoint(
    load_dir: str,
    model_chunks: Sequence,
    optimizer,
    scheduler,
    *,
    model_config: ModelConfig,
    parallel_config: ParallelConfig,
    iteration: Optional[int] = None,
    finetune: bool = False,
    no_load_optim: bool = False,
    no_load_rng: bool = False,
    strict: bool = True,
    verify_checksums: bool = True,
    check_scheduler: bool = True,
    global_batch_size: Optional[int] = None,
) -> dict:
    """Load a checkpoint from `load_dir` (a save directory) into this rank's model chunks,
    optimizer and scheduler. Call on every rank.

    The checkpoint may come from any TP / PP / VPP / EP / DP layout. `iteration` picks one
    (default: the pointer file's). `finetune` loads the weights only and restarts the
    position at 0 (Megatron-LM's ``--finetune``); `no_load_optim` skips optimizer and scheduler,
    `no_load_rng` the RNG states. `strict=False` accepts architecture differences (logged) and
    keeps the current values of tensors the checkpoint lacks. `verify_checksums=False` checks
    file sizes only (skips reading the checkpoint once more). `global_batch_size` is this run's,
    for the scheduler check to name a changed one as the cause of changed schedule lengths.

    Returns dict(iteration, consumed_train_samples, consumed_valid_samples, run_record,
    checkpoint_dir, loaded_optimizer, loaded_rng). Raises CheckpointError, before anything is
    modified, when there is nothing (complete) to load, the checkpoint is damaged, or it holds
    a different model.
    """
    load_dir = os.path.abspath(load_dir)
    iteration, path = _dist.on_rank0(lambda: tracker.resolve(load_dir, iteration))
    record, files = _dist.on_rank0(lambda: (run_record.read_file(path), manifest.read(path)))
    if files is None:  # removed between the two reads
        raise CheckpointError(f"{path} lost its {manifest.MANIFEST_FILENAME} while loading.")
    _check_model(record, path, model_config, strict)
    bad = manifest.problems(path, files, checksums=verify_checksums)
    if bad:
        raise CheckpointError(
            f"{path} is damaged, nothing was loaded: " + "; ".join(bad[:8])
            + (f"; and {len(bad) - 8} more" if len(bad) > 8 else "")
            + ". Load another iteration: --load-fallback goes back to the newest intact one, "
            f"or write its number into {TRACKER_FILENAME} (from Python: iteration=)."
        )
    load_optim, load_scheduler, load_rng = _plan(
        record, path, optimizer, scheduler,
        load_optim=optimizer is not None and not finetune and not no_load_optim,
        load_rng=not finetune and not no_load_rng)
    saved_optimizer = record.get("optimizer") or {}

    rng_sharding = record.get("rng_sharding") or rng.PP_TP  # older records: always (pp, tp)
    loaded, model_keys = _read(path, model_chunks, optimizer if load_optim else None,
                               rng_sharding if load_rng else None, strict)
    if load_scheduler and check_scheduler:
        _check_scheduler(scheduler, loaded["opt_param_scheduler"], path,
                         (record.get("args") or {}).get("global_batch_size"), global_batch_size)
    for key, chunk in zip(model_keys, model_chunks, strict=True):
        _load_module(state.unwrap(chunk), loaded[key], strict, path)
    if load_optim:
        optimizer_state = loaded["optimizer"]
        if saved_optimizer.get("chained") != len(state.inner_optimizers(optimizer)):
            optimizer_state = state.regroup_optimizer_state(
                optimizer_state, dist_checkpointing.load_common_state_dict(path)["optimizer"],
                saved_optimizer["chained"], optimizer)
        state.restore_zero_steps(optimizer_state)  # a checkpoint of iteration 0
        optimizer.load_state_dict(optimizer_state)
    if not load_optim and optimizer is not None:
        # Main (fp32) copies of the weights must follow the freshly loaded model weights.
        optimizer.reload_model_params()
    if load_scheduler:
        scheduler.load_state_dict(loaded["opt_param_scheduler"])
    if load_rng:
        rng.restore(loaded[rng.KEY], rng_sharding)
    _dist.barrier()

    logger.info("checkpoint: loaded iteration %d from %s", iteration, path)
    return {
        "iteration": 0 if finetune else int(loaded.get("iteration", iteration)),
        "consumed_train_samples": 0 if finetune else int(loaded.get("consumed_train_samples", 0)),
        "consumed_valid_samples": 0 if finetune else int(loaded.get("consumed_valid_samples", 0)),
        "run_record": record,
        "checkpoint_dir": path,
        "loaded_optimizer": load_optim,
        "loaded_rng": load_rng,
    }
