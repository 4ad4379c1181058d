"""`spannorm-selfcheck`: install and layout check. Build a model on the current `torchrun`
layout and train it a few steps on one fixed synthetic batch (the loss must fall: the model
memorizes the batch).

    torchrun --nproc_per_node 2 -m spannorm_megatron.selfcheck --tensor-model-parallel-size 2 \
        --sequence-parallel --norm-placement spannorm
    spannorm-selfcheck                 # one process

Runs on GPUs (NCCL) and on CPU (gloo). Prints one line per step and a final JSON summary line
prefixed `SELFCHECK` that tests read.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

from spannorm_megatron.cli import run_cli
from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.options import add_arguments, SEED, option, parse_options
from spannorm_megatron.config.parallel import ParallelConfig

if TYPE_CHECKING:  # torch and megatron-core load in `run`: --help answers without them
    import torch


def _say(line: str) -> None:
    # One write per line: ranks share the launcher's stdout, and a line written in two pieces
    # (print writes the text, then the newline) can have another rank's line land in between.
    sys.stdout.write(line + "\n")
    sys.stdout.flush()

@dataclass
class SelfcheckOptions:
    """The command line of `spannorm-selfcheck`: a model, a layout and a few steps."""

    norm_placement: str = option("spannorm", "Norm placement of the model.")
    num_layers: int = option(4, "Transformer layers.")
    hidden_size: int = option(64, "Hidden size.")
    num_attention_heads: int = option(4, "Attention heads.")
    num_experts: Optional[int] = option(None, "Experts (unset: a dense model).")
    moe_router_topk: int = option(2, "Experts per token.")
    tensor_model_parallel_size: int = option(1, "Tensor-parallel ranks.")
    pipeline_model_parallel_size: int = option(1, "Pipeline stages.")
    expert_model_parallel_size: int = option(1, "Expert-parallel ranks.")
    sequence_parallel: bool = option(False, "Megatron-LM's --sequence-parallel.")
    use_distributed_optimizer: bool = option(False, "Megatron-LM's --use-distributed-optimizer.")
    train_iters: int = option(8, "Training steps.")
    micro_batch_size: int = option(2, "Sequences per micro-batch.")
    num_microbatches: int = option(2, "Micro-batches per step.")
    seq_length: int = option(32, "Sequence length.")
    vocab_size: int = option(128, "Vocabulary size.")
    lr: float = option(3e-3, "Learning rate.")
    seed: int = option(1234, "Seed of the model and the batch.", **SEED)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_arguments(parser, SelfcheckOptions)
    return parser


def parse_args(argv=None) -> argparse.Namespace:
    return parse_options(build_parser(), [SelfcheckOptions], argv)


def synthetic_batch(args, generator: torch.Generator) -> dict:
    import torch

    from spannorm_megatron.runtime import current_device

    tokens = torch.randint(0, args.vocab_size, (args.micro_batch_size, args.seq_length + 1),
                           generator=generator)
    device = current_device()
    return {
        "tokens": tokens[:, :-1].to(device),
        "labels": tokens[:, 1:].to(device),
        "loss_mask": torch.ones(args.micro_batch_size, args.seq_length, device=device),
        "position_ids": torch.arange(args.seq_length, device=device).expand(
            args.micro_batch_size, -1),
    }


def run(argv: Optional[List[str]] = None) -> dict:
    """Train as `spannorm-selfcheck argv` would; returns this rank's summary."""
    args = parse_args(argv)
    import torch
    from megatron.core import parallel_state
    from megatron.core.optimizer import OptimizerConfig

    from spannorm_megatron.model.partition import check_model_fits_layout
    from spannorm_megatron.process import initialize
    from spannorm_megatron.runtime import destroy
    from spannorm_megatron.training.loop import train_step
    from spannorm_megatron.training.setup import setup_model_and_optimizer

    model_config = ModelConfig.recommended(
        norm_placement=args.norm_placement, num_layers=args.num_layers,
        hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
        num_experts=args.num_experts, moe_router_topk=args.moe_router_topk,
        vocab_size=args.vocab_size, max_sequence_length=args.seq_length,
    )
    parallel = ParallelConfig(
        tensor_model_parallel_size=args.tensor_model_parallel_size,
        pipeline_model_parallel_size=args.pipeline_model_parallel_size,
        expert_model_parallel_size=args.expert_model_parallel_size,
        sequence_parallel=args.sequence_parallel,
        use_distributed_optimizer=args.use_distributed_optimizer,
    )
    check_model_fits_layout(model_config, parallel)
    initialize(parallel, seed=args.seed)
    model, optimizer = setup_model_and_optimizer(
        model_config, parallel,
        OptimizerConfig(optimizer="adam", lr=args.lr, weight_decay=0.0, clip_grad=1.0))

    # Same data on the ranks of one model replica, different data across replicas.
    generator = torch.Generator().manual_seed(args.seed + parallel_state.get_data_parallel_rank())
    batches = [synthetic_batch(args, generator) for _ in range(args.num_microbatches)]
    losses, grad_norms = [], []
    for step in range(1, args.train_iters + 1):
        start = time.perf_counter()
        result = train_step(model, optimizer, None, iter(batches),
                            num_microbatches=args.num_microbatches, seq_length=args.seq_length,
                            micro_batch_size=args.micro_batch_size,
                            global_batch_size=args.micro_batch_size * args.num_microbatches)
        losses.append(result.loss)
        grad_norms.append(result.grad_norm)
        _say(f"[rank {torch.distributed.get_rank()}] step {step}: lm loss {result.loss:.4f} "
             f"grad norm {result.grad_norm:.4f} ({time.perf_counter() - start:.2f}s)")

    summary = {
        "rank": torch.distributed.get_rank(),
        "world_size": torch.distributed.get_world_size(),
        "losses": losses,
        "grad_norms": grad_norms,
        "num_parameters": sum(p.numel() for chunk in model for p in chunk.parameters()),
    }
    _say("SELFCHECK " + json.dumps(summary))
    destroy()
    return summary


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    return run_cli(lambda argv: 0 if run(argv) else 1, argv)


if __name__ == "__main__":
    sys.exit(main())
