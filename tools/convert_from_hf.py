#!/usr/bin/env python
"""Convert a Hugging Face model folder into a megatron checkpoint that training loads.

Examples:
    python tools/convert_from_hf.py --load hf/exp --save runs/ft/checkpoints     # TP1/PP1
    torchrun --standalone --nproc_per_node 4 tools/convert_from_hf.py --load hf/exp \\
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout too

from spannorm_megatron.hf.cli import quiet, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, metavar="HF_DIR", help="Hugging Face folder")
    parser.add_argument("--save", required=True, metavar="CKPT_DIR", help="megatron save directory")
    parser.add_argument("--tensor-model-parallel-size", type=int, default=1)
    parser.add_argument("--pipeline-model-parallel-size", type=int, default=1)
    parser.add_argument("--expert-model-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="dtype of the saved weights (default float32)")
    parser.add_argument("--iteration", type=int, default=0, help="iteration to save as (default 0)")
    parser.add_argument("--overwrite", action="store_true",
                        help="save into an existing, non-empty --save directory")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet()
    import torch

    from spannorm_megatron.hf.importer import convert_hf_to_megatron
    from spannorm_megatron.runtime import destroy

    ours = not (torch.distributed.is_available() and torch.distributed.is_initialized())
    try:
        convert_hf_to_megatron(
            args.load, args.save,
            tensor_model_parallel_size=args.tensor_model_parallel_size,
            pipeline_model_parallel_size=args.pipeline_model_parallel_size,
            expert_model_parallel_size=args.expert_model_parallel_size,
            dtype=args.dtype, iteration=args.iteration, overwrite=args.overwrite,
            log=lambda line: print(line, flush=True))
    finally:
        if ours and torch.distributed.is_available() and torch.distributed.is_initialized():
            destroy()  # only the process group this run created
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
