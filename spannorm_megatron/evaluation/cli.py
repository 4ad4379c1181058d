"""`spannorm-evaluate` (tools/evaluate.py): loss, perplexity and bits per byte of a megatron
checkpoint or a Hugging Face folder on a text file.

Examples:
    spannorm-evaluate --load runs/quickstart/checkpoints \\
        --input ../shared/data/wikitext2-valid.txt --json wikitext2.json
    spannorm-evaluate --load runs/quickstart/hf --input ../shared/data/wikitext2-valid.txt
    torchrun --standalone --nproc_per_node 2 -m spannorm_megatron.evaluation.cli \\
        --load runs/x/checkpoints --input text.txt --tensor-model-parallel-size 2

The text is tokenized and cut into consecutive, non-overlapping windows of --seq-length tokens
(default: the model's maximum sequence length, i.e. the training --seq-length unless
--max-position-embeddings was set; an HF folder's max_position_embeddings, the same number); in
each window every token after the first is scored. loss is the mean negative log-likelihood per
scored token (nats), perplexity exp(loss),
bits_per_byte the summed loss in bits over the UTF-8 bytes of the scored tokens, which does not
depend on the tokenizer. The file is read in blocks, with a progress line on stderr after each
group of batches; --json OUT.json also writes the numbers (loss, perplexity, bits_per_byte,
tokens, bytes, ...).

--load is a megatron save / iteration / dist-checkpoint directory (run alone: read as a TP1/PP1
model whatever layout saved it; under torchrun: built and loaded under the --tensor- /
--pipeline-model-parallel-size layout, data-parallel over the remaining ranks) or a Hugging
Face folder (config.json; loaded with transformers, trust_remote_code=True). The tokenizer is
the one the tokenizer flags name (--tokenizer-type with --tokenizer-model, --vocab-file and
--merge-file, or --vocab-size, as in Megatron-LM), else the folder's own, else the one the run
recorded; it reads the text as spannorm-preprocess does (Llama2Tokenizer: one <s> before it).
Bad input (missing --load, an empty or non-UTF-8 --input, ...) exits with status 2 and a message.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

from spannorm_megatron.data.tokenizer_args import TokenizerOverrides, add_tokenizer_override_flags
from spannorm_megatron.hf.cli import DEVICES, DTYPE_NAMES, hide_gpu_for_cpu_runs, run_cli
from spannorm_megatron.config.options import add_arguments, option, parse_sections

TOKENIZER_FLAGS_TITLE = ("tokenizer (Megatron-LM's flags; default: the HF folder's own, else "
                         "the run's, completed from its record when only a file is given)")


@dataclass
class EvaluateOptions:
    """The command line of `spannorm-evaluate` (besides the tokenizer flags)."""

    load: str = option(doc="Megatron checkpoint or Hugging Face folder.", required=True,
                       metavar="CKPT_OR_HF_DIR", path="checkpoint_or_hf_folder")
    input: str = option(doc="UTF-8 text file.", required=True, metavar="TEXT_FILE",
                        path="input_file")
    seq_length: Optional[int] = option(
        None, "Window length in tokens (default: the model's maximum, max_position_embeddings;"
        " at least 2: a window scores each token from the ones before it).", at_least=2)
    micro_batch_size: Optional[int] = option(
        None, "Windows per forward pass (default: about 8192 tokens' worth).", at_least=1)
    max_bytes: int = option(0, "Evaluate only the first N bytes, cut at a line end (0: all).",
                            at_least=0)
    json: Optional[str] = option(None, "Write the numbers here.", metavar="OUT.json",
                                 path="output_file")
    model_config: Optional[str] = option(
        None, "A JSON file of ModelConfig fields, for a megatron checkpoint without a run "
        "record.", metavar="CONFIG.json",
        path="input_file")
    tensor_model_parallel_size: int = option(1, "Tensor-parallel ranks (under torchrun).")
    pipeline_model_parallel_size: int = option(1, "Pipeline stages (under torchrun).")
    device: str = option("auto", "Hugging Face folders (megatron checkpoints: the runtime's "
                         "device).", choices=DEVICES)
    dtype: Optional[str] = option(None, "Default: float32 on CPU, bfloat16 on GPU.",
                                  choices=DTYPE_NAMES)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, EvaluateOptions)
    add_tokenizer_override_flags(parser, TOKENIZER_FLAGS_TITLE)
    return parser


def evaluate(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` and evaluate; bad input raises a UserError."""
    options, tokenizer_flags = parse_sections(
        build_parser(), [EvaluateOptions, TokenizerOverrides], argv)
    import torch

    from spannorm_megatron.config.parallel import ParallelConfig
    from spannorm_megatron.evaluation import models
    from spannorm_megatron.evaluation.scoring import (
        HFScorer,
        MegatronScorer,
        score_text,
        stderr_progress,
    )
    from spannorm_megatron.evaluation.text import (
        EvaluationError,
        check_text_file,
        read_blocks,
        windows,
    )
    from spannorm_megatron.hf.export import parse_dtype
    from spannorm_megatron.hf.generation import is_hf_folder, load_hf_model

    # before any model is loaded
    total_bytes = check_text_file(options.input, options.max_bytes)
    if options.device == "cuda" and not torch.cuda.is_available():
        raise EvaluationError("--device cuda: no GPU is available here; use --device cpu.")
    device = "cuda" if options.device == "cuda" or (options.device == "auto"
                                                    and torch.cuda.is_available()) else "cpu"
    dtype = parse_dtype(options.dtype or ("bfloat16" if device == "cuda" else "float32"))

    hf = is_hf_folder(options.load)
    rank = int(os.environ.get("RANK", "0"))
    if hf:
        if models.world_size() > 1:
            raise EvaluationError("A Hugging Face folder is evaluated by one process: run "
                                  "tools/evaluate.py without torchrun.")
        model = load_hf_model(options.load, dtype, device)
        tokenizer = models.resolve_tokenizer(**tokenizer_flags.given(), hf_folder=options.load)
        vocab = model.config.vocab_size
        config_json = json.loads(Path(options.load, "config.json").read_text())
        seq_length = options.seq_length or int(
            config_json.get("max_position_embeddings") or 2048)
        learned = (config_json.get("megatron_model_config") or {}).get(
            "position_embedding_type") == "learned_absolute"
        max_positions = int(config_json.get("max_position_embeddings") or seq_length)
    else:
        parallel = ParallelConfig(
            tensor_model_parallel_size=options.tensor_model_parallel_size,
            pipeline_model_parallel_size=options.pipeline_model_parallel_size)
        config, chunks, record = models.load_megatron(options.load, parallel,
                                                      options.model_config, dtype)
        tokenizer = models.resolve_tokenizer(**tokenizer_flags.given(), run_record=record)
        vocab = config.vocab_size
        seq_length = options.seq_length or models.default_seq_length(config)
        learned = config.position_embedding_type == "learned_absolute"
        max_positions = config.max_sequence_length
    models.check_seq_length(seq_length, max_positions, learned)
    if tokenizer.vocab_size > vocab:
        raise EvaluationError(f"The tokenizer ({tokenizer.name}) has {tokenizer.vocab_size} ids "
                              f"but the model only {vocab}: they do not belong together.")
    micro_batch_size = options.micro_batch_size or max(1, 8192 // seq_length)
    scorer = (HFScorer(model, micro_batch_size, seq_length) if hf
              else MegatronScorer(chunks, micro_batch_size, seq_length))
    try:
        blocks = read_blocks(options.input, max_bytes=options.max_bytes)
        result = score_text(scorer, windows(blocks, tokenizer, seq_length),
                            total_bytes=total_bytes, micro_batch_size=micro_batch_size,
                            seq_length=seq_length,
                            progress=stderr_progress if rank == 0 else None)
    finally:
        if not hf:
            from spannorm_megatron.runtime import destroy

            destroy()
    record_out = {**result.to_dict(), "source": "huggingface" if hf else "megatron",
                  "load": os.path.abspath(options.load), "input": os.path.abspath(options.input),
                  "tokenizer": tokenizer.name}
    if rank == 0:
        print(f"loss {result.loss:.4f} | perplexity {result.perplexity:.2f} | bits/byte "
              f"{result.bits_per_byte:.4f} | {result.tokens:,} tokens, {result.bytes:,} bytes "
              f"scored in {result.windows:,} windows of {seq_length}", flush=True)
        if options.json:
            Path(options.json).write_text(json.dumps(record_out, indent=1) + "\n")
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    if argv is None:  # a command line, not a caller in this process: its GPUs are its own
        hide_gpu_for_cpu_runs(sys.argv[1:])
    return run_cli(evaluate, argv)


if __name__ == "__main__":
    sys.exit(main())
