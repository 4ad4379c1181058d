"""The model and tokenizer an evaluation runs with, from a megatron checkpoint or an HF folder.

Everything is the conversion tools' own loading code: `hf.megatron_reader` checks a checkpoint
(complete, undamaged, the tensors of its recorded config) before any process group exists; a
world of one then reads it as a TP1/PP1 model whatever layout saved it (as tools/generate.py
does), and a torchrun world builds its model chunks under the requested layout and loads them
with `checkpoint.load_checkpoint`, which reshards from any saved layout. HF folders load through
transformers (`hf.generation.load_hf_model`).
"""

from __future__ import annotations

import os
import re
from typing import List, Optional, Tuple

import torch

from spannorm_megatron.config.model import ModelConfig
from spannorm_megatron.config.parallel import ParallelConfig
from spannorm_megatron.evaluation.text import EvalTokenizer, EvaluationError
from spannorm_megatron.runtime import launch_environment


def world_size() -> int:
    return launch_environment().world_size


def load_megatron(path: str, parallel: ParallelConfig, model_config=None,
                  dtype: torch.dtype = torch.float32, seed: int = 1234
                  ) -> Tuple[ModelConfig, List[torch.nn.Module], Optional[dict]]:
    """(config, this rank's model chunks in eval mode, run record). Sets up the process groups
    (`runtime.initialize`); the caller tears them down (`runtime.destroy`)."""
    from spannorm_megatron.hf.megatron_reader import MegatronCheckpoint, local_model_config
    from spannorm_megatron.model.partition import check_model_fits_layout
    from spannorm_megatron.process import initialize

    distributed = world_size() > 1
    sizes = parallel.tensor_model_parallel_size * parallel.pipeline_model_parallel_size
    if not distributed and sizes > 1:
        raise EvaluationError(
            f"--tensor-model-parallel-size {parallel.tensor_model_parallel_size} x "
            f"--pipeline-model-parallel-size {parallel.pipeline_model_parallel_size} needs "
            f"{sizes} ranks: launch with torchrun --nproc_per_node {sizes} (one process reads "
            f"any saved layout by itself, without these flags).")
    # With torchrun, load_checkpoint verifies the checksums itself (on rank 0, once).
    ckpt = MegatronCheckpoint(path, model_config, verify_checksums=not distributed)
    config = local_model_config(ckpt.config)
    check_model_fits_layout(config, parallel)
    if not distributed:
        from spannorm_megatron.hf.megatron_reader import load_megatron_model

        initialize(seed=seed)
        config, model = load_megatron_model(ckpt, dtype=dtype)
        return config, [model], ckpt.run_record

    save_dir, iteration = _save_dir_and_iteration(ckpt.directory)
    if save_dir is None:
        raise EvaluationError(
            f"{ckpt.directory} is a bare dist checkpoint (no iter_NNNNNNN / run record): "
            f"evaluate it as a single process (without torchrun), which reads any layout.")
    from spannorm_megatron.checkpoint import load_checkpoint
    from spannorm_megatron.hf.megatron_reader import dtype_overrides
    from spannorm_megatron.model import build_model, transformer_config

    initialize(parallel, seed=seed)
    chunks = build_model(config, transformer_config(config, **parallel.transformer_kwargs(),
                                                    **dtype_overrides(dtype)))
    load_checkpoint(save_dir, chunks, None, None, model_config=config, parallel_config=parallel,
                    iteration=iteration, no_load_rng=True)
    for chunk in chunks:
        chunk.eval()
    return config, chunks, ckpt.run_record


def _save_dir_and_iteration(directory: str) -> Tuple[Optional[str], Optional[int]]:
    """`.../SAVE/iter_0000100` -> (`.../SAVE`, 100); (None, None) for other directories."""
    match = re.fullmatch(r"iter_(\d+)", os.path.basename(directory.rstrip(os.sep)))
    if not match:
        return None, None
    return os.path.dirname(directory.rstrip(os.sep)), int(match.group(1))


def resolve_tokenizer(*, tokenizer_type: Optional[str] = None,
                      tokenizer_model: Optional[str] = None, vocab_file: Optional[str] = None,
                      merge_file: Optional[str] = None, vocab_size: Optional[int] = None,
                      hf_folder: Optional[str] = None,
                      run_record: Optional[dict] = None) -> EvalTokenizer:
    """The tokenizer to evaluate with: the tokenizer flags given (completed from the run
    record, `data.tokenizer_args.recorded_tokenizer`), else the HF folder's own files, else the
    one the checkpoint's run was trained with."""
    from spannorm_megatron.data.tokenizer_args import (
        recorded_tokenizer,
        tokenizer_differences,
        tokenizer_sha256,
    )

    given = dict(tokenizer_type=tokenizer_type, tokenizer_model=tokenizer_model,
                 vocab_file=vocab_file, merge_file=merge_file, vocab_size=vocab_size)
    if hf_folder is not None and not any(v is not None for v in given.values()):
        from spannorm_megatron.hf.generation import has_hf_tokenizer

        if has_hf_tokenizer(hf_folder):
            return EvalTokenizer.huggingface(hf_folder)
        raise EvaluationError(
            "No tokenizer to evaluate with (the folder has no tokenizer files): pass the "
            "tokenizer flags (--tokenizer-type and --tokenizer-model / --vocab-file and "
            "--merge-file / --vocab-size).")
    args = (run_record or {}).get("args") if hf_folder is None else None
    config, why = recorded_tokenizer(args, **given)
    if config is None:
        raise EvaluationError(
            f"No tokenizer to evaluate with ({why}): pass the tokenizer flags (--tokenizer-type "
            f"and --tokenizer-model / --vocab-file and --merge-file / --vocab-size), or "
            f"--tokenizer-type ByteLevelTokenizer.")
    # Another tokenizer gives every id another meaning: the scores would be a stranger's.
    differ = tokenizer_differences(args, config, tokenizer_sha256(config))
    if differ:
        raise EvaluationError(
            "The checkpoint was trained with another tokenizer (" + "; ".join(differ) + "). "
            "Pass the tokenizer it was trained with, or none to use the recorded one.")
    return EvalTokenizer.of(config)


def default_seq_length(config: ModelConfig) -> int:
    """The model's maximum sequence length (`--max-position-embeddings`, which is the training
    `--seq-length` unless set): what an HF export records as `max_position_embeddings`, so that
    a checkpoint and its export are scored on the same windows by default."""
    return int(config.max_sequence_length)


def check_seq_length(seq_length: int, max_positions: int, learned_positions: bool) -> None:
    """A window the model has positions for. Megatron-LM refuses a --seq-length above
    --max-position-embeddings whatever the position embedding: rotary ones could be computed
    further, but the model never saw those positions and its scores there mean little."""
    if seq_length < 2:
        raise EvaluationError(f"--seq-length {seq_length} must be >= 2 (one token to read, one "
                              f"to score).")
    if seq_length > max_positions:
        kind = "learned positions" if learned_positions else "positions"
        raise EvaluationError(
            f"--seq-length {seq_length} is longer than the model's {max_positions} {kind} "
            f"(its max_position_embeddings; Megatron-LM refuses a --seq-length above it too): "
            f"pass at most {max_positions}, or leave --seq-length out to use {max_positions}.")
