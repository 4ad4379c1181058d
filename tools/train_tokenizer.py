#!/usr/bin/env python
"""Train a SentencePiece tokenizer for tools/preprocess_data.py and training.

Examples:
    # on the embedded default corpus (the Python standard library's sources; no download)
    python tools/train_tokenizer.py --embedded-corpus --model-prefix tokenizers/stdlib \\
        --vocab-size 32000

    # on your own text: JSON Lines (Megatron-LM's input format) and/or .txt files
    python tools/train_tokenizer.py --input corpus.jsonl more.txt --json-keys text \\
        --model-prefix tokenizers/mine --vocab-size 32000 --model-type bpe

Writes <model-prefix>.model (pass it to --tokenizer-model) and <model-prefix>.vocab (a text
listing), only after training succeeded. The model has <unk> <s> </s> <pad> at ids 0-3 and the
control symbols <CLS> <SEP> <EOD> <MASK> at 4-7, as Megatron-LM's SentencePieceTokenizer expects;
the end-of-document id that preprocess_data.py --append-eod appends is </s> (2), as megatron-core's
tokenizer library and Megatron-LM's preprocess_data.py have it. Text is kept
byte-exact (identity normalization, byte fallback), so decode(encode(text)) == text.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from a plain checkout too

from spannorm_megatron.data.cli import quiet_optional_kernel_warnings, run_cli  # noqa: E402
from spannorm_megatron.data.sp_model import MEGATRON_SPECIAL_PIECES  # noqa: E402


def _comma_list(value: str):
    return [item for item in value.split(",") if item]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("input")
    group.add_argument(
        "--input", nargs="+", default=[], metavar="FILE",
        help="training text: JSON Lines files (text under --json-keys) and/or plain .txt files",
    )
    group.add_argument(
        "--embedded-corpus", action="store_true",
        help="train on the embedded corpus (Python stdlib sources, see "
        "spannorm_megatron/data/corpus.py) instead of --input",
    )
    group.add_argument(
        "--embedded-corpus-max-bytes", type=int, default=None, metavar="N",
        help="use only the first N bytes' worth of embedded-corpus files (a stable prefix)",
    )
    group.add_argument(
        "--json-keys", nargs="+", default=["text"],
        help="JSONL keys holding the text (default: text)",
    )
    group.add_argument(
        "--input-format", choices=["auto", "jsonl", "text"], default="auto",
        help="auto (default): .txt/.text files are plain text, everything else JSON Lines",
    )
    group.add_argument(
        "--input-sentence-size", type=int, default=0, metavar="N",
        help="train on a seeded random sample of N lines (default 0: all lines)",
    )
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model-prefix", required=True,
        help="output prefix: writes PREFIX.model and PREFIX.vocab (parent dirs are created)",
    )
    group.add_argument(
        "--vocab-size", type=int, default=32000, help="vocabulary size (default 32000)"
    )
    group.add_argument(
        "--model-type", choices=["bpe", "unigram"], default="bpe", help="default: bpe"
    )
    group.add_argument(
        "--character-coverage", type=float, default=1.0,
        help="fraction of characters kept as pieces (default 1.0; rarer ones use byte fallback)",
    )
    group.add_argument(
        "--byte-fallback", action=argparse.BooleanOptionalAction, default=True,
        help="encode unknown characters as UTF-8 byte pieces instead of <unk> (default: on)",
    )
    group.add_argument(
        "--control-symbols", type=_comma_list, default=list(MEGATRON_SPECIAL_PIECES),
        metavar="A,B,...",
        help="reserved pieces never produced from text (default: "
        + ",".join(MEGATRON_SPECIAL_PIECES) + "; Megatron-LM's special pieces)",
    )
    group.add_argument(
        "--user-defined-symbols", type=_comma_list, default=[], metavar="A,B,...",
        help="pieces always kept whole when they occur in the text",
    )
    group.add_argument(
        "--normalization", default="identity",
        choices=["identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf"],
        help="SentencePiece normalization rule (default identity: text kept byte-exact)",
    )
    group.add_argument(
        "--split-digits", action=argparse.BooleanOptionalAction, default=True,
        help="split numbers into single digits (default: on)",
    )
    group.add_argument(
        "--max-sentence-length", type=int, default=16384,
        help="longest training line in bytes; longer lines are skipped (default 16384)",
    )
    group = parser.add_argument_group("run")
    group.add_argument(
        "--num-threads", type=int, default=os.cpu_count() or 1,
        help="trainer threads (default: all cores; pin it for bit-identical unigram models)",
    )
    group.add_argument(
        "--seed", type=int, default=1234, help="seed for line sampling (default 1234)"
    )
    group.add_argument(
        "--verbose", action="store_true", help="show SentencePiece's own training log"
    )
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from spannorm_megatron.data.tokenizer_training import (
        TokenizerTrainingConfig,
        train_sentencepiece,
    )

    if "<EOD>" not in args.control_symbols and "<EOD>" not in args.user_defined_symbols:
        print(
            "warning: --control-symbols has no <EOD>; Megatron-style tokenizers will append "
            "Megatron-LM's special pieces past the vocabulary",
            file=sys.stderr,
        )
    config = TokenizerTrainingConfig(
        model_prefix=args.model_prefix,
        inputs=args.input,
        embedded_corpus=args.embedded_corpus,
        embedded_corpus_max_bytes=args.embedded_corpus_max_bytes,
        json_keys=args.json_keys,
        input_format=args.input_format,
        vocab_size=args.vocab_size,
        model_type=args.model_type,
        character_coverage=args.character_coverage,
        input_sentence_size=args.input_sentence_size,
        byte_fallback=args.byte_fallback,
        control_symbols=args.control_symbols,
        user_defined_symbols=args.user_defined_symbols,
        normalization=args.normalization,
        split_digits=args.split_digits,
        max_sentence_length=args.max_sentence_length,
        num_threads=args.num_threads,
        seed=args.seed,
        verbose=args.verbose,
    )
    train_sentencepiece(config)
    return 0


if __name__ == "__main__":
    quiet_optional_kernel_warnings()
    sys.exit(run_cli(main))
