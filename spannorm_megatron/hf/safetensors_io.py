"""Sharded safetensors files: a streaming writer, and a reader over an HF folder.

The writer knows every tensor's name, shape and dtype before the first byte is written (the
export plans them from the checkpoint's metadata), so it writes each shard's header first and
then the tensors one by one as the conversion produces them: nothing is held back to be written
at the end, and the export's memory stays at one tensor group. The files are the standard
format (8-byte little-endian header length, JSON header with ``data_offsets`` relative to the
data section, the raw little-endian tensor bytes back to back); they are read by the
`safetensors` library. A folder gets ``model.safetensors`` when one shard suffices, else
``model-0000i-of-0000n.safetensors`` plus ``model.safetensors.index.json``, as transformers
writes them.
"""

from __future__ import annotations

import json
import os
import re
from typing import Dict, List, Optional, Tuple

import torch

from spannorm_megatron.config.paths import SAFETENSORS_FILE, SAFETENSORS_INDEX
from spannorm_megatron.hf.errors import ConversionError

SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16",
                      torch.float64: "F64", torch.int64: "I64", torch.int32: "I32"}
SINGLE_FILE = SAFETENSORS_FILE  # transformers' names (config.paths checks a folder by them)
INDEX_FILE = SAFETENSORS_INDEX


def parse_size(text: str) -> int:
    """'2GB' / '500MB' / '1.5GiB' / '1000' -> bytes (transformers' convention: GB = 10^9)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(?:([KMGT])(I)?)?B?\s*", str(text).upper())
    if not match:
        raise ConversionError(f"--max-shard-size {text!r} is not a size like 2GB, 500MB or 1000000.")
    value, prefix, binary = float(match.group(1)), match.group(2), match.group(3)
    base = 1024 if binary else 1000
    power = "KMGT".index(prefix) + 1 if prefix else 0
    size = int(value * base ** power)
    if size <= 0:
        raise ConversionError(f"--max-shard-size {text!r} must be positive.")
    return size


def _nbytes(shape: Tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for size in shape:
        numel *= int(size)
    return numel * torch.empty((), dtype=dtype).element_size()


class ShardedSafetensorsWriter:
    """Writes planned tensors, in plan order, into shards of at most `max_shard_size` bytes.

    Args:
        directory: where the files go (must exist).
        plan: (name, shape, dtype) of every tensor, in the order they will be written.
        max_shard_size: bytes per shard file (a single larger tensor gets a shard of its own).
        metadata: string->string metadata stored in every header (``__metadata__``).
    """

    def __init__(self, directory: str, plan: List[Tuple[str, Tuple[int, ...], torch.dtype]],
                 max_shard_size: int, metadata: Optional[Dict[str, str]] = None):
        names = [name for name, _, _ in plan]
        if len(set(names)) != len(names):
            raise ValueError("duplicate tensor names in the plan")
        self.directory = directory
        self.metadata = {"format": "pt", **(metadata or {})}
        shards: List[List[Tuple[str, Tuple[int, ...], torch.dtype]]] = [[]]
        size = 0
        for name, shape, dtype in plan:
            nbytes = _nbytes(shape, dtype)
            if shards[-1] and size + nbytes > max_shard_size:
                shards.append([])
                size = 0
            shards[-1].append((name, tuple(shape), dtype))
            size += nbytes
        count = len(shards)
        self.files = ([SINGLE_FILE] if count == 1 else
                      [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)])
        self.shards = shards
        self.weight_map = {name: self.files[i] for i, shard in enumerate(shards)
                           for name, _, _ in shard}
        self.total_size = sum(_nbytes(shape, dtype) for _, shape, dtype in plan)
        self._shard = -1
        self._position = 0
        self._handle = None

    def _open_next(self) -> None:
        self._close_current()
        self._shard += 1
        header: Dict[str, object] = {"__metadata__": self.metadata}
        offset = 0
        for name, shape, dtype in self.shards[self._shard]:
            nbytes = _nbytes(shape, dtype)
            header[name] = {"dtype": SAFETENSORS_DTYPES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        text = json.dumps(header, separators=(",", ":")).encode("utf-8")
        text += b" " * (-len(text) % 8)  # the data section starts 8-byte aligned
        self._handle = open(os.path.join(self.directory, self.files[self._shard]), "wb")
        self._handle.write(len(text).to_bytes(8, "little"))
        self._handle.write(text)
        self._position = 0

    def _close_current(self) -> None:
        if self._handle is not None:
            if self._position != len(self.shards[self._shard]):
                raise AssertionError("closing a shard before all its tensors were written")
            self._handle.close()
            self._handle = None

    def write(self, tensors: Dict[str, torch.Tensor]) -> None:
        """Write these tensors, which must be the next ones of the plan (any order among them)."""
        pending = dict(tensors)
        while pending:
            if self._handle is None or self._position == len(self.shards[self._shard]):
                if self._shard + 1 >= len(self.shards):
                    raise AssertionError(f"tensors beyond the plan: {sorted(pending)}")
                self._open_next()
            name, shape, dtype = self.shards[self._shard][self._position]
            if name not in pending:
                raise AssertionError(f"expected tensor {name!r} next, got {sorted(pending)}")
            tensor = pending.pop(name)
            if tuple(tensor.shape) != shape or tensor.dtype != dtype:
                raise AssertionError(f"{name}: planned {shape} {dtype}, got "
                                     f"{tuple(tensor.shape)} {tensor.dtype}")
            data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
            self._handle.write(memoryview(data.numpy()))  # no intermediate copy
            self._position += 1

    def close(self) -> None:
        """Finish the last shard and write the index (several shards); checks all were written."""
        self._close_current()
        if self._shard != len(self.shards) - 1:
            raise AssertionError("not every planned tensor was written")
        if len(self.files) > 1:
            with open(os.path.join(self.directory, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": self.total_size},
                           "weight_map": self.weight_map}, f, indent=2, sort_keys=True)
                f.write("\n")

    def abort(self) -> None:
        if self._handle is not None:
            self._handle.close()
            self._handle = None


class SafetensorsFolder:
    """The tensors of an HF folder's ``model.safetensors`` (or its sharded index), read lazily."""

    def __init__(self, directory: str):
        from safetensors import safe_open

        self.directory = directory
        index = os.path.join(directory, INDEX_FILE)
        single = os.path.join(directory, SINGLE_FILE)
        if os.path.isfile(index):
            try:
                with open(index) as f:
                    weight_map = json.load(f)["weight_map"]
            except (ValueError, KeyError) as err:
                raise ConversionError(f"{index} is not a safetensors index ({err}).") from None
        elif os.path.isfile(single):
            weight_map = None
        else:
            others = sorted(n for n in os.listdir(directory)
                            if n.endswith((".bin", ".pt", ".pth", ".safetensors")))
            raise ConversionError(
                f"{directory} has no {SINGLE_FILE} or {INDEX_FILE}"
                + (f" (it has {others}: save the model with safe_serialization=True)"
                   if others else "") + ".")
        self._handles: Dict[str, object] = {}
        self._open = safe_open
        if weight_map is None:
            handle = self._handle(SINGLE_FILE)
            weight_map = {name: SINGLE_FILE for name in handle.keys()}
        missing = sorted({f for f in weight_map.values()
                          if not os.path.isfile(os.path.join(directory, f))})
        if missing:
            raise ConversionError(f"{directory} lacks the weight file(s) {missing} its index names.")
        self.weight_map: Dict[str, str] = dict(weight_map)

    def _handle(self, filename: str):
        if filename not in self._handles:
            try:
                self._handles[filename] = self._open(os.path.join(self.directory, filename),
                                                     framework="pt")
            except Exception as err:  # noqa: BLE001 - a damaged file is bad input
                raise ConversionError(f"{os.path.join(self.directory, filename)} cannot be read "
                                      f"as safetensors: {err}") from None
        return self._handles[filename]

    def release(self) -> None:
        """Close the open files. safetensors maps a file into memory, and every page read stays
        resident (and counts in the process's memory) while it is mapped: a reader that
        streams through a large folder releases after each part, so only that part's pages
        are held (tensors still in use keep their own pages)."""
        self._handles.clear()

    def names(self) -> List[str]:
        return list(self.weight_map)

    def get(self, name: str) -> Optional[torch.Tensor]:
        filename = self.weight_map.get(name)
        if filename is None:
            return None
        return self._handle(filename).get_tensor(name)

    def shape(self, name: str) -> Tuple[int, ...]:
        return tuple(self._handle(self.weight_map[name]).get_slice(name).get_shape())
