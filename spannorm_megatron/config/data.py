"""Where the training data is, how it is cut into samples and loaded: Megatron-LM's
`--data-path` / `--split` flags, their syntax and checks (`data.dataset` builds the datasets)."""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple, Union

from spannorm_megatron.config.options import check, derived, is_number, option
from spannorm_megatron.errors import DataError
from spannorm_megatron.errors import ConfigError

Blend = Tuple[List[str], Optional[List[float]]]
"""megatron-core's blend: (prefixes, weights or None)."""

PathSpec = Union[None, str, Sequence[str]]


def _tokens(spec: PathSpec) -> Optional[List[str]]:
    if spec is None:
        return None
    if isinstance(spec, str):
        spec = spec.split()
    tokens = [str(t) for t in spec if str(t).strip()]
    return tokens or None


def parse_blend(spec: PathSpec, flag: str = "--data-path") -> Optional[Blend]:
    """Megatron-LM's `--data-path` syntax to a megatron-core blend.

    `"prefix"` or `["p1", "p2"]` (no weights: blended in proportion to their sizes), or
    `"w1 p1 w2 p2"` / `["w1", "p1", "w2", "p2"]` (relative weights, need not sum to 1).
    """
    tokens = _tokens(spec)
    if tokens is None:
        return None
    if len(tokens) % 2 == 0 and is_number(tokens[0]):
        weights, prefixes = tokens[0::2], tokens[1::2]
        bad = [w for w in weights if not is_number(w)] + [p for p in prefixes if is_number(p)]
        if bad:
            raise DataError(
                f"{flag} {' '.join(tokens)} mixes weights and paths wrongly at '{bad[0]}': give "
                "either prefixes only ('p1 p2') or weight/prefix pairs ('0.7 p1 0.3 p2')."
            )
        values = [float(w) for w in weights]
        # megatron-core's BlendedDataset asserts every weight > 0 (a zero-weight prefix is no
        # part of a blend), and a weight that is not finite makes the normalized ones NaN.
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise DataError(
                f"{flag} weights {', '.join(weights)} must each be a positive, finite number "
                f"(drop a prefix rather than weighting it 0)."
            )
        return list(prefixes), values
    numbers = [t for t in tokens if is_number(t)]
    if numbers:
        raise DataError(
            f"{flag} {' '.join(tokens)} has {len(tokens)} entries with numbers among them: a "
            "weighted blend needs weight/prefix pairs ('0.7 p1 0.3 p2'), an unweighted one "
            "prefixes only ('p1 p2')."
        )
    return tokens, None


def parse_split(split: str) -> List[float]:
    """`"969,30,1"` → normalized [train, valid, test] fractions (missing entries are 0)."""
    parts = [p.strip() for p in re.split(r"[,/]", split) if p.strip()]
    try:
        values = [float(p) for p in parts]
    except ValueError:
        values = []
    if not 1 <= len(values) <= 3 or any(v < 0 for v in values) or sum(values) <= 0:
        raise DataError(
            f"--split '{split}' is not a train,valid,test weighting; give up to three "
            "non-negative numbers with a positive sum, e.g. '969,30,1' or '98,2,0'."
        )
    values += [0.0] * (3 - len(values))
    return [v / sum(values) for v in values]


LEGACY_SPLIT = "969,30,1"  # Megatron-LM's value when --data-path comes without --split


WORKERS_PER_CPU = 4
MIN_WORKER_LIMIT = 8
"""More DataLoader workers per node than this (and than WORKERS_PER_CPU per CPU) are refused."""


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity, as taskset and cgroups' cpusets set it)."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):
        return os.cpu_count() or 1


@dataclass
class DataConfig:
    """Where the training data is, how it is cut into samples and loaded (Megatron-LM's flags)."""

    seq_length: int = option(
        256, "Tokens per sample (each sample reads seq_length + 1 tokens so that the labels "
        "are the tokens shifted by one).", at_least=1, required=True)
    data_path: Optional[List[str]] = option(
        None, "Prefixes of .bin/.idx datasets, optionally weighted ('w1 p1 w2 p2'); split by "
        "--split.", path="data_prefix")
    split: Optional[str] = option(
        None, f"train,valid,test weighting of the documents of every --data-path prefix; "
        f"unset: Megatron-LM's legacy {LEGACY_SPLIT}, with a warning.")
    train_data_path: Optional[List[str]] = option(
        None, "A blend for training only (with --valid-data-path/--test-data-path, no --split).",
        path="data_prefix")
    valid_data_path: Optional[List[str]] = option(None, "A blend for validation only.",
                                                   path="data_prefix")
    test_data_path: Optional[List[str]] = option(None, "A blend for testing only.",
                                                  path="data_prefix")
    mock_data: bool = option(
        False, "Train on megatron-core's MockGPTDataset instead of files: synthetic documents "
        "of counting token ids, each ended by the tokenizer's end-of-document token (smoke tests "
        "and benchmarks; megatron-core splits it 1,1,1 whatever --split says).")
    seed: int = derived(1234, "Seeds megatron-core's document and sample shuffles.",
                        source="--seed", at_least=0)
    data_cache_path: Optional[str] = option(
        None, "Where index caches go; unset: <prefix>/cache/ per prefix.", path="output_folder")
    reset_position_ids: bool = option(
        False, "Restart position ids after every end-of-document token.")
    eod_mask_loss: bool = option(
        False, "No loss on predicting the end-of-document token's successor.")
    mmap_bin_files: bool = option(True, "Read .bin files through mmap (--no-mmap-bin-files: "
                                  "file reads).")
    num_dataset_builder_threads: int = option(
        1, "Threads building the datasets of a blend.", at_least=1)
    num_workers: int = option(2, "DataLoader worker processes per rank (0: load in the "
                              "training process; all ranks of a node together at most 4 per "
                              "usable CPU, or 8).", at_least=0)
    create_attention_mask_in_dataloader: bool = option(
        True, "Every sample carries its causal attention mask ([1, s, s]), which the attention "
        "applies; --no-create-attention-mask-in-dataloader leaves it out and the attention "
        "makes the same causal mask itself (the same numbers, without s x s bytes per sample "
        "to load and move).", flag="--no-create-attention-mask-in-dataloader", negative=True)

    def __post_init__(self) -> None:
        try:
            check(self)
        except ConfigError as error:
            raise DataError(str(error)) from None
        sources = count_sources(self.data_path, self.train_data_path, self.valid_data_path,
                                self.test_data_path, self.mock_data)
        if sources != 1:
            raise data_source_error(sources)
        if not any(_tokens(spec) for _, spec in self._per_split_specs()) \
                and parse_split(self.resolved_split)[0] == 0:
            raise DataError(
                f"--split {self.resolved_split} leaves no data for training: give the first "
                f"(train) weight a positive value, e.g. '98,2,0'.")
        parse_blend(self.data_path)
        for flag, spec in self._per_split_specs():
            parse_blend(spec, flag)

    def check_machine(self, ranks_here: int) -> None:
        """Refuse more DataLoader workers than this machine can run: each is a fork of its
        rank, and `--num-workers` per rank times the ranks on this node beyond
        WORKERS_PER_CPU per usable CPU only queue for those CPUs, while every fork holds
        memory (a count like 10^9 forks the machine out of memory before the first batch)."""
        cpus = usable_cpus()
        limit = max(MIN_WORKER_LIMIT, WORKERS_PER_CPU * cpus)
        if self.num_workers * ranks_here > limit:
            per_rank = max(0, limit // max(1, ranks_here))
            raise DataError(
                f"--num-workers {self.num_workers} x {ranks_here} rank(s) on this machine would "
                f"start {self.num_workers * ranks_here:,} DataLoader processes on {cpus} usable "
                f"CPU(s); at most {limit} can help ({WORKERS_PER_CPU} per CPU). Use --num-workers "
                f"{min(per_rank, 2)} (Megatron-LM's default is 2), or up to {per_rank}.")

    def _per_split_specs(self):
        return [
            ("--train-data-path", self.train_data_path),
            ("--valid-data-path", self.valid_data_path),
            ("--test-data-path", self.test_data_path),
        ]

    @property
    def resolved_split(self) -> str:
        return LEGACY_SPLIT if self.split is None else self.split

    @property
    def has_training_data(self) -> bool:
        """Whether the training split gets data: mock data, a --data-path blend whose --split
        gives training a share, or a --train-data-path."""
        if self.mock_data:
            return True
        if self.blend is not None:
            return parse_split(self.resolved_split)[0] > 0
        return bool(_tokens(self.train_data_path))

    def training_data_problem(self) -> str:
        """What leaves training without data (for a message), when `has_training_data` is
        false."""
        if self.blend is not None:
            return f"--split {self.resolved_split} gives training no share of --data-path"
        return "--valid-data-path/--test-data-path are given without --train-data-path"

    @property
    def blend(self) -> Optional[Blend]:
        return parse_blend(self.data_path)

    @property
    def blend_per_split(self) -> Optional[List[Optional[Blend]]]:
        if self.blend is not None or self.mock_data:
            return None
        return [parse_blend(spec, flag) for flag, spec in self._per_split_specs()]


def count_sources(data_path: PathSpec, train_data_path: PathSpec, valid_data_path: PathSpec,
                  test_data_path: PathSpec, mock_data: bool) -> int:
    """How many of the three ways of giving the data a run names (exactly one may be)."""
    per_split = any(_tokens(p) for p in (train_data_path, valid_data_path, test_data_path))
    return int(mock_data) + int(bool(_tokens(data_path))) + int(per_split)


def data_source_error(sources: int) -> DataError:
    """The refusal of a run that names no data (`sources` 0) or several kinds of it."""
    return DataError(
        "Give the data as one of: --data-path (split by --split), "
        "--train-data-path/--valid-data-path/--test-data-path, or --mock-data "
        f"(megatron-core's synthetic data); {'none' if not sources else 'several'} "
        "given. Prefixes are what tools/preprocess_data.py wrote, e.g. "
        "data/corpus_text_document."
    )
