"""Mutation tests of strict device mode: each collective path of a training run, with a host
tensor planted into it, must be refused. Rank program of tests/test_strict_devices.py:

    torchrun --standalone --nproc_per_node 2 tests/_strict_mutations.py OUT -- [train flags]

under SPANNORM_STRICT_DEVICES=1, with flags for a data-parallel 2, expert-parallel 2 MoE run.
It builds one Trainer and drives its real steps: a training step (with the non-finite guard and
the expert-bias update), its log (MoE and stability metrics, every step measured) and an
evaluation. First unmutated (nothing may be refused), then once per path of MUTATIONS: one
function replaced by a variant that plants a host tensor (a wrapper around the real function,
never a copy of it), the same round, the function restored, and an unmutated round again (the
trainer still works: nothing leaked). Every rank runs the same code on the same shapes, so a
refusal comes on both ranks before the collective and no rank waits for its partner. The
pipeline broadcast needs stages: megatron-core's groups are then rebuilt as 2 pipeline stages
over the same ranks and `broadcast_from_last_stage` is called directly.

Writes OUT/rank<r>.json: {round: "passed" | "refused: <the refusal>"}; any other exception
fails the launch (launch.reporting).
"""

from __future__ import annotations

import functools
import importlib
import sys

import torch

from launch import reporting, write_result

HOST = torch.device("cpu")


def host_arguments(function):
    """`function` given host copies of its tensor arguments (a tensor that never reached the
    device)."""
    def to_host(value):
        return value.cpu() if isinstance(value, torch.Tensor) else value

    @functools.wraps(function)
    def variant(*args, **kwargs):
        return function(*map(to_host, args), **{k: to_host(v) for k, v in kwargs.items()})
    return variant


def host_device(function):
    """`function` with its module's `current_device()` answering the host while it runs (a
    tensor made without device=)."""
    module = sys.modules[function.__module__]

    @functools.wraps(function)
    def variant(*args, **kwargs):
        real = module.current_device
        module.current_device = lambda: HOST
        try:
            return function(*args, **kwargs)
        finally:
            module.current_device = real
    return variant


def host_state(method):
    """`method` with every tensor attribute and buffer of its object on the host while it runs
    (a buffer allocated without device=)."""
    @functools.wraps(method)
    def variant(self, *args, **kwargs):
        tensors = {name: value for name, value in vars(self).items()
                   if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter)}
        if isinstance(self, torch.nn.Module):
            tensors.update((name, value) for name, value in self.named_buffers(recurse=False)
                           if value is not None)
        for name, value in tensors.items():
            setattr(self, name, value.cpu())
        try:
            return method(self, *args, **kwargs)
        finally:
            for name, value in tensors.items():
                setattr(self, name, value)
    return variant


# Collective path -> (where its caller finds the function, the function's name, the plant).
MUTATIONS = {
    "loss_reduction": ("spannorm_megatron.training.gpt_step", "reduce_over_data_parallel",
                       host_arguments),
    "evaluation": ("spannorm_megatron.training.trainer", "evaluate", host_device),
    "stability_signals": ("spannorm_megatron.metrics.stability:StabilitySignals", "collect",
                          host_state),
    "moe_metrics": ("spannorm_megatron.metrics.moe:MoEMetrics", "collect", host_state),
    "expert_bias": ("megatron.core.transformer.moe.router:TopKRouter", "_apply_expert_bias",
                    host_state),
    "nan_guard": ("spannorm_megatron.training.guards:NonFiniteGuard", "first_bad_layer",
                  host_state),
    "pp_broadcast": ("spannorm_megatron.training.loop", "broadcast_from_last_stage",
                     host_device),
}
PIPELINE_PATHS = ("pp_broadcast",)


def _owner(label: str):
    module, _, cls = label.partition(":")
    owner = importlib.import_module(module)
    return getattr(owner, cls) if cls else owner


def outcome(round_) -> str:
    from spannorm_megatron.runtime.strict_devices import DeviceDisciplineError

    try:
        round_()
    except DeviceDisciplineError as refusal:
        return f"refused: {refusal}"
    return "passed"


def mutated(path: str, round_) -> str:
    label, name, plant = MUTATIONS[path]
    owner = _owner(label)
    real = vars(owner)[name]
    setattr(owner, name, plant(real))
    try:
        return outcome(round_)
    finally:
        setattr(owner, name, real)


def main(out: str, flags) -> None:
    from spannorm_megatron.config.parallel import ParallelConfig
    from spannorm_megatron.process import initialize
    from spannorm_megatron.training import loop
    from spannorm_megatron.training.arguments import parse_args
    from spannorm_megatron.training.trainer import Trainer

    record = {}
    with Trainer(parse_args(flags)) as trainer:
        trainer.setup()

        def training_round():
            result = trainer.train_step()
            trainer._log(result, seconds=1.0)
            trainer.evaluate()

        record["unmutated"] = outcome(training_round)
        for path in MUTATIONS:
            if path not in PIPELINE_PATHS:
                record[path] = mutated(path, training_round)
                record[f"{path}, restored"] = outcome(training_round)

        initialize(ParallelConfig(pipeline_model_parallel_size=2))  # same ranks, 2 stages

        def pipeline_round():
            assert loop.broadcast_from_last_stage(1.5) == 1.5

        record["unmutated pipeline"] = outcome(pipeline_round)
        for path in PIPELINE_PATHS:
            record[path] = mutated(path, pipeline_round)
            record[f"{path}, restored"] = outcome(pipeline_round)
    write_result(out, record)


if __name__ == "__main__":
    split = sys.argv.index("--")
    with reporting(sys.argv[1]):
        main(sys.argv[1], sys.argv[split + 1:])
