"""SentencePiece model files: validation with clear errors, and Megatron-LM's special pieces.

Kept apart from `tokenizer.py` because it needs only `sentencepiece`, not megatron-core (whose
import takes seconds): the command-line tools check their tokenizer argument with it before
loading anything heavy, so a wrong path fails at once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from spannorm_megatron.data.errors import TokenizerError
from spannorm_megatron.options import check, option

MEGATRON_SPECIAL_PIECES = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")
"""The pieces Megatron-LM's `SentencePieceTokenizer` looks up by name, in the order it resolves
them. `tools/train_tokenizer.py` puts them into every model as control symbols, so a model
trained here has the same ids (and `<EOD>` is the end-of-document id) in Megatron-LM and here,
and Megatron-LM does not need to grow the vocabulary past the model."""

SUPPORTED_TOKENIZER_TYPES = ("SentencePieceTokenizer", "ByteLevelTokenizer")
"""Values of Megatron-LM's `--tokenizer-type` this project implements. `ByteLevelTokenizer`
(megatron-core's byte-level library: UTF-8 bytes are the ids 0-255, `<EOD>` is 256) needs no
model file; `SentencePieceTokenizer` needs `--tokenizer-model`."""

TOKENIZER_TYPES_WITHOUT_MODEL = ("ByteLevelTokenizer",)
"""Tokenizer types that take no `--tokenizer-model`."""



@dataclass
class TokenizerConfig:
    """Megatron-LM's tokenizer flags."""

    tokenizer_type: str = option(
        "SentencePieceTokenizer", "SentencePieceTokenizer (needs --tokenizer-model) or "
        "ByteLevelTokenizer (UTF-8 bytes, no model file).", choices=SUPPORTED_TOKENIZER_TYPES,
        required=True)
    tokenizer_model: Optional[str] = option(None, "The SentencePiece .model file.",
                                            path="input")

    def __post_init__(self) -> None:
        check(self)


EOD_PIECE = "<EOD>"
"""The end-of-document piece (`tokenizer.eod`), appended to each document by `--append-eod`."""

TRAIN_HINT = (
    "To make one: python tools/train_tokenizer.py --embedded-corpus --model-prefix "
    "tokenizers/stdlib --vocab-size 32000 (writes tokenizers/stdlib.model)."
)


def check_sentencepiece_model(path: Union[str, os.PathLike]) -> Path:
    """Return `path` if it is a readable, parseable SentencePiece model, else raise TokenizerError.

    Loads the model once with `sentencepiece` (milliseconds) so that a text file, a `.vocab`
    listing or a Hugging Face `tokenizer.json` passed by mistake is reported by name.
    """
    path = Path(path)
    if not path.exists():
        vocab_twin = path.with_suffix(".model") if path.suffix != ".model" else None
        hint = (
            f" A '{vocab_twin.name}' exists next to it: pass that file."
            if vocab_twin is not None and vocab_twin.exists()
            else ""
        )
        raise TokenizerError(
            f"Tokenizer model '{path}' does not exist.{hint} Pass --tokenizer-model the binary "
            f"SentencePiece `.model` file (what --model-prefix named plus `.model`). {TRAIN_HINT}"
        )
    if path.is_dir():
        raise TokenizerError(
            f"Tokenizer model '{path}' is a directory; pass the SentencePiece `.model` file "
            f"itself (e.g. '{path / 'tokenizer.model'}'). {TRAIN_HINT}"
        )
    if not os.access(path, os.R_OK):
        raise TokenizerError(
            f"Tokenizer model '{path}' is not readable by this user; fix its permissions "
            "(chmod a+r) or copy it somewhere readable."
        )
    import sentencepiece

    try:
        processor = sentencepiece.SentencePieceProcessor()
        processor.Load(str(path))
    except (RuntimeError, OSError) as err:
        raise TokenizerError(
            f"Tokenizer model '{path}' is not a SentencePiece model: sentencepiece could not load "
            f"it ({str(err).strip()}). --tokenizer-model takes the binary `.model` file "
            "SentencePiece writes, not the `.vocab` text listing next to it nor a Hugging Face "
            f"`tokenizer.json`. {TRAIN_HINT}"
        ) from None
    return path


def check_tokenizer_type(tokenizer_type: str) -> None:
    """Raise TokenizerError for a `--tokenizer-type` this project does not implement."""
    if tokenizer_type not in SUPPORTED_TOKENIZER_TYPES:
        raise TokenizerError(
            f"--tokenizer-type {tokenizer_type} is not supported here; the tokenizer types are "
            "SentencePieceTokenizer (Megatron-LM's name for a SentencePiece `.model` with <EOD> "
            "as end of document: train one on your text with tools/train_tokenizer.py and pass "
            "--tokenizer-model <prefix>.model) and ByteLevelTokenizer (UTF-8 bytes, vocabulary "
            "257, no model file)."
        )


def check_tokenizer_args(tokenizer_type: str, tokenizer_model) -> None:
    """Check a `--tokenizer-type` / `--tokenizer-model` pair before anything heavy is loaded:
    the type is known, a SentencePiece model is given and loads, a byte-level type gets none."""
    check_tokenizer_type(tokenizer_type)
    if tokenizer_type in TOKENIZER_TYPES_WITHOUT_MODEL:
        if tokenizer_model:
            raise TokenizerError(
                f"--tokenizer-type {tokenizer_type} takes no --tokenizer-model (its vocabulary is "
                f"the 256 byte values plus <EOD>), but '{tokenizer_model}' was given. Drop "
                "--tokenizer-model, or pass --tokenizer-type SentencePieceTokenizer to use that "
                "model."
            )
        return
    if not tokenizer_model:
        raise TokenizerError(
            f"--tokenizer-model is required with --tokenizer-type {tokenizer_type}: the "
            f"SentencePiece .model file. {TRAIN_HINT} Or pass --tokenizer-type "
            "ByteLevelTokenizer, which needs no model."
        )
    check_sentencepiece_model(tokenizer_model)
