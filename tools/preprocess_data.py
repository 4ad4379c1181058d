#!/usr/bin/env python
"""Tokenize text into Megatron's indexed dataset (.bin/.idx), as Megatron-LM's tool does.

Example:
    python tools/preprocess_data.py --input corpus.jsonl --output-prefix data/corpus \\
        --json-keys text --tokenizer-type SentencePieceTokenizer \\
        --tokenizer-model tokenizers/stdlib.model --append-eod --workers 8
    # writes data/corpus_text_document.bin and .idx; train with
    #   --data-path data/corpus_text_document

Input: JSON Lines (one JSON object per line, the document under each --json-keys key, as in
Megatron-LM) or plain text (.txt/.text suffix or --input-format text), where documents are
separated by blank lines. Flags, output names ({output_prefix}_{key}_document) and file format
are Megatron-LM's; files written here train in Megatron-LM and vice versa. Outputs are written
under temporary names and renamed at the end, so a failed run changes no existing file. Bad
input (missing file, bad JSON line, missing key, bad tokenizer file) stops the run with a
message naming the file and line, and exit status 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout too

from spannorm_megatron.data.cli import quiet_optional_kernel_warnings, run_cli  # noqa: E402
from spannorm_megatron.data.errors import DataError  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("input data")
    group.add_argument("--input", required=True, help="input file: JSON Lines or plain .txt")
    group.add_argument(
        "--json-keys", nargs="+", default=["text"],
        help="space separated keys to extract from the JSON objects, one output each "
        "(default: text); for plain text, the one name its output is filed under",
    )
    group.add_argument(
        "--input-format", choices=["auto", "jsonl", "text"], default="auto",
        help="auto (default): .txt/.text are plain text, everything else JSON Lines",
    )
    group.add_argument(
        "--split-sentences", action="store_true",
        help="not supported (Megatron-LM needs NLTK for it); give pre-split documents as a "
        "JSON list of strings instead, each string becomes one sequence",
    )
    group = parser.add_argument_group("tokenizer (Megatron-LM's flags)")
    group.add_argument(
        "--tokenizer-type", default="SentencePieceTokenizer",
        help="SentencePieceTokenizer (default) or Llama2Tokenizer: --tokenizer-model X.model; "
        "GPT2BPETokenizer: --vocab-file and --merge-file; HuggingFaceTokenizer: "
        "--tokenizer-model DIR (a local folder, never downloaded); NullTokenizer: --vocab-size "
        "(the text is integer ids); ByteLevelTokenizer: UTF-8 bytes, no file",
    )
    group.add_argument(
        "--tokenizer-model", default=None,
        help="SentencePiece .model file (tools/train_tokenizer.py writes one), or the "
        "HuggingFaceTokenizer folder",
    )
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")
    group.add_argument(
        "--vocab-size", type=int, default=None,
        help="NullTokenizer: ids 0..N-1 are data, N is the end of document",
    )
    group.add_argument(
        "--append-eod", action="store_true",
        help="append the tokenizer's end-of-document id (eod: </s> for SentencePiece models, "
        "<|endoftext|> for GPT-2, the eos_token of a Hugging Face tokenizer) to every document",
    )
    group = parser.add_argument_group("output data")
    group.add_argument(
        "--output-prefix", required=True,
        help="path prefix of the outputs, written as {prefix}_{key}_document.bin/.idx",
    )
    group = parser.add_argument_group("runtime")
    group.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1,
        help="tokenizer processes (default: all cores; 1 tokenizes in this process)",
    )
    group.add_argument(
        "--chunk-size", type=int, default=32,
        help="documents per task sent to a worker (default 32, as Megatron-LM)",
    )
    group.add_argument(
        "--partitions", type=int, default=1,
        help="only 1 is supported: preprocess split inputs separately and list their "
        "prefixes in --data-path instead",
    )
    group.add_argument(
        "--log-interval", type=int, default=1000,
        help="print a progress line every this many documents (default 1000)",
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.split_sentences:
        raise DataError(
            "--split-sentences is not supported here (Megatron-LM uses NLTK for it). Split the "
            "documents beforehand and store each one as a JSON list of strings: every string "
            "becomes one sequence of its document, as with --split-sentences."
        )
    if args.partitions != 1:
        raise DataError(
            f"--partitions {args.partitions} is not supported here. Split the input into files "
            "yourself, preprocess each with its own --output-prefix, and list the prefixes in "
            "--data-path (a blend needs no merge step)."
        )
    from spannorm_megatron.data.preprocess import PreprocessConfig, preprocess

    config = PreprocessConfig(
        input=args.input,
        output_prefix=args.output_prefix,
        tokenizer_model=args.tokenizer_model,
        tokenizer_type=args.tokenizer_type,
        vocab_file=args.vocab_file,
        merge_file=args.merge_file,
        vocab_size=args.vocab_size,
        json_keys=args.json_keys,
        input_format=args.input_format,
        append_eod=args.append_eod,
        workers=args.workers,
        chunk_size=args.chunk_size,
        log_interval=args.log_interval,
    )
    preprocess(config)
    return 0


if __name__ == "__main__":
    quiet_optional_kernel_warnings()
    sys.exit(run_cli(main))
