"""Train/valid/test GPT datasets from Megatron-LM style `--data-path` / `--split` settings.

All the dataset machinery is megatron-core's: `BlendedMegatronDatasetBuilder` builds a
`GPTDataset` per data prefix and split (document/sample/shuffle indices from its compiled
`helpers_cpp`, cached as `.npy`), and a `BlendedDataset` when several prefixes are weighted.
What this module adds is checking the user's settings and files first, because megatron-core
reports them with bare asserts or not at all:

* a missing prefix (message lists the files looked for and the likely fix),
* an `.idx` that does not describe its `.bin` (`check_indexed_dataset`),
* malformed weights/split strings,
* a split that gets no tokens from a small dataset (megatron-core would loop forever in
  `GPTDataset._get_num_epochs` trying to fill the requested samples from zero tokens),
* index caches left from earlier data at the same prefix (megatron-core names caches after its
  settings, not after the data, and would silently reuse them).

CPU: none of this needs CUDA. The compiled helpers ship in the megatron-core wheel
(`megatron/core/datasets/helpers_cpp*.so`) and are only imported, never compiled; the builder's
single `torch.cuda.device_count()` call (thread count on rank 0) returns 0 without a GPU, which
it handles. With torch.distributed initialized, rank 0 builds (and caches) first and the other
ranks then load its caches, so all ranks must call `build_gpt_datasets`.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import re
import warnings
from typing import Callable, List, Optional, Sequence, Tuple

from spannorm_megatron.config.data import DataConfig, parse_split
from spannorm_megatron.errors import DataError
from spannorm_megatron.data.indexed import check_indexed_dataset, read_sequence_lengths

def num_samples_for(
    train_iters: int, global_batch_size: int, eval_interval: Optional[int], eval_iters: int,
    train_samples: Optional[int] = None
) -> Tuple[int, int, int]:
    """Samples per split, as Megatron-LM asks for them: train for all iterations (or
    --train-samples), valid for every evaluation (plus the final one), test for one
    evaluation."""
    evaluations = (train_iters // eval_interval if eval_interval else 0) + 1
    return (
        train_samples if train_samples is not None else train_iters * global_batch_size,
        evaluations * eval_iters * global_batch_size,
        eval_iters * global_batch_size,
    )


SAMPLE_INDEX_BYTES = 12
"""The least memory megatron-core's GPTDataset takes per sample asked for: its sample index (two
int32 per sample) and its shuffle index (at least one int32 per sample)."""


def check_sample_index_memory(num_samples: Sequence[int], train_samples_flag: str,
                              eval_flags: str) -> None:
    """Refuse sample counts whose indexes alone would not fit in this machine's memory:
    megatron-core builds them in full before the first step (a count like 10^9 evaluation
    iterations ends in std::bad_alloc, or the OOM killer). `train_samples_flag` and
    `eval_flags` name what set the training and the evaluation counts."""
    from spannorm_megatron.machine import host_memory_bytes

    available = host_memory_bytes()
    needed = sum(num_samples) * SAMPLE_INDEX_BYTES
    if not available or needed <= available:
        return
    train, valid, test = num_samples
    raise DataError(
        f"the run asks the datasets for {sum(num_samples):,} samples ({train:,} for training "
        f"from {train_samples_flag}, {valid + test:,} for evaluation from {eval_flags}); their "
        f"indexes alone take at least {needed / 1024 ** 3:,.1f} GiB, and this machine has "
        f"{available / 1024 ** 3:,.1f} GiB. Ask for fewer.")


def _check_split_has_tokens(prefix: str, split: str) -> None:
    """Refuse splits that would get no tokens (megatron-core would never finish building).

    Even a split asked for 0 samples is built (GPTDataset then wants one token), so every split
    with a non-zero weight needs tokens.
    """
    import numpy
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix,
    )

    matrix = convert_split_vector_to_split_matrix(parse_split(split))
    lengths = read_sequence_lengths(prefix)
    count = lengths.shape[0]
    for index, (name, bookends) in enumerate(zip(("train", "valid", "test"), matrix)):
        if bookends is None:
            continue
        begin = int(round(bookends[0] * float(count)))
        end = int(round(bookends[1] * float(count)))
        if int(numpy.sum(lengths[begin:end], dtype=numpy.int64)) == 0:
            weights = [p.strip() for p in re.split(r"[,/]", split) if p.strip()] + ["0"] * 3
            weights = weights[:3]
            weights[index] = "0"
            raise DataError(
                f"--split {split} gives the {name} split of '{prefix}' sequences {begin}..{end} "
                f"of its {count}, which hold no tokens. Use more data, give the {name} split a "
                f"larger share, or drop it (--split {','.join(weights)})."
            )


FINGERPRINT_SUFFIX = ".data.json"


def data_fingerprint(prefix: str) -> dict:
    """What identifies the data at `prefix`: both files' sizes and the .idx's SHA-256 (the index
    of every document; small next to the .bin). Not the mtime, which copies keep (cp -p)."""
    with open(prefix + ".idx", "rb") as stream:
        digest = hashlib.sha256(stream.read()).hexdigest()
    return {"bin_bytes": os.path.getsize(prefix + ".bin"),
            "idx_bytes": os.path.getsize(prefix + ".idx"), "idx_sha256": digest}


def _cache_descriptions(prefix: str, cache_path: Optional[str]) -> List[str]:
    """megatron-core's GPTDataset cache descriptions built from `prefix`."""
    directory = cache_path or os.path.join(prefix, "cache", "GPTDataset_indices")
    found = []
    for description in glob.glob(os.path.join(directory, "*GPTDataset*description.txt")):
        try:
            with open(description, encoding="utf-8") as stream:
                if json.load(stream).get("dataset_path") == prefix:
                    found.append(description)
        except (OSError, ValueError):
            continue
    return found


def _check_cache_is_current(prefix: str, cache_path: Optional[str]) -> None:
    """Refuse GPTDataset index caches built for other data at this prefix: megatron-core names
    them after the dataset's settings, not its content, and would reuse them."""
    fingerprint = None
    for description in _cache_descriptions(prefix, cache_path):
        try:
            with open(description + FINGERPRINT_SUFFIX) as stream:
                recorded = json.load(stream)
        except (OSError, ValueError):
            recorded = None
        if recorded is None:  # built before fingerprints: judged by time, as then
            stale = os.path.getmtime(description) < os.path.getmtime(prefix + ".idx")
        else:
            fingerprint = fingerprint or data_fingerprint(prefix)
            stale = recorded != fingerprint
        if stale:
            raise DataError(
                f"The GPTDataset index cache '{description}' (and its .npy files) was built for "
                f"other data than '{prefix}' holds now (its files were replaced); megatron-core "
                "would reuse it. Delete the stale cache files (or the whole "
                f"'{os.path.dirname(description)}' directory) and run again; they are rebuilt "
                "automatically."
            )


def record_cache_fingerprints(prefixes: Sequence[str], cache_path: Optional[str]) -> None:
    """After a build: tie each cache of `prefixes` to the data it was built from."""
    for prefix in prefixes:
        fingerprint = None
        for description in _cache_descriptions(prefix, cache_path):
            path = description + FINGERPRINT_SUFFIX
            if os.path.exists(path):
                continue
            fingerprint = fingerprint or data_fingerprint(prefix)
            tmp = f"{path}.tmp{os.getpid()}"
            try:
                with open(tmp, "w") as stream:
                    json.dump(fingerprint, stream)
                os.replace(tmp, path)
            except OSError:
                pass  # a read-only cache: checked by time on the next run


def data_prefixes(config: DataConfig) -> List[str]:
    """Every prefix `config` reads (none for mock data)."""
    if config.mock_data:
        return []
    blends = [config.blend] if config.blend is not None else config.blend_per_split
    return [prefix for blend in blends if blend is not None for prefix in blend[0]]


def check_data_prefixes(
    config: DataConfig, sizes: Sequence[Optional[int]], cache_path: Optional[str] = None
) -> List[str]:
    """Check every prefix of `config` (files, pairing, caches, splits); returns the prefixes.

    `cache_path` is where the GPTDataset index caches live (`effective_cache_path`).
    """
    checked = []
    if config.mock_data:
        return checked
    if config.blend is not None:
        blends = [("--data-path", config.blend, [0, 1, 2])]
    else:
        blends = [
            (flag, blend, [index])
            for index, ((flag, _), blend) in enumerate(
                zip(config._per_split_specs(), config.blend_per_split)
            )
            if blend is not None
        ]
    for flag, (prefixes, weights), split_indices in blends:
        if weights is not None and any(sizes[i] is None for i in split_indices):
            raise DataError(
                f"{flag} has weights, so megatron-core needs the number of samples of "
                f"{'every split' if len(split_indices) > 1 else 'that split'}; pass sample "
                "counts (e.g. from num_samples_for), not None."
            )
        for prefix in prefixes:
            info = check_indexed_dataset(prefix, what=f"Data path (from {flag})")
            if info.num_tokens == 0:
                raise DataError(
                    f"Data path '{prefix}' (from {flag}) holds no tokens ({info.num_documents} "
                    "empty documents); megatron-core cannot draw samples from it. Preprocess "
                    "non-empty text into it, or leave it out of the blend."
                )
            _check_cache_is_current(prefix, cache_path)
            if flag == "--data-path":
                _check_split_has_tokens(prefix, config.resolved_split)
            checked.append(prefix)
    return checked


def effective_cache_path(config: DataConfig) -> Optional[str]:
    """`config.data_cache_path`, unless megatron-core 0.16.1 cannot use it in this process.

    megatron-core's `BlendedDataset._build_indices` calls `torch.distributed.get_rank()` without
    checking that torch.distributed is initialized whenever a cache path is set, so a blend of
    several prefixes fails in a plain single process (scripts, notebooks). There the cache path
    is dropped: GPTDataset then caches next to each prefix (`<prefix>/cache/`) and the blend
    indices, which are cheap, are rebuilt each time. Training runs initialize torch.distributed
    (gloo on CPU) and keep the cache path.
    """
    import torch

    if config.data_cache_path is None or torch.distributed.is_initialized():
        return config.data_cache_path
    blends = [config.blend] if config.blend is not None else config.blend_per_split or []
    if any(blend is not None and len(blend[0]) > 1 for blend in blends):
        warnings.warn(
            f"--data-cache-path {config.data_cache_path} is not used: megatron-core 0.16.1 can "
            "cache a blend of several prefixes only with torch.distributed initialized; "
            "caching next to each prefix instead.",
            stacklevel=3,
        )
        return None
    return config.data_cache_path


_FROM_CONFIG = object()


def gpt_dataset_config(config: DataConfig, tokenizer, cache_path=_FROM_CONFIG):
    """megatron-core's `GPTDatasetConfig` for `config` and `tokenizer`.

    Samples carry `tokens`, `labels`, `loss_mask`, `position_ids`, and with
    `create_attention_mask_in_dataloader` (Megatron-LM's default) the causal `attention_mask`
    that `forward_step` hands to the model. Without a blend (--mock-data) megatron-core makes
    the config a mock one itself. `cache_path`: see `effective_cache_path`.
    """
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    if cache_path is _FROM_CONFIG:
        cache_path = effective_cache_path(config)
    return GPTDatasetConfig(
        random_seed=config.seed,
        sequence_length=config.seq_length,
        blend=config.blend,
        blend_per_split=config.blend_per_split,
        split=config.resolved_split if config.blend is not None else None,
        path_to_cache=cache_path,
        mmap_bin_files=config.mmap_bin_files,
        tokenizer=tokenizer,
        reset_position_ids=config.reset_position_ids,
        reset_attention_mask=False,
        eod_mask_loss=config.eod_mask_loss,
        create_attention_mask=config.create_attention_mask_in_dataloader,
        num_dataset_builder_threads=config.num_dataset_builder_threads,
    )


def build_gpt_datasets(
    config: DataConfig,
    tokenizer,
    num_samples: Sequence[Optional[int]],
    is_built_on_rank: Optional[Callable[[], bool]] = None,
    *,
    check_prefixes: bool = True,
):
    """Build (train, valid, test) datasets with megatron-core; a split may come back None.

    Args:
        config: the data settings.
        tokenizer: a megatron-core tokenizer (e.g. `SentencePieceTokenizer`): GPTDataset reads
            its `eod`, `pad` and `vocab_size`.
        num_samples: samples wanted per split (`num_samples_for`); None builds one epoch.
        is_built_on_rank: megatron-core's hook deciding which ranks hold data (default: all).
        check_prefixes: False when the caller has run `check_data_prefixes` already (the
            Trainer does, before any process group exists), so the files are read once.

    Every sample is a dict of [seq_length] tensors `tokens`, `labels` (tokens shifted left by
    one), `loss_mask`, `position_ids`, and the [1, seq_length, seq_length] `attention_mask`
    (True where attention is masked) unless --no-create-attention-mask-in-dataloader;
    `loader.build_data_loader` batches them.
    """
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, MockGPTDataset

    sizes = list(num_samples)
    if len(sizes) != 3 or any(s is not None and s < 0 for s in sizes):
        raise DataError(
            f"num_samples must be [train, valid, test] sample counts (>= 0, or None for one "
            f"epoch), got {num_samples}."
        )
    cache_path = effective_cache_path(config)
    if check_prefixes:
        check_data_prefixes(config, sizes, cache_path)
    builder = BlendedMegatronDatasetBuilder(
        MockGPTDataset if config.mock_data else GPTDataset,
        sizes,
        is_built_on_rank or (lambda: True),
        gpt_dataset_config(config, tokenizer, cache_path),
    )
    datasets = tuple(builder.build())
    record_cache_fingerprints(data_prefixes(config), cache_path)
    return datasets


_SPLIT_NAMES = ("train", "validation", "test")


def describe_epochs(datasets: Sequence) -> Optional[str]:
    """One line saying which splits megatron-core's GPTDataset repeats to give the samples asked
    of it, with the numbers (it builds the epochs silently), or None when nothing repeats.
    `datasets` is `build_gpt_datasets`'s (train, valid, test); mock data has no epochs."""
    parts = []
    for name, dataset in zip(_SPLIT_NAMES, datasets):
        for part in getattr(dataset, "datasets", None) or [dataset]:  # a blend: each prefix
            if part is None or type(part).__name__ == "MockGPTDataset" or not part.num_samples:
                continue
            tokens = part._get_num_tokens_per_epoch()  # megatron-core's own count and rule
            epochs = part._get_num_epochs(tokens)
            if epochs > 1:
                parts.append(
                    f"the {name} split of {part.dataset.path_prefix} {epochs} times ("
                    f"{tokens:,} tokens an epoch; {part.num_samples:,} samples of "
                    f"{part.config.sequence_length} tokens asked)")
    if not parts:
        return None
    return ("the data is smaller than the run: megatron-core repeats (epochs) "
            + "; ".join(parts) + ".")
