"""The Trainer: one `spannorm-train` run, from parsed flags to the last checkpoint.

    with Trainer(parse_args(argv)) as trainer:  # a JobConfig: every flag, path and layout checked
        trainer.setup()                           # process groups, model, optimizer, resume, data
        history = trainer.train()                 # steps, logs, evaluation, checkpoints, exits

Megatron-LM's `pretrain` order. The steps are methods (`train_step`, `evaluate`, `save`) so that a
caller can drive them itself, and `close` (also on the way out of the `with`, error or not) tears
down what `setup` made: signal handlers, TensorBoard, process groups.
"""

from __future__ import annotations

import os
import shutil
from typing import Callable, Optional

import torch
from megatron.core.num_microbatches_calculator import (
    destroy_num_microbatches_calculator,
    get_current_global_batch_size,
    get_num_microbatches,
    init_num_microbatches_calculator,
    update_num_microbatches,
)
from megatron.core.optimizer_param_scheduler import get_canonical_lr_for_logging

from spannorm_megatron.checkpoint import (
    TRACKER_FILENAME,
    CheckpointError,
    complete_iterations,
    find_latest,
    iteration_dirname,
    load_checkpoint,
    read_position,
    read_run_record,
    resolve,
    save_checkpoint,
)
from spannorm_megatron.checkpoint import rollbacks as journal
from spannorm_megatron.checkpoint.lock import SaveDirectoryLock
from spannorm_megatron.checkpoint.save import clean_debris
from spannorm_megatron.checkpoint.snapshot import Snapshot, Snapshots
from spannorm_megatron.checkpoint.state import fill_fresh_optimizer_state
from spannorm_megatron.config.checkpoint import CheckpointConfig
from spannorm_megatron.config.data import data_source_error, parse_split
from spannorm_megatron.config.job import JobConfig
from spannorm_megatron.data.dataset import (
    build_gpt_datasets,
    check_data_prefixes,
    check_sample_index_memory,
    describe_epochs,
    num_samples_for,
)
from spannorm_megatron.data.loader import build_data_iterators
from spannorm_megatron.data.tokenizer import build_tokenizer, check_data_fits_vocab
from spannorm_megatron.data.provenance import check_data_tokenizer
from spannorm_megatron.data.tokenizer_args import tokenizer_differences, tokenizer_sha256
from spannorm_megatron.errors import ConfigError, DataError
from spannorm_megatron.metrics.wandb import WandbLogger, check_wandb
from spannorm_megatron.model.fusions import describe as describe_fusions
from spannorm_megatron.model.memory_floor import check_model_fits_memory
from spannorm_megatron.model.moe_kernels import check_moe_kernels
from spannorm_megatron.model.partition import check_model_fits_layout
from spannorm_megatron.process import initialize
from spannorm_megatron.runtime import (
    check_launch,
    launch_environment,
    current_device,
    destroy,
    gather_updated_parameters,
)
from spannorm_megatron.training.checkpoint_args import check_model_matches
from spannorm_megatron.training.gpt_step import forward_step
from spannorm_megatron.training.guards import (
    ExitConditions,
    NonFiniteGuard,
    SpikeDetector,
    agree_on_any,
)
from spannorm_megatron.training.hooks import RunHooks
from spannorm_megatron.training.log_format import log_line, validation_line
from spannorm_megatron.training.loop import (
    EvaluationStopped,
    StepResult,
    ThroughputWindow,
    evaluate,
    train_step,
)
from spannorm_megatron.training.monitor import RunMonitor
from spannorm_megatron.training.preflight import check_with_megatron_core
from spannorm_megatron.training.rollback import (
    Event,
    RollbackPolicy,
    check_rollback_flags,
    extra_train_samples,
)
from spannorm_megatron.training.schedule import batch_layout, lr_scheduler, optimizer_config
from spannorm_megatron.training.setup import initialize_tp_comm_overlap, setup_model_and_optimizer


def print_rank_0(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)


def print_last_rank(message: str) -> None:
    """Losses live on the last pipeline stage; Megatron-LM logs from the last rank."""
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        print(message, flush=True)


def fused_kernels() -> str:
    """Which optional kernel libraries this process has (megatron-core falls back to PyTorch
    without them; its import-time warnings about it are filtered, see the package docstring)."""
    import importlib.util

    have = {name: importlib.util.find_spec(module) is not None
            for name, module in (("Transformer Engine", "transformer_engine"), ("Apex", "apex"))}
    return ", ".join(f"{name} {'yes' if found else 'no'}" for name, found in have.items())


def _check_room_for_checkpoints(save: str, model, data_parallel_size: int, bf16: bool) -> None:
    """Refuse a --save filesystem without room for one checkpoint now, not after hours of
    training. The estimate: the weights, plus Adam's two fp32 moments and, under bf16, the fp32
    main weights, counted once over the data-parallel replicas."""
    local = torch.tensor([sum(p.numel() for chunk in model for p in chunk.parameters()),
                          sum(p.numel() * p.element_size() for chunk in model
                              for p in chunk.parameters())],
                         dtype=torch.float64, device=current_device())
    torch.distributed.all_reduce(local)
    numel, weight_bytes = (local / data_parallel_size).tolist()
    needed = int(weight_bytes + numel * (8 + (4 if bf16 else 0)))
    existing = os.path.abspath(save)
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    free = shutil.disk_usage(existing).free
    if free < needed:
        raise ConfigError(f"--save {save}: a checkpoint of this model takes about {needed:,} "
                          f"bytes and its filesystem has {free:,} free: free space or choose "
                          f"another --save.")


def _check_same_tokenizer(job: JobConfig, sha256: Optional[str]) -> None:
    """A resume must read its data with the tokenizer it was trained with: another one of the
    same vocabulary size would load without a word and give every id another meaning
    (`tokenizer_differences`: the type, the digest of its files, NullTokenizer's --vocab-size)."""
    load = job.checkpoint.load
    if not load:
        return
    try:
        iteration = find_latest(load)
        if iteration is None:
            return
        saved = read_run_record(os.path.join(load, iteration_dirname(iteration)))["args"]
    except (CheckpointError, KeyError, TypeError):
        return  # no usable record here: the load itself reports what is wrong
    differ = tokenizer_differences(saved, job.tokenizer, sha256)
    if differ:
        files = [f"{flag} {saved[key]}" for key, flag in (
            ("tokenizer_model", "--tokenizer-model"), ("vocab_file", "--vocab-file"),
            ("merge_file", "--merge-file")) if saved.get(key)]
        was = "" if not files else f"; its file was {files[0].split(' ', 1)[1]}" \
            if len(files) == 1 else "; its files were " + ", ".join(files)
        raise ConfigError(
            f"--load {load}: the checkpoint was trained with another tokenizer ("
            + "; ".join(differ) + was + "). Pass the checkpoint's tokenizer, or start a new run "
            "in another --save directory.")


def _latest_iteration(load: Optional[str]) -> int:
    """The iteration a resume from `load` starts at, as far as the files say (0: none)."""
    if not load:
        return 0
    try:
        return find_latest(load) or 0
    except CheckpointError:
        return 0  # the load itself reports what is wrong


def _check_load_directory(checkpoint: CheckpointConfig) -> None:
    """A --load other than --save names a run to resume: one that holds no checkpoint is a
    wrong path, refused here, before any process group (`resolve` says what it holds). The same
    directory for both is how runs resume, and its first launch finds nothing yet."""
    load = checkpoint.load
    if not load or os.path.abspath(load) == os.path.abspath(checkpoint.save or ""):
        return
    if checkpoint.load_fallback and os.path.isdir(load) and complete_iterations(load):
        return  # a damaged pointer is what --load-fallback is for
    if os.path.isfile(os.path.join(load, "config.json")) and find_latest(load) is None:
        raise CheckpointError(
            f"--load {load} is a Hugging Face model folder (config.json), not a megatron "
            f"checkpoint: import it first (python tools/convert_from_hf.py --load {load} "
            f"--save CKPT), then pass --load CKPT.")
    resolve(load)


def _check_fresh_save_directory(checkpoint: CheckpointConfig) -> None:
    """A run without --load starts at iteration 0: writing it into a directory that holds
    another run's checkpoints would replace their iterations and move the pointer back."""
    save = checkpoint.save
    if not save or checkpoint.load:
        return
    held = complete_iterations(save) if os.path.isdir(save) else []
    if held or os.path.exists(os.path.join(save, TRACKER_FILENAME)):
        latest = f" (latest: iteration {max(held)})" if held else ""
        raise CheckpointError(
            f"--save {save} already holds checkpoints{latest} and this run has no --load: "
            f"it would start from iteration 0 and write over them. Pass --load {save} to "
            f"resume that run, or choose a new --save directory to start over.")


class Trainer:
    """One run of `spannorm-train` (see the module docstring)."""

    def __init__(self, job: JobConfig):
        """Check everything the user gave, before any process group work."""
        world_size = launch_environment().world_size
        training = job.training
        self.batches = batch_layout(training, job.parallel, world_size)
        # Megatron-LM sets args.train_iters from --train-samples; here the flags stay as given
        # (a TrainingConfig holds one of the two) and the run keeps its step count.
        self.train_iters = training.train_iters
        if training.train_samples is not None:
            self.train_iters = self.batches.train_iters_for(training.train_samples)
            if self.train_iters < 1:
                raise ConfigError(
                    f"--train-samples {training.train_samples} is less than one global batch "
                    f"({self.batches.global_batch_size}): train at least one step.")
            job.notices.append(f"setting training iterations to {self.train_iters}")
        if job.data is None:
            raise data_source_error(0)
        self.tokenizer = build_tokenizer(job.tokenizer)
        self.tokenizer_sha256 = tokenizer_sha256(job.tokenizer)
        _check_same_tokenizer(job, self.tokenizer_sha256)
        # The tokenizer's vocabulary, padded, is the model's: known only now.
        self.job = job = job.with_vocab_size(self.tokenizer.vocab_size)
        check_model_matches(job)
        check_model_fits_layout(job.model, job.parallel)
        launch = launch_environment()
        check_model_fits_memory(job.model, job.parallel,
                                half_precision=job.performance.bf16 or job.performance.fp16,
                                world_size=launch.world_size,
                                local_world_size=launch.local_world_size)
        job.performance.check_layout(job.parallel)
        job.performance.check_machine(job.model, job.parallel)
        job.data.check_machine(launch.local_world_size)
        job.performance.check_environment()
        cp = job.parallel.context_parallel_size
        seq_length = job.data.seq_length
        if seq_length % (2 * cp) and cp > 1:
            raise ConfigError(
                f"--seq-length {seq_length} must be divisible by 2 x --context-parallel-size"
                f" = {2 * cp}: each context-parallel rank takes two equal chunks of a sequence.")
        job.hooks.check_run(world_size, job.logging.tensorboard_dir)
        check_wandb(job)
        check_moe_kernels(job.model)
        check_launch(training.distributed_backend, job.parallel)
        for count in self.batches.microbatch_counts:
            job.parallel.check_microbatches(count)
        check_with_megatron_core(job, self.batches, self.tokenizer)
        self.num_samples = num_samples_for(self.train_iters, self.batches.global_batch_size,
                                           job.logging.eval_interval, job.logging.eval_iters,
                                           train_samples=training.train_samples)
        # Rollbacks: refused here if they cannot work; the data gets room for the batches they
        # skip, the same room at every start of the run (the journal keeps it).
        check_rollback_flags(job, self.train_iters, _latest_iteration(job.checkpoint.load))
        self.journal_dir = job.checkpoint.load or job.checkpoint.save
        recorded = journal.read_journal(self.journal_dir) if self.journal_dir else None
        self.extra_train_samples = (recorded["extra_train_samples"] if recorded else
                                    extra_train_samples(job.rollback, self.train_iters,
                                                        self.batches.global_batch_size))
        self.num_samples = (self.num_samples[0] + self.extra_train_samples,
                            *self.num_samples[1:])
        check_sample_index_memory(
            self.num_samples,
            f"--train-samples {training.train_samples}" if training.train_samples is not None
            else f"--train-iters {self.train_iters} x --global-batch-size "
                 f"{self.batches.global_batch_size}",
            f"--eval-iters {job.logging.eval_iters}, --eval-interval "
            f"{job.logging.eval_interval}")
        # The data's files, checked once, here (build_gpt_datasets in `setup` relies on it).
        prefixes = check_data_prefixes(job.data, self.num_samples, job.data.data_cache_path)
        for prefix in prefixes:  # made with this tokenizer, where the data says which
            check_data_tokenizer(prefix, job.tokenizer, self.tokenizer_sha256,
                                 self.tokenizer.vocab_size)
        check_data_fits_vocab(prefixes, self.tokenizer.vocab_size, self.tokenizer)
        _check_load_directory(job.checkpoint)
        _check_fresh_save_directory(job.checkpoint)
        latest = _latest_iteration(job.checkpoint.load)
        if not job.data.has_training_data and self.train_iters > latest:
            raise DataError(
                f"{job.data.training_data_problem()}, but --train-iters {self.train_iters} asks "
                f"for {self.train_iters - latest} training step(s): give training a share (e.g. "
                f"--split 98,2,0) or a --train-data-path (tools/evaluate.py evaluates a "
                f"checkpoint without training).")
        if (job.logging.eval_iters and job.data.blend is not None
                and parse_split(job.data.resolved_split)[1] == 0):
            job.notices.append(
                f"WARNING: --split {job.data.resolved_split} leaves nothing for validation: this "
                f"run evaluates nothing (--eval-iters 0 says so without this warning).")

        self.iteration = self.consumed_train = self.consumed_valid = 0
        self.history = {"train_loss": [], "valid_loss": [], "iterations": []}
        self.model = self.optimizer = self.scheduler = None
        self.monitor: Optional[RunMonitor] = None
        self.exits: Optional[ExitConditions] = None
        self.hooks: Optional[RunHooks] = None
        self.wandb: Optional[WandbLogger] = None
        # Steps the optimizer itself refused: fp16 loss-scale overflows (NonFiniteGuard counts
        # the ones it catches).
        self.skipped_by_optimizer = 0
        self.rollbacks = RollbackPolicy(job.rollback)
        self.snapshots = Snapshots()
        """Host snapshots, the rollback points between checkpoints (--rollback-snapshot-interval)."""
        self.resumed = False
        """Whether `setup` loaded a checkpoint."""
        self.event: Optional[Event] = None
        """An event the rollback policy answers at the end of this step."""
        self.datasets = None
        self._initialized = False
        self.save_lock: Optional[SaveDirectoryLock] = None

    # ------------------------------------------------------------------ setup and teardown
    def setup(self) -> None:
        """Process groups, model, optimizer, scheduler, checkpoint, data, monitors."""
        job, training = self.job, self.job.training
        model_cfg, parallel, performance = job.model, job.parallel, job.performance
        initialize(parallel, seed=training.seed,
                   timeout_minutes=training.distributed_timeout_minutes)
        self._initialized = True
        for notice in job.notices:
            print_rank_0(f"> {notice}")
        # megatron-core's calculator, as Megatron-LM sets it up: the step's micro-batch count
        # (and, with --rampup-batch-size, its global batch) follows the consumed samples.
        init_num_microbatches_calculator(
            torch.distributed.get_rank(), training.rampup_batch_size,
            self.batches.global_batch_size, training.micro_batch_size,
            self.batches.data_parallel_size)
        if job.checkpoint.save:
            self._lock_save_directory(job.checkpoint.save)
        if job.checkpoint.save and os.path.isdir(job.checkpoint.save):
            # What a killed save left (iter_*.tmp-*), gone before this run writes anything.
            if torch.distributed.get_rank() == 0:
                clean_debris(job.checkpoint.save)
            torch.distributed.barrier()
        initialize_tp_comm_overlap(performance, seq_length=job.data.seq_length,
                                   micro_batch_size=training.micro_batch_size,
                                   hidden_size=model_cfg.hidden_size,
                                   tensor_model_parallel_size=parallel.tensor_model_parallel_size)
        self.model, self.optimizer = setup_model_and_optimizer(
            model_cfg, parallel, optimizer_config(training, job.metrics), performance,
            calculate_per_token_loss=training.calculate_per_token_loss)
        self.scheduler = lr_scheduler(training, self.optimizer, self.batches.global_batch_size)
        self._take_course()
        if job.checkpoint.save:
            _check_room_for_checkpoints(job.checkpoint.save, self.model,
                                        self.batches.data_parallel_size,
                                        bf16=performance.bf16 or performance.fp16)
        self.iteration, self.consumed_train, self.consumed_valid = self._load()
        if self.rollbacks.course:
            print_rank_0(f"> {self.rollbacks.describe()}")
            self.consumed_train = self.rollbacks.data_position(self.iteration,
                                                               self.consumed_train)

        self.datasets = build_gpt_datasets(job.data, self.tokenizer, self.num_samples,
                                           check_prefixes=False)
        repeats = describe_epochs(self.datasets)
        if repeats is not None:
            print_rank_0(f"> {repeats}")
        self._build_data_iterators()

        batches = self.batches
        print_rank_0(f"> model: {model_cfg.norm_placement}, {model_cfg.num_layers} layers, hidden "
                     f"{model_cfg.hidden_size}, vocab {model_cfg.vocab_size}; "
                     f"{sum(p.numel() for c in self.model for p in c.parameters()):,} "
                     f"parameters on rank 0")
        print_rank_0(f"> fused kernels: {fused_kernels()}")
        print_rank_0(f"> fusions {describe_fusions(self.model[0].config, self.model)}")
        print_rank_0(f"> parallel: TP {parallel.tensor_model_parallel_size}, PP "
                     f"{parallel.pipeline_model_parallel_size}, EP "
                     f"{parallel.expert_model_parallel_size}, DP {batches.data_parallel_size}; "
                     f"{batches.num_microbatches} micro-batches of {batches.micro_batch_size} "
                     f"per step, global batch {batches.global_batch_size}")
        self.monitor = RunMonitor(
            self.model, model_cfg, seq_length=job.data.seq_length,
            global_batch_size=batches.global_batch_size,
            num_microbatches=batches.num_microbatches, log_interval=job.logging.log_interval,
            tensorboard_dir=job.logging.tensorboard_dir, dtype=performance.params_dtype,
            recompute=performance.recompute_granularity,
            collapse_grad_ratio=job.logging.collapse_grad_ratio,
            metrics=job.metrics)
        self.monitor.write_config({"args": job.recorded_args(), "model": model_cfg.to_dict(),
                                   "parallel": vars(parallel)})
        self.guard = NonFiniteGuard(self.model, training.max_skipped_iterations,
                                    job.logging.log_interval, job.checkpoint.save)
        self.spikes = SpikeDetector(training.loss_spike_factor, training.loss_spike_window)
        self.exits = ExitConditions(training.exit_duration_in_mins)
        self.hooks = RunHooks(job.hooks, job.logging.tensorboard_dir)
        self.wandb = WandbLogger.create(job)
        if self.wandb is not None:
            self.monitor.writer = self.wandb.mirror(self.monitor.writer)

    def _build_data_iterators(self) -> None:
        """The training and validation iterators at the current data position."""
        job = self.job
        self.train_iter, self.valid_iter, _ = build_data_iterators(
            self.datasets, job.training.micro_batch_size, self.consumed_train,
            self.consumed_valid, num_workers=job.data.num_workers, device=current_device())
        if job.logging.eval_iters == 0:  # Megatron-LM's way of turning evaluation off
            self.valid_iter = None

    def _take_course(self) -> None:
        """The rollback journal's course, before anything is loaded: a rollback that a crash
        interrupted is finished first (checkpoint.rollbacks), and the scheduler follows what
        the rollbacks set, with the policy or without."""
        job, where = self.job, self.journal_dir
        if not where:
            return
        same = os.path.abspath(where) == os.path.abspath(job.checkpoint.save or "")
        if same and job.rollback.enabled:
            journal.on_rank0(lambda: journal.create_journal(where, self.extra_train_samples))
        recorded = (journal.on_rank0(lambda: journal.finish_pending(where)) if same
                    else journal.on_rank0(lambda: journal.read_journal(where)))
        self.rollbacks = RollbackPolicy(job.rollback, recorded["rollbacks"] if recorded else [])
        self.scheduler.lr_multiplier = self.rollbacks.lr_multiplier

    def _lock_save_directory(self, save: str) -> None:
        """One run per --save (checkpoint/lock.py): rank 0 takes the lock and every rank hears
        whether it got it, so that all stop with the same message if another run holds it."""
        refused = ""
        if torch.distributed.get_rank() == 0:
            try:
                self.save_lock = SaveDirectoryLock(save).acquire()
                if self.save_lock.unprotected:
                    print_rank_0(f"> WARNING: {self.save_lock.unprotected}: a second run on "
                                 f"--save {save} would not be refused.")
            except CheckpointError as error:
                refused = str(error)
        flag = torch.tensor([float(bool(refused))], device=current_device())
        torch.distributed.all_reduce(flag)  # rank 0 alone says why (cli.report_failure)
        if flag.item():
            raise CheckpointError(refused or f"--save {save} is in use by another run (rank 0 "
                                             f"names it).")

    def close(self) -> None:
        """Undo `setup` (whatever of it ran): profiler, garbage collector, signal handlers,
        TensorBoard, W&B, process groups, the --save lock."""
        if self.hooks is not None:
            self.hooks.close()
            self.hooks = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.exits is not None:
            self.exits.close()
            self.exits = None
        if self.monitor is not None:
            self.monitor.close()
            self.monitor = None
        if self._initialized:
            destroy_num_microbatches_calculator()
            destroy()
        if self.save_lock is not None:
            self.save_lock.release()
            self.save_lock = None
            self._initialized = False

    def __enter__(self) -> "Trainer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ------------------------------------------------------------------ steps
    def forward_step_for(self, iteration: int) -> Callable:
        """The forward step of `iteration` (1-based): megatron-core's schedules call it per
        micro-batch. Fault-injection tests override it."""
        return forward_step

    def train_step(self) -> StepResult:
        """One optimizer step, with the non-finite guard, skip accounting and spike check."""
        job, guard = self.job, self.guard
        self.monitor.begin_step(self.iteration + 1)
        update_num_microbatches(self.consumed_train, consistency_check=True)
        global_batch_size = get_current_global_batch_size()
        # Under dynamic loss scaling an overflow is the scaler's signal, as in Megatron-LM: the
        # optimizer skips the step and lowers the scale, and the guard stays out of it.
        result = train_step(self.model, self.optimizer, self.scheduler, self.train_iter,
                            num_microbatches=get_num_microbatches(),
                            seq_length=job.data.seq_length,
                            micro_batch_size=job.training.micro_batch_size,
                            global_batch_size=global_batch_size,
                            monitor=self.monitor,
                            guard=None if job.performance.dynamic_loss_scaling else guard,
                            forward_step_func=self.forward_step_for(self.iteration + 1),
                            empty_cache_level=job.hooks.empty_unused_memory_level)
        self.iteration += 1
        if result.skipped and result.bad_layer is None:
            self.skipped_by_optimizer += 1
        self.consumed_train += global_batch_size
        self.history["train_loss"].append(result.loss)
        self.history["iterations"].append(self.iteration)
        if result.bad_layer is not None:
            where = ("only outside the layers" if result.bad_layer == 0
                     else f"lowest layer: {result.bad_layer}")
            print_rank_0(f" iteration {self.iteration}: non-finite gradients ({where}); update "
                         f"skipped ({guard.in_a_row + 1} in a row, {guard.total + 1} in all)")
        self.monitor.record_skipped(self.iteration, self.skipped_total
                                    + int(result.bad_layer is not None))
        guard.record(result.bad_layer, self.iteration, skipped=result.skipped, loss=result.loss)
        spike_median = self.spikes.check(result.loss)
        if spike_median is not None:
            print_rank_0(f" loss spike at iteration {self.iteration}: lm loss {result.loss:.4f} > "
                         f"{job.training.loss_spike_factor} x running median {spike_median:.4f}")
        if job.rollback.on_loss_spike == "rollback" and agree_on_any(spike_median is not None):
            self.event = self.rollbacks.on_spike(self.iteration)
        return result

    def evaluate(self) -> Optional[float]:
        """Validation loss over --eval-iters batches, logged as Megatron-LM logs it; None when
        an exit condition (SIGTERM, the time budget) stopped it between two batches."""
        job = self.job
        try:
            loss = evaluate(self.model, self.valid_iter, job.logging.eval_iters,
                            num_microbatches=self.batches.num_microbatches,
                            seq_length=job.data.seq_length,
                            micro_batch_size=job.training.micro_batch_size,
                            empty_cache_level=job.hooks.empty_unused_memory_level,
                            should_stop=self.exits.reason if self.exits is not None else None)
        except EvaluationStopped as stopped:
            self.consumed_valid += stopped.done * self.batches.global_batch_size
            print_rank_0(f" validation at iteration {self.iteration} stopped after "
                         f"{stopped.done} of {job.logging.eval_iters} iterations "
                         f"({stopped.reason}): no validation loss")
            return None
        self.consumed_valid += job.logging.eval_iters * self.batches.global_batch_size
        self.monitor.log_validation(self.iteration, loss, self.consumed_train)
        self.history["valid_loss"].append(loss)
        print_last_rank(validation_line(self.iteration, loss))
        return loss

    def save(self) -> None:
        """A checkpoint of this iteration under --save (nothing without --save)."""
        job = self.job
        if not job.checkpoint.save:
            return
        gather_updated_parameters(self.model)
        self.guard.check_weights(self.iteration)  # never a checkpoint of NaN/Inf weights
        path = save_checkpoint(
            job.checkpoint.save, self.iteration, self.model, self.optimizer, self.scheduler,
            model_config=job.model, parallel_config=job.parallel,
            consumed_train_samples=self.consumed_train,
            consumed_valid_samples=self.consumed_valid,
            args=dict(job.recorded_args(), tokenizer_sha256=self.tokenizer_sha256,
                      global_batch_size=self.batches.global_batch_size,
                      micro_batch_size=self.batches.micro_batch_size,
                      rollbacks=self.rollbacks.course))
        print_rank_0(f"  successfully saved checkpoint at iteration {self.iteration:7d} to "
                     f"{path}")

    def take_snapshot(self) -> None:
        """A host snapshot of this rank's state at this iteration (checkpoint.snapshot)."""
        self.snapshots.add(Snapshot.take(
            self.model, self.optimizer, self.scheduler, iteration=self.iteration,
            consumed_train_samples=self.consumed_train,
            consumed_valid_samples=self.consumed_valid, course=self.rollbacks.course))

    # ------------------------------------------------------------------ the loop
    def train(self) -> dict:
        """Steps until --train-iters (or an exit condition), then the final evaluation and
        checkpoint. Returns the history of losses."""
        job = self.job
        every = lambda interval: bool(interval) and self.iteration % interval == 0  # noqa: E731
        window = ThroughputWindow()
        if self.job.rollback.enabled and self.iteration == 0 and not self.resumed:
            # The rollback point of an event that begins in the first iterations, with the
            # optimizer state Adam starts from (its moments exist only after a step).
            fill_fresh_optimizer_state(self.optimizer)
            self.save()
        self.hooks.start()
        while self.iteration < self.train_iters:
            self.hooks.before_step(self.iteration)
            result = self.train_step()
            window.step_done()
            self.hooks.after_step(self.iteration)
            prints = self.monitor.is_log_step(self.iteration) or self.iteration == self.train_iters
            self._log(result, window.seconds_per_iteration() if prints else None)
            if self.event is not None:
                self.roll_back(self.event)
                window.exclude_since_last_step()
                continue
            if self.iteration == self.train_iters:
                self.guard.check_last_window(self.iteration)
            if self.valid_iter is not None and every(job.logging.eval_interval):
                self.hooks.before_evaluation()
                self.evaluate()
                self.hooks.after_evaluation()
                window.exclude_since_last_step()
            if every(job.checkpoint.save_interval):
                self.save()
                window.exclude_since_last_step()
            elif every(job.rollback.rollback_snapshot_interval):
                self.take_snapshot()  # where a checkpoint would be saved: the same state
                window.exclude_since_last_step()
            reason = self.exits.reason()
            if reason is None and every(job.training.exit_interval):
                reason = "--exit-interval"
            if reason is not None:
                self.guard.check_last_window(self.iteration)
                if not every(job.checkpoint.save_interval):
                    self.save()
                print_rank_0(f"exiting program at iteration {self.iteration} ({reason})")
                return self.history
        if not every(job.checkpoint.save_interval):
            self.save()
        if self.valid_iter is not None and not every(job.logging.eval_interval):
            self.evaluate()
        return self.history

    @property
    def skipped_total(self) -> int:
        """Steps without an update so far: non-finite gradients and loss-scale overflows."""
        return self.guard.total + self.skipped_by_optimizer

    def _log(self, result: StepResult, seconds: Optional[float]) -> None:
        """Every iteration: TensorBoard (monitor.end_step, collectives on every rank) and, when
        `seconds` (the log window's time per iteration) is given, the log line."""
        global_batch_size = get_current_global_batch_size()
        # Megatron-LM logs the learning rate after the scheduler's update.
        learning_rate = get_canonical_lr_for_logging(self.optimizer.param_groups)
        if learning_rate is None:
            learning_rate = self.optimizer.param_groups[0]["lr"]
        loss_scale = float(self.optimizer.get_loss_scale())
        report = self.monitor.end_step(self.iteration, result,
                                       consumed_samples=self.consumed_train,
                                       learning_rate=learning_rate,
                                       loss_scale=loss_scale,
                                       seconds_per_step=seconds,
                                       global_batch_size=global_batch_size)
        if seconds is not None:
            tokens_per_second = global_batch_size * self.job.data.seq_length / seconds
            print_last_rank(log_line(
                self.iteration, self.train_iters, self.consumed_train, seconds, result,
                global_batch_size, tokens_per_second, self.monitor.mfu(seconds),
                self.skipped_total, learning_rate=learning_rate, loss_scale=loss_scale,
                tflops=self.monitor.throughput_tflops(seconds) if self.job.metrics.log_throughput
                else None, num_zeros=report.num_zeros, params_norm=report.params_norm))
        if report.alarm is not None:
            print_rank_0(f" WARNING: {report.alarm}")
            self.event = self.event or self.rollbacks.on_collapse(self.monitor.collapse.fired)

    # ------------------------------------------------------------------ rollback
    def roll_back(self, event: Event) -> None:
        """Go back to the newest checkpoint (or host snapshot) before `event` began and on from
        there on the course the rollback sets (training.rollback; the journal entry first, so
        that a crash half-way is finished at the next start). Every rank, the same decision."""
        save = self.job.checkpoint.save
        self.event = None

        def position_of(iteration: int) -> dict:
            snapshot = self.snapshots.at(iteration)
            return snapshot.position if snapshot else read_position(save, iteration)

        entry = self.rollbacks.plan(
            event, journal.on_rank0(lambda: complete_iterations(save)), position_of,
            self.consumed_train, get_current_global_batch_size(),
            self.scheduler.lr_warmup_steps, snapshots=self.snapshots.iterations())
        message = self.rollbacks.message(entry)
        print_rank_0(f" WARNING: {message}")
        if entry["source"] == "snapshot":
            # The snapshot becomes the checkpoint of its iteration, so that the journal's steps,
            # a crash between them and every later start find the point on disk as they would
            # find a checkpoint (a crash before this save completes leaves the old course and
            # no journal entry: the next start trains to the event again).
            snapshot = self.snapshots.at(entry["point"])
            snapshot.restore(self.model, self.optimizer, self.scheduler)
            self.iteration = snapshot.iteration
            self.consumed_train = snapshot.consumed_train_samples
            self.consumed_valid = snapshot.consumed_valid_samples
            self.save()
        journal.on_rank0(lambda: journal.begin_rollback(save, entry))
        self.rollbacks.follow(entry)
        if entry["source"] == "snapshot":
            self.scheduler.step(increment=0)  # the learning rate of the new course
            where = f"the host snapshot of iteration {self.iteration}"
        else:
            self.scheduler.num_steps = 0  # the load adds the checkpoint's step count to it
            state = self._load_iteration(save, entry["point"], whole=True)
            self.consumed_valid = state["consumed_valid_samples"]
            where = state["checkpoint_dir"]
        journal.on_rank0(lambda: journal.finish_pending(save))
        self.snapshots.drop_after(entry["point"])  # the abandoned course's
        self.iteration = entry["point"]
        self.consumed_train = entry["skipped_samples"][1]
        self._build_data_iterators()
        self.monitor.collapse.rewind(self.iteration)
        self.spikes = SpikeDetector(self.job.training.loss_spike_factor,
                                    self.job.training.loss_spike_window)
        for iteration, loss in zip(self.history["iterations"], self.history["train_loss"]):
            if iteration <= self.iteration:  # the losses of the course it goes on with
                self.spikes.check(loss)
        self.guard.in_a_row = 0
        self.monitor.writer.log_rollback(event.iteration, self.rollbacks.scalars(entry), message)
        print_rank_0(f"  rolled back to iteration {self.iteration} ({where}); the data goes on "
                     f"from sample {self.consumed_train}")

    # ------------------------------------------------------------------ resume
    def _load(self):
        """(iteration, consumed train samples, consumed valid samples) to start from."""
        checkpoint = self.job.checkpoint
        load = checkpoint.load
        if not load:
            return 0, 0, 0
        try:
            nothing_there = find_latest(load) is None
        except CheckpointError:
            if not checkpoint.load_fallback:
                raise
            nothing_there = not complete_iterations(load)
        if nothing_there:
            _check_load_directory(checkpoint)  # another directory emptied since __init__
            print_rank_0(f"> no checkpoint in {load} yet: starting from iteration 0")
            return 0, 0, 0

        # The pointer's checkpoint first; with --load-fallback, then every earlier complete one.
        attempts = [None]
        if checkpoint.load_fallback:
            attempts += sorted(complete_iterations(load), reverse=True)
        for attempt in attempts:
            try:
                state = self._load_iteration(load, attempt)
                break
            except CheckpointError as error:
                if not checkpoint.load_fallback or attempt == attempts[-1]:
                    raise
                which = "the latest checkpoint" if attempt is None else f"iteration {attempt}"
                print_rank_0(f"> --load-fallback: skipping {which} ({error})")
        print_rank_0(f"  successfully loaded checkpoint from {state['checkpoint_dir']} at "
                     f"iteration {state['iteration']}")
        self.resumed = True
        if checkpoint.no_load_optim and state["iteration"]:
            # As in Megatron-LM, the scheduler's state goes with the optimizer's: said, not silent.
            print_rank_0(f"> --no-load-optim: the optimizer and the learning-rate schedule start "
                         f"afresh (warm-up and decay from step 0) while the iteration count goes "
                         f"on from {state['iteration']}, as Megatron-LM does.")
        return (state["iteration"], state["consumed_train_samples"],
                state["consumed_valid_samples"])

    def _load_iteration(self, load: str, iteration: Optional[int], whole: bool = False) -> dict:
        """Checkpoint `iteration` of `load` (None: the pointer's) into model, optimizer,
        scheduler and RNG, as the flags say; `whole` (a rollback: this run's own state, as it
        was) loads everything whatever --no-load-optim / --no-load-rng say."""
        checkpoint, training = self.job.checkpoint, self.job.training
        return load_checkpoint(load, self.model, self.optimizer, self.scheduler,
                               model_config=self.job.model, parallel_config=self.job.parallel,
                               iteration=iteration,
                               no_load_optim=checkpoint.no_load_optim and not whole,
                               no_load_rng=checkpoint.no_load_rng and not whole,
                               check_scheduler=not (training.override_opt_param_scheduler
                                                    or training.use_checkpoint_opt_param_scheduler),
                               global_batch_size=self.batches.global_batch_size)
