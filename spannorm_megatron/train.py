"""`spannorm-train` / `python -m spannorm_megatron.train`: pretrain a GPT model with megatron-core.

    torchrun --nproc_per_node 2 -m spannorm_megatron.train --config examples/configs/tiny.yaml \
        --data-path data/corpus_text_document --tokenizer-model data/tokenizer.model \
        --save runs/tiny --tensorboard-dir runs/tiny/tb

Order of work: every flag, data path and layout is checked before any process group exists;
then process groups, model, optimizer, scheduler, checkpoint, data; then the loop (train step,
log line, TensorBoard, evaluation, checkpoint) and a final evaluation and checkpoint.
"""

from __future__ import annotations

import math
import os
import sys
from typing import List, Optional

import torch
from megatron.core.distributed import DistributedDataParallelConfig

from spannorm_megatron.checkpoint import (
    TRACKER_FILENAME,
    CheckpointError,
    complete_iterations,
    find_latest,
    load_checkpoint,
    save_checkpoint,
)
from spannorm_megatron.data.dataset import (
    DataConfig,
    build_gpt_datasets,
    check_data_prefixes,
    num_samples_for,
)
from spannorm_megatron.data.loader import build_data_iterators
from spannorm_megatron.data.tokenizer import build_tokenizer, check_data_fits_vocab
from spannorm_megatron.cli import run_cli
from spannorm_megatron.errors import ConfigError
from spannorm_megatron.model import transformer_config
from spannorm_megatron.model.partition import check_model_fits_layout
from spannorm_megatron.runtime import current_device, destroy, initialize
from spannorm_megatron.training.arguments import (
    model_config,
    padded_vocab_size,
    parallel_config,
    parse_args,
)
from spannorm_megatron.training.gpt_step import forward_step
from spannorm_megatron.training.guards import (
    ExitConditions,
    NonFiniteGradientError,
    NonFiniteGuard,
    SpikeDetector,
)
from spannorm_megatron.training.loop import Timer, evaluate, log_line, train_step
from spannorm_megatron.training.monitor import RunMonitor
from spannorm_megatron.training.performance import (
    initialize_tp_comm_overlap,
    performance_config,
)
from spannorm_megatron.training.schedule import batch_layout, lr_scheduler, optimizer_config
from spannorm_megatron.training.setup import gather_updated_parameters, setup_model_and_optimizer


def print_rank_0(message: str) -> None:
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        print(message, flush=True)


def print_last_rank(message: str) -> None:
    """Losses live on the last pipeline stage; Megatron-LM logs from the last rank."""
    if torch.distributed.get_rank() == torch.distributed.get_world_size() - 1:
        print(message, flush=True)


def pretrain(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))

    # ---- everything the user gave is checked before any process group work
    batches = batch_layout(args, world_size)
    if not args.data_path:
        raise ConfigError("--data-path is required: prefixes written by tools/preprocess_data.py.")
    tokenizer = build_tokenizer(args.tokenizer_type, args.tokenizer_model)
    model_cfg = model_config(args, padded_vocab_size(tokenizer.vocab_size, args))
    parallel = parallel_config(args)
    check_model_fits_layout(model_cfg, parallel)
    performance = performance_config(args)
    performance.check_layout(parallel)
    performance.check_machine(model_cfg)
    data_cfg = DataConfig(seq_length=args.seq_length, data_path=args.data_path, split=args.split,
                          seed=args.seed, data_cache_path=args.data_cache_path)
    num_samples = num_samples_for(args.train_iters, batches.global_batch_size,
                                  args.eval_interval, args.eval_iters)
    check_data_fits_vocab(check_data_prefixes(data_cfg, num_samples), tokenizer.vocab_size,
                          tokenizer)

    # ---- runtime, model, optimizer
    initialize(**parallel.runtime_kwargs(), seed=args.seed)
    initialize_tp_comm_overlap(performance, seq_length=args.seq_length,
                               micro_batch_size=args.micro_batch_size,
                               hidden_size=model_cfg.hidden_size,
                               tensor_model_parallel_size=parallel.tensor_model_parallel_size)
    tconfig = transformer_config(model_cfg, **parallel.transformer_kwargs(),
                                 **performance.transformer_kwargs())
    model, optimizer = setup_model_and_optimizer(
        model_cfg, tconfig, optimizer_config(args),
        DistributedDataParallelConfig(**performance.ddp_kwargs(parallel)))
    scheduler = lr_scheduler(args, optimizer, batches.global_batch_size)
    iteration, consumed_train, consumed_valid = _load(args, model, optimizer, scheduler,
                                                      model_cfg, parallel)

    def save(at_iteration: int) -> None:
        if args.save:
            gather_updated_parameters(model)
            path = save_checkpoint(
                args.save, at_iteration, model, optimizer, scheduler, model_config=model_cfg,
                parallel_config=parallel, consumed_train_samples=consumed_train,
                consumed_valid_samples=consumed_valid, args=vars(args))
            print_rank_0(f"  successfully saved checkpoint at iteration {at_iteration:7d} to "
                         f"{path}")

    # ---- data
    datasets = build_gpt_datasets(data_cfg, tokenizer, num_samples)
    train_iter, valid_iter, _ = build_data_iterators(
        datasets, args.micro_batch_size, consumed_train, consumed_valid,
        num_workers=args.num_workers, device=current_device())

    print_rank_0(f"> model: {model_cfg.norm_placement}, {model_cfg.num_layers} layers, hidden "
                 f"{model_cfg.hidden_size}, vocab {model_cfg.vocab_size}; "
                 f"{_count_parameters(model):,} parameters on rank 0")
    print_rank_0(f"> parallel: TP {parallel.tensor_model_parallel_size}, PP "
                 f"{parallel.pipeline_model_parallel_size}, EP {parallel.expert_model_parallel_size}"
                 f", DP {batches.data_parallel_size}; {batches.num_microbatches} micro-batches "
                 f"of {batches.micro_batch_size} per step, global batch {batches.global_batch_size}")

    step_kwargs = dict(num_microbatches=batches.num_microbatches, seq_length=args.seq_length,
                       micro_batch_size=batches.micro_batch_size)
    monitor = RunMonitor(model, model_cfg, seq_length=args.seq_length,
                         global_batch_size=batches.global_batch_size,
                         num_microbatches=batches.num_microbatches, log_interval=args.log_interval,
                         tensorboard_dir=args.tensorboard_dir,
                         dtype=performance.params_dtype,
                         recompute=args.recompute_granularity)
    monitor.write_config({"args": vars(args), "model": model_cfg.to_dict(),
                          "parallel": vars(parallel)})
    history = {"train_loss": [], "valid_loss": [], "iterations": []}
    guard = NonFiniteGuard(model, args.max_skipped_iterations)
    spikes = SpikeDetector(args.loss_spike_factor, args.loss_spike_window)
    exits = ExitConditions(args.exit_duration_in_mins)
    poisoned = _fault_injection_iterations()
    timer = Timer()
    start_iteration = iteration
    while iteration < args.train_iters:
        monitor.begin_step(iteration + 1)
        result = train_step(model, optimizer, scheduler, train_iter,
                            global_batch_size=batches.global_batch_size, monitor=monitor,
                            guard=guard, forward_step_func=(
                                _poisoned_forward_step if iteration + 1 in poisoned
                                else forward_step),
                            **step_kwargs)
        iteration += 1
        consumed_train += batches.global_batch_size
        history["train_loss"].append(result.loss)
        history["iterations"].append(iteration)
        if result.bad_layer is not None:
            where = ("only outside the layers" if result.bad_layer == 0
                     else f"lowest layer: {result.bad_layer}")
            print_rank_0(f" iteration {iteration}: non-finite gradients ({where}); update "
                         f"skipped ({guard.in_a_row + 1} in a row, {guard.total + 1} in all)")
        monitor.record_skipped(iteration, guard.total + int(result.bad_layer is not None))
        guard.record(result.bad_layer, iteration)
        spike_median = spikes.check(result.loss)
        if spike_median is not None:
            print_rank_0(f" loss spike at iteration {iteration}: lm loss {result.loss:.4f} > "
                         f"{args.loss_spike_factor} x running median {spike_median:.4f}")

        if monitor.is_log_step(iteration) or iteration == args.train_iters:
            seconds = timer.lap() / (iteration - start_iteration)
            start_iteration = iteration
            tokens_per_second = batches.global_batch_size * args.seq_length / seconds
            print_last_rank(log_line(iteration, args.train_iters, consumed_train, seconds, result,
                                     batches.global_batch_size, tokens_per_second,
                                     monitor.mfu(seconds), guard.total))
            monitor.end_step(iteration, result, seconds, float(optimizer.get_loss_scale()))

        if valid_iter is not None and args.eval_interval and iteration % args.eval_interval == 0:
            history["valid_loss"].append(
                _run_evaluation(model, valid_iter, args, step_kwargs, iteration, monitor))
            consumed_valid += args.eval_iters * batches.global_batch_size
            timer.lap()

        if args.save_interval and iteration % args.save_interval == 0:
            save(iteration)
            timer.lap()

        reason = exits.reason()
        if reason is None and args.exit_interval and iteration % args.exit_interval == 0:
            reason = "--exit-interval"
        if reason is not None:
            if not (args.save_interval and iteration % args.save_interval == 0):
                save(iteration)
            print_rank_0(f"exiting program at iteration {iteration} ({reason})")
            break

    else:  # the run reached --train-iters
        if args.save and not (args.save_interval and iteration % args.save_interval == 0):
            save(iteration)
        if valid_iter is not None and iteration % max(args.eval_interval, 1) != 0:
            history["valid_loss"].append(_run_evaluation(model, valid_iter, args, step_kwargs,
                                                         iteration, monitor))
    exits.close()
    monitor.close()
    destroy()
    return history


def _load(args, model, optimizer, scheduler, model_cfg, parallel):
    """(iteration, consumed train samples, consumed valid samples) to start from."""
    if not args.load:
        return 0, 0, 0
    try:
        nothing_there = find_latest(args.load) is None
    except CheckpointError:
        if not args.load_fallback:
            raise
        nothing_there = not complete_iterations(args.load)
    if nothing_there:
        if os.path.abspath(args.load) != os.path.abspath(args.save or ""):
            raise CheckpointError(
                f"--load {args.load}: no checkpoint there (no {TRACKER_FILENAME} and no "
                f"complete iter_* directory). Check the path, or drop --load to start fresh.")
        # --save X --load X is how runs are resumed; the first launch has nothing yet.
        print_rank_0(f"> no checkpoint in {args.load} yet: starting from iteration 0")
        return 0, 0, 0

    # The pointer's checkpoint first; with --load-fallback, then every earlier complete one.
    attempts = [None]
    if args.load_fallback:
        attempts += sorted(complete_iterations(args.load), reverse=True)
    for attempt in attempts:
        try:
            state = load_checkpoint(args.load, model, optimizer, scheduler,
                                    model_config=model_cfg, parallel_config=parallel,
                                    iteration=attempt, no_load_optim=args.no_load_optim,
                                    no_load_rng=args.no_load_rng)
            break
        except CheckpointError as error:
            if not args.load_fallback or attempt == attempts[-1]:
                raise
            which = "the latest checkpoint" if attempt is None else f"iteration {attempt}"
            print_rank_0(f"> --load-fallback: skipping {which} ({error})")
    print_rank_0(f"  successfully loaded checkpoint from {state['checkpoint_dir']} at iteration "
                 f"{state['iteration']}")
    return (state["iteration"], state["consumed_train_samples"],
            state["consumed_valid_samples"])


def _fault_injection_iterations() -> set:
    """Iterations whose loss is made NaN, from SPANNORM_INJECT_NAN_AT="5,6" (fault-injection
    tests of the non-finite guard; unset in normal runs)."""
    value = os.environ.get("SPANNORM_INJECT_NAN_AT", "")
    return {int(v) for v in value.split(",") if v.strip()}


def _poisoned_forward_step(data_iterator, model):
    output, loss_func = forward_step(data_iterator, model)
    return output * float("nan"), loss_func


def _count_parameters(model) -> int:
    return sum(p.numel() for chunk in model for p in chunk.parameters())


def _run_evaluation(model, valid_iter, args, step_kwargs, iteration: int, monitor) -> float:
    loss = evaluate(model, valid_iter, args.eval_iters, **step_kwargs)
    monitor.log_validation(iteration, loss)
    ppl = math.exp(min(20.0, loss))
    bar = "-" * 100
    print_last_rank(f"{bar}\n validation loss at iteration {iteration} | lm loss value: "
                    f"{loss:.6E} | lm loss PPL: {ppl:.6E} | \n{bar}")
    return loss


def main(argv: Optional[List[str]] = None) -> int:
    def train(argv) -> int:
        try:
            pretrain(argv)
        except NonFiniteGradientError as error:  # the run failed, the input was fine: status 1
            print(f"error: {error}", file=sys.stderr)
            return 1
        return 0

    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
