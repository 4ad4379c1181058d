"""`spannorm-convert-to-hf` (tools/convert_to_hf.py): convert a megatron checkpoint (any
TP/PP/EP layout) into a Hugging Face model folder.

Example:
    spannorm-convert-to-hf --load runs/exp/checkpoints --save hf/exp \\
        --dtype bfloat16 --tokenizer-model tokenizers/stdlib.model
    # then: AutoModelForCausalLM.from_pretrained("hf/exp")      (prenorm: Llama/Mixtral/Qwen2-MoE)
    #       AutoModelForCausalLM.from_pretrained("hf/exp", trust_remote_code=True)   (the others)

--load is a save directory (the iteration in latest_checkpointed_iteration.txt is converted),
one iter_NNNNNNN directory, or a bare dist-checkpoint directory (then pass --model-config).
Writes config.json, model.safetensors (sharded above --max-shard-size, with
model.safetensors.index.json), generation_config.json, the tokenizer (tokenizer.json and
tokenizer_config.json for every --tokenizer-type, plus tokenizer.model for SentencePiece models,
vocab.json and merges.txt for GPT-2 BPE, a HuggingFaceTokenizer folder's own files) and, for our
own class, configuration_spannorm.py and
modeling_spannorm.py. Prenorm models with RMSNorm, SwiGLU and RoPE become native
LlamaForCausalLM (dense), MixtralForCausalLM (MoE) or Qwen2MoeForCausalLM (MoE with a shared
expert); everything else becomes SpanNormForCausalLM (see --format). The folder is written under
a temporary name and renamed at the end: a failed run leaves nothing behind. Bad input exits
with status 2 and a message.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import List, Optional

from spannorm_megatron.data.tokenizer_args import TokenizerOverrides, add_tokenizer_override_flags
from spannorm_megatron.hf.cli import DTYPE_NAMES, EXPORT_FORMATS, run_cli
from spannorm_megatron.config.options import add_arguments, option, parse_sections


@dataclass
class ExportOptions:
    """The command line of `spannorm-convert-to-hf` (besides the tokenizer flags)."""

    load: str = option(doc="Megatron save directory, iter_NNNNNNN directory or dist checkpoint.",
                       required=True, metavar="CKPT_DIR", path="checkpoint")
    save: str = option(doc="Output folder.", required=True, metavar="HF_DIR",
                       path="output_folder")
    dtype: str = option("float32", "Weight dtype in the folder (default float32).",
                        choices=DTYPE_NAMES)
    max_shard_size: str = option("2GB", "Largest weight file, e.g. 2GB, 500MB (default 2GB).")
    model_config: Optional[str] = option(
        None, "A JSON file of ModelConfig fields (or a run record holding them); needed for "
        "checkpoints without a run record.", metavar="CONFIG.json", path="input_file")
    format: str = option(
        "auto", "auto: a native class when it can hold the model, else ours; native: refuse "
        "otherwise; spannorm: always ours.", choices=EXPORT_FORMATS)
    overwrite: bool = option(False, "Replace an earlier export in --save (recognised by its "
                             "spannorm_export.json; nothing else is ever replaced).")
    allow_non_finite: bool = option(
        False, "Export NaN/Inf weights instead of refusing them (to inspect a diverged run).")
    no_verify_checksums: bool = option(
        False, "Check file sizes only, skip the checksum pass over the checkpoint.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, ExportOptions)
    add_tokenizer_override_flags(
        parser, "tokenizer to ship (Megatron-LM's flags; default: the run's recorded one, "
        "completed from the record when only a file is given)")
    return parser


def convert(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` and export; bad input raises a UserError."""
    options, tokenizer = parse_sections(build_parser(), [ExportOptions, TokenizerOverrides], argv)
    from spannorm_megatron.hf.export import export_checkpoint

    export_checkpoint(options.load, options.save, dtype=options.dtype, **tokenizer.given(),
                      max_shard_size=options.max_shard_size, model_config=options.model_config,
                      fmt=options.format, verify_checksums=not options.no_verify_checksums,
                      overwrite=options.overwrite, allow_non_finite=options.allow_non_finite,
                      log=lambda line: print(line, flush=True))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    return run_cli(convert, argv)


if __name__ == "__main__":
    sys.exit(main())
