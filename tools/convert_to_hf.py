#!/usr/bin/env python
"""Convert a megatron checkpoint (any TP/PP/EP layout) into a Hugging Face model folder.

Example:
    python tools/convert_to_hf.py --load runs/exp/checkpoints --save hf/exp \\
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
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout too

from spannorm_megatron.hf.cli import quiet, run_cli  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--load", required=True, metavar="CKPT_DIR",
                        help="megatron save directory, iter_NNNNNNN directory or dist checkpoint")
    parser.add_argument("--save", required=True, metavar="HF_DIR", help="output folder")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                        help="weight dtype in the folder (default float32)")
    from spannorm_megatron.data.tokenizer_args import add_tokenizer_override_flags

    add_tokenizer_override_flags(
        parser, "tokenizer to ship (Megatron-LM's flags; default: the run's recorded one, "
        "completed from the record when only a file is given)")
    parser.add_argument("--max-shard-size", default="2GB",
                        help="largest weight file, e.g. 2GB, 500MB (default 2GB)")
    parser.add_argument("--model-config", default=None, metavar="JSON",
                        help="ModelConfig as JSON (a dict, or a run record holding one); needed "
                             "for checkpoints without a run record")
    parser.add_argument("--format", default="auto", choices=["auto", "native", "spannorm"],
                        help="auto: a native class when it can hold the model, else ours; "
                             "native: refuse otherwise; spannorm: always ours")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing, non-empty --save folder")
    parser.add_argument("--allow-non-finite", action="store_true",
                        help="export NaN/Inf weights instead of refusing them (to inspect a "
                        "diverged run)")
    parser.add_argument("--no-verify-checksums", action="store_true",
                        help="check file sizes only, skip the checksum pass over the checkpoint")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    quiet()
    from spannorm_megatron.hf.export import export_checkpoint

    export_checkpoint(args.load, args.save, dtype=args.dtype,
                      tokenizer_model=args.tokenizer_model, tokenizer_type=args.tokenizer_type,
                      vocab_file=args.vocab_file, merge_file=args.merge_file,
                      vocab_size=args.vocab_size, max_shard_size=args.max_shard_size,
                      model_config=args.model_config, fmt=args.format,
                      verify_checksums=not args.no_verify_checksums, overwrite=args.overwrite,
                      allow_non_finite=args.allow_non_finite,
                      log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
