"""SentencePiece model files: validation with clear errors, and Megatron-LM's special pieces.

Kept apart from `tokenizer.py` because it needs only `sentencepiece`, not megatron-core (whose
import takes seconds): `tokenizer_args.check_tokenizer_args` checks a `--tokenizer-model` with it
before anything heavy is loaded, so a wrong path fails at once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Union

from spannorm_megatron.data.errors import TokenizerError

MEGATRON_SPECIAL_PIECES = ("<CLS>", "<SEP>", "<EOD>", "<MASK>")
"""The pieces Megatron-LM's `SentencePieceTokenizer` looks up by name, in the order it resolves
them. `tools/train_tokenizer.py` puts them into every model as control symbols, so a model
trained here has the same ids (and `<EOD>` is the end-of-document id) in Megatron-LM and here,
and Megatron-LM does not need to grow the vocabulary past the model."""

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
