"""`spannorm-train-tokenizer` (tools/train_tokenizer.py): train a SentencePiece tokenizer for
preprocessing and training.

Examples:
    # on the embedded default corpus (the Python standard library's sources; no download)
    spannorm-train-tokenizer --embedded-corpus --model-prefix tokenizers/stdlib \\
        --vocab-size 32000

    # on your own text: JSON Lines (Megatron-LM's input format) and/or .txt files
    spannorm-train-tokenizer --input corpus.jsonl more.txt --json-keys text \\
        --model-prefix tokenizers/mine --vocab-size 32000 --model-type bpe

Writes <model-prefix>.model (pass it to --tokenizer-model) and <model-prefix>.vocab (a text
listing), only after training succeeded. The model has <unk> <s> </s> <pad> at ids 0-3 and the
control symbols <CLS> <SEP> <EOD> <MASK> at 4-7, as Megatron-LM's SentencePieceTokenizer expects;
the end-of-document id that spannorm-preprocess --append-eod appends is </s> (2), as
megatron-core's tokenizer library and Megatron-LM's preprocess_data.py have it. Text is kept
byte-exact (identity normalization, byte fallback), so decode(encode(text)) == text.
"""

from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from spannorm_megatron.data.cli import run_cli
from spannorm_megatron.data.tokenizer_training import TokenizerTrainingConfig
from spannorm_megatron.config.options import add_arguments, parse_sections


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, TokenizerTrainingConfig)
    return parser


def train(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` and train; a bad input raises DataError."""
    from spannorm_megatron.data.tokenizer_training import train_sentencepiece

    (config,) = parse_sections(build_parser(), [TokenizerTrainingConfig], argv)
    if "<EOD>" not in config.control_symbols and "<EOD>" not in config.user_defined_symbols:
        print(
            "warning: --control-symbols has no <EOD>; Megatron-style tokenizers will append "
            "Megatron-LM's special pieces past the vocabulary",
            file=sys.stderr,
        )
    train_sentencepiece(config)
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    return run_cli(train, argv)


if __name__ == "__main__":
    sys.exit(main())
