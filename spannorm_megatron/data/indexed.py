"""Megatron's indexed dataset on disk: safe writing, and reading sequence lengths.

The format (and its consistency check, `check_indexed_dataset`) is described in
`spannorm_megatron.config.indexed_files`, below the configuration that checks a `--data-path`
while the flags are parsed. Writing goes through megatron-core's `IndexedDatasetBuilder`, so
files written here read in Megatron-LM and the other way round.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy

from spannorm_megatron.config.indexed_files import (  # noqa: F401  (this room's names for them)
    HEADER,
    INDEX_MAGIC,
    IndexedDatasetInfo,
    check_indexed_dataset,
    output_prefix,
)
from spannorm_megatron.orphans import process_gone


def read_sequence_lengths(prefix: str) -> numpy.ndarray:
    """The sequence lengths of `<prefix>.idx` as an in-memory int32 array (checked first).

    A copy, not a view: views of megatron-core's `IndexedDataset` arrays die with its mmap,
    and touching one after the dataset object is gone crashes the interpreter.
    """
    info = check_indexed_dataset(prefix)
    if info.num_sequences == 0:
        return numpy.zeros(0, numpy.int32)
    lengths = numpy.memmap(prefix + ".idx", dtype=numpy.int32, mode="r", offset=HEADER.size,
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
