"""Megatron's indexed dataset on disk: output names, safe writing, and a consistency check.

The format is megatron-core's (`megatron.core.datasets.indexed_dataset`): `<prefix>.bin` holds
the token ids of all sequences back to back; `<prefix>.idx` holds a header (magic
`MMIDIDX\\0\\0`, version 1, dtype code, sequence count, document count) then the sequence
lengths (int32), the byte offsets of the sequences (int64) and the sequence index at which
each document ends (int64, starting with 0). Writing goes through megatron-core's
`IndexedDatasetBuilder`, so files written here read in Megatron-LM and the other way round.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy

from spannorm_megatron.errors import IndexedDatasetError
from spannorm_megatron.orphans import process_gone

INDEX_MAGIC = b"MMIDIDX\x00\x00"
_HEADER = struct.Struct("<9sQBQQ")  # magic, version, dtype code, sequence count, document count
_DTYPES = {1: numpy.uint8, 2: numpy.int8, 3: numpy.int16, 4: numpy.int32, 5: numpy.int64,
           6: numpy.float64, 7: numpy.float32, 8: numpy.uint16}  # megatron-core's DType codes


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
    regenerate = (
        "Regenerate both files together with tools/preprocess_data.py (or restore the pair "
        "that was written together); never mix a .bin and an .idx from different runs."
    )
    idx_size = os.path.getsize(idx_path)
    with open(idx_path, "rb") as stream:
        header = stream.read(_HEADER.size)
    if len(header) < _HEADER.size or not header.startswith(INDEX_MAGIC):
        raise IndexedDatasetError(
            f"'{idx_path}' is not a Megatron index file (it does not start with the "
            f"MMIDIDX header), so it cannot describe '{bin_path}'. {regenerate}"
        )
    _, version, code, sequences, documents = _HEADER.unpack(header)
    if version != 1 or code not in _DTYPES:
        raise IndexedDatasetError(
            f"'{idx_path}' has index version {version} and dtype code {code}; megatron-core "
            f"reads version 1 with dtype codes 1-8. {regenerate}"
        )
    dtype = _DTYPES[code]
    expected_idx = _HEADER.size + sequences * (4 + 8) + documents * 8
    if idx_size not in (expected_idx, expected_idx + sequences):  # + 1 byte/sequence: multimodal
        raise IndexedDatasetError(
            f"'{idx_path}' is {idx_size} bytes but its header announces {sequences} sequences "
            f"and {documents} document entries ({expected_idx} bytes): the index is truncated "
            f"or damaged, so it cannot be used with '{bin_path}'. {regenerate}"
        )
    lengths = numpy.memmap(idx_path, dtype=numpy.int32, mode="r", offset=_HEADER.size,
                           shape=(sequences,)) if sequences else numpy.zeros(0, numpy.int32)
    doc_index = numpy.memmap(
        idx_path, dtype=numpy.int64, mode="r", offset=_HEADER.size + sequences * 12,
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


def read_sequence_lengths(prefix: str) -> numpy.ndarray:
    """The sequence lengths of `<prefix>.idx` as an in-memory int32 array (checked first).

    A copy, not a view: views of megatron-core's `IndexedDataset` arrays die with its mmap,
    and touching one after the dataset object is gone crashes the interpreter.
    """
    info = check_indexed_dataset(prefix)
    if info.num_sequences == 0:
        return numpy.zeros(0, numpy.int32)
    lengths = numpy.memmap(prefix + ".idx", dtype=numpy.int32, mode="r", offset=_HEADER.size,
                           shape=(info.num_sequences,))
    copy = numpy.array(lengths)
    del lengths
    return copy


def remove_killed_writers_files(prefix: str) -> List[str]:
    """Remove `<prefix>.tmp<pid>.bin/.idx` of writers that no longer run; the paths removed."""
    directory, base = os.path.split(os.path.abspath(prefix))
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        match = re.fullmatch(re.escape(base) + r"\.tmp(\d+)\.(bin|idx)", name)
        if match and process_gone(int(match.group(1))):
            os.remove(os.path.join(directory, name))
            removed.append(os.path.join(directory, name))
    return removed


class AtomicIndexedDatasetWriter:
    """megatron-core `IndexedDatasetBuilder`s, one per key, that only replace outputs on success.

    Each key's data goes to `<prefix>.tmp<pid>.bin/.idx` next to the final files; `commit()`
    renames them into place, `abort()` deletes them. Until `commit()`, existing files with the
    final names are never opened, so a failed run leaves them as they were. What a killed run
    left (its PID no longer runs) is removed when the next writer of the same prefix starts.
    """

    def __init__(self, prefixes: Dict[str, str], dtype: type) -> None:
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.prefixes = dict(prefixes)
        for prefix in self.prefixes.values():
            remove_killed_writers_files(prefix)
        self._tmp = {key: f"{prefix}.tmp{os.getpid()}" for key, prefix in self.prefixes.items()}
        self.builders = {}
        try:
            for key, tmp in self._tmp.items():
                Path(tmp).parent.mkdir(parents=True, exist_ok=True)
                self.builders[key] = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
        except BaseException:
            self.abort()
            raise

    def add_document(self, key: str, tokens: Sequence[int], lengths: List[int]) -> None:
        """Append one document: its tokens and the lengths of its sequences (sentences)."""
        self.builders[key].add_document(tokens, lengths)

    def commit(self) -> Dict[str, str]:
        """Finish the indexes and move both files of every key into place; returns the prefixes."""
        try:
            for key, builder in self.builders.items():
                builder.finalize(self._tmp[key] + ".idx")
        except BaseException:
            self.abort()
            raise
        for key, prefix in self.prefixes.items():
            for ext in (".bin", ".idx"):
                os.replace(self._tmp[key] + ext, prefix + ext)
        return dict(self.prefixes)

    def abort(self) -> None:
        """Close and delete the temporary files; the final names are not touched."""
        for builder in self.builders.values():
            try:
                builder.data_file.close()
            except Exception:
                pass
        for tmp in self._tmp.values():
            for ext in (".bin", ".idx"):
                try:
                    os.remove(tmp + ext)
                except FileNotFoundError:
                    pass


def existing_outputs(prefixes: Dict[str, str]) -> List[str]:
    """Files among the `.bin`/`.idx` of `prefixes` that already exist (to tell the user)."""
    paths = [p + ext for p in prefixes.values() for ext in (".bin", ".idx")]
    return [path for path in paths if os.path.exists(path)]


def gpt_index_cache_dir(prefix: str) -> Optional[str]:
    """GPTDataset's default index cache for `prefix` (`<prefix>/cache/GPTDataset_indices`), if any.

    GPTDataset names its cached sample/shuffle indices after its settings, not after the data,
    so a cache left from earlier data at the same prefix would be silently reused.
    """
    path = os.path.join(prefix, "cache", "GPTDataset_indices")
    return path if os.path.isdir(path) else None
