"""Megatron's indexed dataset format, and the check that a `.bin` and its `.idx` belong
together: what a `--data-path` prefix must hold (`config.paths`, kind "data prefix").

The format is megatron-core's (`megatron.core.datasets.indexed_dataset`): `<prefix>.bin` holds
the token ids of all sequences back to back; `<prefix>.idx` holds a header (magic
`MMIDIDX\\0\\0`, version 1, dtype code, sequence count, document count) then the sequence
lengths (int32), the byte offsets of the sequences (int64) and the sequence index at which
each document ends (int64, starting with 0). Here, below the data layer, because the flags'
parser checks a prefix before anything heavy loads; numpy loads only when a prefix is checked.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass

from spannorm_megatron.errors import IndexedDatasetError

INDEX_MAGIC = b"MMIDIDX\x00\x00"
HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
DTYPES = {1: "uint8", 2: "int8", 3: "int16", 4: "int32", 5: "int64", 6: "float64",
          7: "float32", 8: "uint16"}  # megatron-core's DType codes, as numpy dtype names


def output_prefix(output_prefix: str, key: str, level: str = "document") -> str:
    """Megatron-LM's name for one key's dataset: `{output_prefix}_{key}_{level}`.

    `tools/preprocess_data.py --output-prefix data/corpus --json-keys text` therefore writes
    `data/corpus_text_document.bin/.idx`, and `--data-path data/corpus_text_document` reads it.
    """
    return f"{output_prefix}_{key}_{level}"


@dataclass(frozen=True)
class IndexedDatasetInfo:
    """What `check_indexed_dataset` found in a consistent `.bin`/`.idx` pair."""

    prefix: str
    num_sequences: int
    num_documents: int
    """Documents, i.e. entries of the document index minus its leading 0."""
    num_tokens: int
    dtype: type


def _missing_data_message(prefix: str, bin_path: str, idx_path: str, what: str) -> str:
    missing = [p for p in (bin_path, idx_path) if not os.path.exists(p)]
    looked = f"looked for '{bin_path}' and '{idx_path}'; " + (
        "neither exists" if len(missing) == 2 else f"'{missing[0]}' is missing"
    )
    hints = []
    for ext in (".bin", ".idx"):
        if prefix.endswith(ext):
            hints.append(f"drop the '{ext}' suffix: the path is a prefix ('{prefix[: -len(ext)]}')")
    for key in ("text",):
        candidate = output_prefix(prefix, key)
        if os.path.exists(candidate + ".bin"):
            hints.append(f"did you mean '{candidate}'?")
    hints.append(
        "pass the prefix tools/preprocess_data.py reported, i.e. "
        "'<output-prefix>_<json-key>_document' without .bin/.idx"
    )
    return f"{what} '{prefix}' not found: {looked}. Fix: " + "; ".join(hints) + "."


def check_indexed_dataset(prefix: str, what: str = "Data path") -> IndexedDatasetInfo:
    """Check that `<prefix>.bin` and `<prefix>.idx` exist and belong together.

    megatron-core only asserts that both files exist; a truncated `.bin`, or an `.idx` from
    another run, then reads garbage tokens or fails deep in its C++ helpers. Here the header,
    the `.idx` size and the `.bin` size implied by the sequence lengths are checked, and any
    mismatch raises IndexedDatasetError naming both files.
    """
    bin_path, idx_path = prefix + ".bin", prefix + ".idx"
    if not (os.path.isfile(bin_path) and os.path.isfile(idx_path)):
        raise IndexedDatasetError(_missing_data_message(prefix, bin_path, idx_path, what))
    # The parser checks a prefix, and the Trainer again with the data's other checks: files
    # that have not changed since are not read twice (the .idx of a large corpus is GBs).
    key = (prefix, *(_identity(path) for path in (bin_path, idx_path)))
    if key not in _CHECKED:
        _CHECKED[key] = _check_pair(prefix, bin_path, idx_path)
    return _CHECKED[key]


_CHECKED: dict = {}


def _identity(path: str) -> tuple:
    # ctime too: a copy that keeps the old mtime (cp -p) still changes it.
    stat = os.stat(path)
    return stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def _check_pair(prefix: str, bin_path: str, idx_path: str) -> IndexedDatasetInfo:
    import numpy

    regenerate = (
        "Regenerate both files together with tools/preprocess_data.py (or restore the pair "
        "that was written together); never mix a .bin and an .idx from different runs."
    )
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        header = stream.read(HEADER.size)
    if len(header) < HEADER.size or not header.startswith(INDEX_MAGIC):
        raise IndexedDatasetError(
            f"'{idx_path}' is not a Megatron index file (it does not start with the "
            f"MMIDIDX header), so it cannot describe '{bin_path}'. {regenerate}"
        )
    _, version, code, sequences, documents = HEADER.unpack(header)
    if version != 1 or code not in DTYPES:
        raise IndexedDatasetError(
            f"'{idx_path}' has index version {version} and dtype code {code}; megatron-core "
            f"reads version 1 with dtype codes 1-8. {regenerate}"
        )
    dtype = getattr(numpy, DTYPES[code])
    expected_idx = HEADER.size + sequences * (4 + 8) + documents * 8
    if idx_size not in (expected_idx, expected_idx + sequences):  # + 1 byte/sequence: multimodal
        raise IndexedDatasetError(
            f"'{idx_path}' is {idx_size} bytes but its header announces {sequences} sequences "
            f"and {documents} document entries ({expected_idx} bytes): the index is truncated "
            f"or damaged, so it cannot be used with '{bin_path}'. {regenerate}"
        )
    lengths = numpy.memmap(idx_path, dtype=numpy.int32, mode="r", offset=HEADER.size,
                           shape=(sequences,)) if sequences else numpy.zeros(0, numpy.int32)
    doc_index = numpy.memmap(
        idx_path, dtype=numpy.int64, mode="r", offset=HEADER.size + sequences * 12,
        shape=(documents,),
    ) if documents else numpy.zeros(0, numpy.int64)
    num_tokens = int(lengths.sum(dtype=numpy.int64))
    itemsize = numpy.dtype(dtype).itemsize
    bin_size = os.path.getsize(bin_path)
    if bin_size != num_tokens * itemsize:
        raise IndexedDatasetError(
            f"'{bin_path}' ({bin_size} bytes) and '{idx_path}' do not match: the index describes "
            f"{sequences} sequences of {num_tokens} {numpy.dtype(dtype).name} tokens "
            f"({num_tokens * itemsize} bytes). One of the two was rewritten, truncated or comes "
            f"from another preprocessing run. {regenerate}"
        )
    if documents == 0 or doc_index[0] != 0 or doc_index[-1] != sequences:
        raise IndexedDatasetError(
            f"'{idx_path}' has an inconsistent document index (it must run from 0 to the "
            f"sequence count {sequences}), so it cannot be used with '{bin_path}'. {regenerate}"
        )
    del lengths, doc_index
    return IndexedDatasetInfo(prefix, sequences, documents - 1, num_tokens, dtype)


