"""Batches for `forward_step`: a resumable sampler, the data loader and the iterators.

megatron-core 0.16.1 has no pre-training sampler or data loader (Megatron-LM keeps them in
`megatron/training`, outside the megatron-core package), so they are written here, with
Megatron-LM's semantics so that a run resumed here or there sees the same batches:

* the dataset (already shuffled by megatron-core's shuffle index) is read in order, one global
  batch of `micro_batch_size * data_parallel_size` consecutive samples after another;
  data-parallel rank r takes the r-th micro-batch of each;
* `consumed_samples` counts samples of all data-parallel ranks (iteration * global batch size,
  what checkpoints store); a loader started at `consumed_samples=k` yields exactly what an
  uninterrupted loader yields after its first k samples, so a resumed run sees the same batches.

Each batch is a dict of [micro_batch, seq] tensors `tokens`, `labels`, `loss_mask`,
`position_ids` (and the [micro_batch, 1, seq, seq] `attention_mask` when the dataset makes it),
which is what `spannorm_megatron.training.gpt_step.forward_step` takes. Every
tensor- and pipeline-parallel rank of a data-parallel group may build the same loader (same
data-parallel rank → same batches); stages that need no data may pass None instead.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Optional, Tuple

import torch

from spannorm_megatron.errors import DataError

Batch = Dict[str, torch.Tensor]

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")
"""What `forward_step` reads. A blend's samples also carry `dataset_id`, dropped from batches."""

OPTIONAL_BATCH_KEYS = ("attention_mask",)
"""Kept when the samples have them: the causal mask unless
--no-create-attention-mask-in-dataloader."""


class PretrainingSampler:
    """Yields this data-parallel rank's micro-batches of sample indices, from `consumed_samples`.

    Args:
        total_samples: length of the dataset.
        consumed_samples: global samples already consumed (all data-parallel ranks together).
        micro_batch_size: samples per micro-batch on one rank.
        data_parallel_rank / data_parallel_size: this rank's place in the data-parallel group.
        drop_last: skip a final incomplete global batch (True, as in training); with False the
            ranks get what remains of it, in rank order (possibly nothing).
    """

    def __init__(
        self,
        total_samples: int,
        consumed_samples: int,
        micro_batch_size: int,
        data_parallel_rank: int = 0,
        data_parallel_size: int = 1,
        drop_last: bool = True,
    ) -> None:
        if total_samples <= 0:
            raise DataError(
                "The dataset has no samples: the data is shorter than one sequence. Use more "
                "data or a shorter --seq-length."
            )
        if micro_batch_size < 1 or data_parallel_size < 1:
            raise DataError(
                f"micro_batch_size ({micro_batch_size}) and data_parallel_size "
                f"({data_parallel_size}) must be at least 1."
            )
        if not 0 <= data_parallel_rank < data_parallel_size:
            raise DataError(
                f"data_parallel_rank {data_parallel_rank} is outside [0, {data_parallel_size})."
            )
        if not 0 <= consumed_samples <= total_samples:
            raise DataError(
                f"Cannot resume at consumed_samples={consumed_samples}: the dataset has only "
                f"{total_samples} samples. Build it with the same data, --seq-length, --split, "
                "--seed and number of training samples as the run that wrote the checkpoint."
            )
        self.total_samples = total_samples
        self.consumed_samples = consumed_samples
        self.micro_batch_size = micro_batch_size
        self.data_parallel_rank = data_parallel_rank
        self.data_parallel_size = data_parallel_size
        self.drop_last = drop_last

    def __len__(self) -> int:
        return self.total_samples

    def __iter__(self) -> Iterator[List[int]]:
        global_batch = self.micro_batch_size * self.data_parallel_size
        offset = self.data_parallel_rank * self.micro_batch_size
        start = self.consumed_samples
        while start + global_batch <= self.total_samples:
            yield list(range(start + offset, start + offset + self.micro_batch_size))
            start += global_batch
        if not self.drop_last and start < self.total_samples:
            tail = list(range(start, self.total_samples))[offset : offset + self.micro_batch_size]
            if tail:
                yield tail


def _data_parallel_place() -> Tuple[int, int]:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        return (
            parallel_state.get_data_parallel_rank(),
            parallel_state.get_data_parallel_world_size(),
        )
    return 0, 1


def build_data_loader(
    dataset,
    consumed_samples: int,
    micro_batch_size: int,
    data_parallel_rank: Optional[int] = None,
    data_parallel_size: Optional[int] = None,
    num_workers: int = 0,
    drop_last: bool = True,
) -> torch.utils.data.DataLoader:
    """A torch DataLoader over `dataset` using `PretrainingSampler`.

    The data-parallel place defaults to megatron-core's parallel state (0 of 1 without it).
    `num_workers > 0` prepares batches in worker processes (Megatron-LM's `--num-workers`).
    """
    if data_parallel_rank is None or data_parallel_size is None:
        rank, size = _data_parallel_place()
        data_parallel_rank = rank if data_parallel_rank is None else data_parallel_rank
        data_parallel_size = size if data_parallel_size is None else data_parallel_size
    sampler = PretrainingSampler(
        len(dataset), consumed_samples, micro_batch_size, data_parallel_rank,
        data_parallel_size, drop_last,
    )
    return torch.utils.data.DataLoader(
        dataset,
        batch_sampler=sampler,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=num_workers > 0,
    )


def iterate_batches(
    loader, device: Optional[torch.device] = None, cyclic: bool = False
) -> Iterator[Batch]:
    """Yield the loader's batches (the `BATCH_KEYS` tensors), moved to `device` if given.

    `cyclic` restarts at the end (Megatron-LM's validation iterator); otherwise the iterator
    ends with the data.
    """
    while True:
        for batch in loader:
            batch = {key: batch[key] for key in BATCH_KEYS + OPTIONAL_BATCH_KEYS
                     if key in batch}
            if device is not None:
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            yield batch
        if not cyclic:
            return


def build_data_iterators(
    datasets,
    micro_batch_size: int,
    consumed_train_samples: int = 0,
    consumed_valid_samples: int = 0,
    num_workers: int = 0,
    device: Optional[torch.device] = None,
    data_parallel_rank: Optional[int] = None,
    data_parallel_size: Optional[int] = None,
):
    """(train, valid, test) iterators for `forward_step` from `build_gpt_datasets`'s result.

    Training resumes at `consumed_train_samples` and ends with its dataset; validation resumes
    at `consumed_valid_samples` and, like test, cycles. A split whose dataset is None gets None.
    """
    iterators = []
    for index, dataset in enumerate(datasets):
        if dataset is None:
            iterators.append(None)
            continue
        consumed = (consumed_train_samples, consumed_valid_samples, 0)[index]
        loader = build_data_loader(
            dataset, consumed, micro_batch_size, data_parallel_rank, data_parallel_size,
            num_workers,
        )
        iterators.append(iterate_batches(loader, device, cyclic=index > 0))
    return tuple(iterators)
