"""Save a dist checkpoint whose tensors are produced on demand, one at a time.

megatron-core's torch_dist writer (`FileSystemWriterAsync.prepare_write_data`) resolves every
tensor of a rank before writing the first byte, so a checkpoint can only be written from a model
that is wholly in memory. A conversion that builds its tensors from another format (the
Hugging Face import) needs to hold only the group it is converting. `StreamingSaveStrategy`
keeps everything else megatron-core's: the sharded state dict of a model built on the meta
device describes the checkpoint (keys, global shapes, TP/PP/EP slices, replicas, SwiGLU's split
fc1), megatron-core translates it and plans the write (`MCoreSavePlanner`), and the result is
the same torch_dist checkpoint `dist_checkpointing.load` reads. What changes: each meta tensor
is replaced, when the writer reaches it, by what `produce(shard)` returns, and the writer visits
the tensors in the order `order(shard)` gives, so that a producer that converts a group at a
time converts each group once.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from megatron.core.dist_checkpointing.dict_utils import nested_values
from megatron.core.dist_checkpointing.mapping import ShardedTensor
from megatron.core.dist_checkpointing.strategies.torch import (
    MCoreSavePlanner,
    TorchDistSaveShardedStrategy,
    _replace_state_dict_keys_with_sharded_keys,
    mcore_to_pyt_state_dict,
)
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.metadata import MetadataIndex

ShardKey = Tuple[str, Tuple[int, ...]]
Produce = Callable[[ShardedTensor], torch.Tensor]
Order = Callable[[ShardedTensor], Any]


def _shard_key(key: str, global_offset) -> ShardKey:
    return key, tuple(int(o) for o in global_offset)


class _ProducingPlanner(MCoreSavePlanner):
    """megatron-core's save planner, with meta tensors produced when the writer resolves them."""

    def __init__(self, shards: Dict[ShardKey, ShardedTensor], produce: Produce, order: Order):
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self._shards = shards
        self._produce = produce
        self._order = order
        self._last_written: Optional[torch.Tensor] = None

    def _shard(self, index: MetadataIndex) -> ShardedTensor:
        shard = self._shards.get(_shard_key(index.fqn, index.offset or ()))
        if shard is None:
            raise KeyError(f"no sharded tensor {index.fqn} at offset {tuple(index.offset or ())}")
        return shard

    def create_local_plan(self):
        plan = super().create_local_plan()

        def position(item):
            if item.tensor_data is None:  # bytes (sharded objects) first: they are at hand
                return (0, ())
            return (1, self._order(self._shard(item.index)))

        # A stable sort: within one producer group, megatron-core's order is kept.
        self.plan = dataclasses.replace(plan, items=sorted(plan.items, key=position))
        return self.plan

    def lookup_object(self, index: MetadataIndex) -> Any:
        self._free_last_written()
        obj = super().lookup_object(index)
        if not (isinstance(obj, torch.Tensor) and obj.is_meta):
            return obj
        tensor = self._produce(self._shard(index))
        if tensor.numel() != obj.numel():
            raise ValueError(f"produced {tuple(tensor.shape)} for {index.fqn} at "
                             f"{tuple(index.offset)}, expected {tuple(obj.shape)}")
        # A copy of our own, so that freeing it below touches nothing of the producer's.
        self._last_written = torch.empty(obj.shape, dtype=obj.dtype).copy_(
            tensor.reshape(obj.shape))
        return self._last_written

    def _free_last_written(self) -> None:
        # torch's writer (`_write_files_from_queue`, torch 2.13) keeps every tensor it wrote in a
        # dict until the file is closed (it uses them only for its safetensors format), which
        # would hold one shard per checkpoint key. Its serial loader writes each tensor before
        # it resolves the next, so when the next is looked up the last one is on disk: free it.
        if self._last_written is not None:
            self._last_written.untyped_storage().resize_(0)
            self._last_written = None


class StreamingSaveStrategy(TorchDistSaveShardedStrategy):
    """A torch_dist save strategy for `dist_checkpointing.save(..., sharded_strategy=...)`
    that writes tensors given as meta tensors with `produce(shard)`, in `order(shard)` order.

    Tensors that are not on the meta device are written as they are. Writing is synchronous,
    one file per rank, one produced tensor in memory at a time (plus what `produce` caches).
    """

    def __init__(self, produce: Produce, order: Order = lambda shard: 0):
        super().__init__("torch_dist", 1, keep_only_main_replica=True, thread_count=1)
        self._produce = produce
        self._order = order

    def async_save(self, sharded_state_dict, checkpoint_dir: Path):
        raise NotImplementedError("StreamingSaveStrategy writes synchronously; call save().")

    def save(self, sharded_state_dict, checkpoint_dir: Path) -> None:
        shards = {_shard_key(t.key, t.global_offset): t for t in nested_values(sharded_state_dict)
                  if isinstance(t, ShardedTensor)}
        translated, _flat, _renamed = _replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, self.keep_only_main_replica)
        pyt_state_dict = mcore_to_pyt_state_dict(translated, is_loading=False)
        # per_thread_copy_ahead=0: torch's serial loader, which resolves one tensor at a time
        # (its overlapping loader, used when CUDA is present, resolves ahead).
        writer = FileSystemWriter(str(checkpoint_dir), single_file_per_rank=True,
                                  thread_count=1, per_thread_copy_ahead=0)
        dcp_save(pyt_state_dict, storage_writer=writer,
                 planner=_ProducingPlanner(shards, self._produce, self._order))
