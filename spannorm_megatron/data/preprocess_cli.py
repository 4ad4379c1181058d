"""`spannorm-preprocess` (tools/preprocess_data.py): tokenize text into Megatron's indexed
dataset (.bin/.idx), as Megatron-LM's tools/preprocess_data.py does.

Example:
    spannorm-preprocess --input corpus.jsonl --output-prefix data/corpus \\
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
from typing import List, Optional

from spannorm_megatron.data.cli import run_cli
from spannorm_megatron.data.preprocess import PreprocessConfig
from spannorm_megatron.config.options import add_arguments, from_namespace, parse_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, PreprocessConfig)
    # A person at a terminal wants every core; a Python caller gets one process by default.
    parser.set_defaults(workers=os.cpu_count() or 1)
    return parser


def preprocess(argv: Optional[List[str]] = None) -> int:
    """Parse `argv` and preprocess; a bad input raises DataError."""
    from spannorm_megatron.data.preprocess import preprocess as run

    args = parse_options(build_parser(), [PreprocessConfig], argv)
    run(from_namespace(PreprocessConfig, args))
    return 0


def main(argv: Optional[List[str]] = None) -> int:
    """The console script: exit status 0, or 2 with one `error:` line for bad input."""
    return run_cli(preprocess, argv)


if __name__ == "__main__":
    sys.exit(main())
