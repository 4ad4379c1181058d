"""`spannorm-train` with test instruments, through a Trainer subclass (the product has no hooks):

    python tests/_instrumented_train.py [--nan-at 4,5] [--step-times FILE]
        [--record-tokens PREFIX] -- [flags]

--nan-at        NaN losses at these iterations, as a real NaN in the model's output would give.
--step-times    on the last rank, write {iteration: seconds} of each `train_step` call, measured
                around it, to FILE (JSON) at the end of the run.
--record-tokens every rank writes {iteration: sorted distinct input token ids of the training
                micro-batches it read} to PREFIX.rank<r>.json at the end of the run.
Works under torchrun like `python -m spannorm_megatron.train`.
"""

import spannorm_megatron  # noqa: F401  (before megatron-core: see its machine.py)

import json
import os
import signal
import sys
import time

import torch

from spannorm_megatron.train import main
from spannorm_megatron.training.gpt_step import forward_step
from spannorm_megatron.training.trainer import Trainer


def _poisoned_forward_step(data_iterator, model):
    output, loss_func = forward_step(data_iterator, model)
    return output * float("nan"), loss_func


class _Recording:
    """A data iterator that remembers the input tokens of the batches drawn from it."""

    def __init__(self, iterator, seen: set):
        self.iterator, self.seen = iterator, seen

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.iterator)
        self.seen.update(batch["tokens"].reshape(-1).tolist())
        return batch


class _SigtermAt:
    """A data iterator that sends this process SIGTERM as it hands out its `at`-th batch."""

    def __init__(self, iterator, at: int):
        self.iterator, self.at, self.drawn = iterator, at, 0

    def __iter__(self):
        return self

    def __next__(self):
        self.drawn += 1
        if self.drawn == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return next(self.iterator)


def instrumented_trainer(nan_at=(), step_times_file=None, record_tokens=None,
                         nan_weights=False, sigterm_at_valid_batch=None):
    """A Trainer with the instruments above. In-process runs only: `nan_weights` puts a NaN
    into layer 1's first weight once the run is set up, as a resume from a checkpoint of NaN
    weights gives; `sigterm_at_valid_batch=N` sends SIGTERM as the N-th validation micro-batch
    is drawn."""
    class InstrumentedTrainer(Trainer):
        step_times = {}
        tokens = {}

        def setup(self):
            super().setup()
            if nan_weights:
                layer = getattr(self.model[0], "module", self.model[0]).decoder.layers[0]
                with torch.no_grad():
                    next(layer.parameters()).view(-1)[0] = float("nan")
            if sigterm_at_valid_batch is not None:
                self.valid_iter = _SigtermAt(self.valid_iter, sigterm_at_valid_batch)

        def forward_step_for(self, iteration):
            step = _poisoned_forward_step if iteration in nan_at else forward_step
            if record_tokens is None:
                return step
            seen = self.tokens.setdefault(iteration, set())
            return lambda data_iterator, model: step(
                None if data_iterator is None else _Recording(data_iterator, seen), model)

        def train_step(self):
            start = time.perf_counter()
            result = super().train_step()
            self.step_times[self.iteration] = time.perf_counter() - start
            return result

        def close(self):
            last = (torch.distributed.is_initialized() and torch.distributed.get_rank()
                    == torch.distributed.get_world_size() - 1)
            if step_times_file and last:
                with open(step_times_file, "w") as f:
                    json.dump(self.step_times, f)
            if record_tokens and torch.distributed.is_initialized():
                with open(f"{record_tokens}.rank{torch.distributed.get_rank()}.json", "w") as f:
                    json.dump({i: sorted(seen) for i, seen in self.tokens.items()}, f)
            super().close()

    return InstrumentedTrainer


if __name__ == "__main__":
    argv = sys.argv[1:]
    split = argv.index("--")
    options, flags = argv[:split], argv[split + 1:]
    values = dict(zip(options[::2], options[1::2]))
    nan_at = {int(i) for i in values.get("--nan-at", "").split(",") if i}
    sys.exit(main(flags, trainer_class=instrumented_trainer(nan_at, values.get("--step-times"),
                                                            values.get("--record-tokens"))))
