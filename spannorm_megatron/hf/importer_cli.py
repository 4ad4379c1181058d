"""`spannorm-convert-from-hf` (tools/convert_from_hf.py): convert a Hugging Face model folder
into a megatron checkpoint that training loads.

Examples:
    spannorm-convert-from-hf --load hf/exp --save runs/ft/checkpoints     # TP1/PP1
    torchrun --standalone --nproc_per_node 4 -m spannorm_megatron.hf.importer_cli --load hf/exp \\
        --save runs/ft/checkpoints --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2

Reads LlamaForCausalLM, MixtralForCausalLM, Qwen2MoeForCausalLM (as far as megatron can express
them: no RoPE scaling, no sliding window, ...) and SpanNormForCausalLM folders (model.safetensors
or a sharded index). Every rank describes its shard of the model on the meta device and writes
each tensor as it converts it from the HF weights, one layer at a time (memory tracks the
largest layer, not the model); the checkpoint is saved in the checkpoint package's layout
(SAVE/iter_0000000 + latest_checkpointed_iteration.txt, run.json, manifest.json) with no
optimizer or RNG state, so training starts from it with --load CKPT_DIR --no-load-optim. Dist
checkpoints reshard, so a checkpoint written under one layout trains under any other; the layout
flags only choose how the files are split between ranks. Bad input exits with status 2 and a message.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from typing import List, Optional

from spannorm_megatron.hf.cli import DTYPE_NAMES, run_cli
from spannorm_megatron.config.options import add_arguments, option, parse_sections


@dataclass
class ImportOptions:
    """The command line of `spannorm-convert-from-hf`."""

    load: str = option(doc="Hugging Face folder.", required=True, metavar="HF_DIR",
                       path="hf_folder")
    save: str = option(doc="Megatron save directory.", required=True, metavar="CKPT_DIR",
                       path="output_folder")
    tensor_model_parallel_size: int = option(1, "Tensor-parallel ranks the files are split for.",
                                             at_least=1)
    pipeline_model_parallel_size: int = option(1, "Pipeline stages the files are split for.",
                                               at_least=1)
    expert_model_parallel_size: int = option(
        1, "Expert-parallel ranks the files are split for.", at_least=1)
    dtype: str = option("float32", "Dtype of the saved weights (default float32).",
                        choices=DTYPE_NAMES)
    iteration: int = option(0, "Iteration to save as (default 0).", at_least=0)
    overwrite: bool = option(False, "Replace an earlier conversion in --save (recognised by "
                             "its spannorm_import.json; nothing else is ever replaced).")
    allow_non_finite: bool = option(False, "Convert weights holding NaN/Inf as they are (refused "
                                    "by default).")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, ImportOptions)
    return parser


def convert(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` and import; bad input raises a UserError."""
    (options,) = parse_sections(build_parser(), [ImportOptions], argv)
    import torch

    from spannorm_megatron.hf.importer import convert_hf_to_megatron
    from spannorm_megatron.runtime import destroy

    ours = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        convert_hf_to_megatron(
            options.load, options.save,
            tensor_model_parallel_size=options.tensor_model_parallel_size,
            pipeline_model_parallel_size=options.pipeline_model_parallel_size,
            expert_model_parallel_size=options.expert_model_parallel_size,
            dtype=options.dtype, iteration=options.iteration, overwrite=options.overwrite,
            allow_non_finite=options.allow_non_finite, log=lambda line: print(line, flush=True))
    finally:
        if ours and torch.distributed.is_available() and torch.distributed.is_initialized():
            destroy()  # only the process group this run created
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    return run_cli(convert, argv)


if __name__ == "__main__":
    sys.exit(main())
