"""The tokenizer files a flag names, checked by their kind before anything heavy loads: a
SentencePiece `.model` loads (`sentencepiece` alone, milliseconds), a Hugging Face tokenizer
folder is local and holds tokenizer files. Here, below the data layer, because a
`TokenizerConfig` checks the files it is given while the flags are parsed.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Union

from spannorm_megatron.errors import TokenizerError

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


HF_TOKENIZER_NAMES = frozenset({
    "special_tokens_map.json", "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt",
    "spiece.model", "sentencepiece.bpe.model", "chat_template.jinja", "chat_template.json"})
"""Files of a Hugging Face folder that define its tokenizer (besides `tokenizer*`)."""

HF_TOKENIZER_ENTRY_POINTS = ("tokenizer.json", "tokenizer_config.json")


def _is_tokenizer_file(name: str) -> bool:
    return (name.startswith("tokenizer") or name in HF_TOKENIZER_NAMES
            or name.endswith(".tiktoken"))


def hf_tokenizer_files(folder: str) -> List[str]:
    """The tokenizer files of a local Hugging Face folder (names, sorted); TokenizerError when
    `folder` is not a local folder holding a tokenizer. Nothing is ever fetched from the hub: a
    name such as `gpt2` or `meta-llama/Llama-2-7b-hf` that is not a folder here is refused."""
    if not os.path.exists(folder):
        raise TokenizerError(
            f"--tokenizer-model {folder}: no such folder. HuggingFaceTokenizer loads a local "
            f"tokenizer folder only (local files only: nothing is downloaded from the Hugging "
            f"Face hub). Fetch it yourself where there is network, e.g. `hf "
            f"download {folder} --local-dir tokenizers/NAME` (huggingface_hub's CLI), and pass "
            f"--tokenizer-model tokenizers/NAME.")
    if not os.path.isdir(folder):
        raise TokenizerError(
            f"--tokenizer-model {folder} is a file; HuggingFaceTokenizer takes the folder that "
            f"holds tokenizer.json / tokenizer_config.json"
            + (" (pass its directory)." if os.path.basename(folder).startswith("tokenizer")
               else ". For a SentencePiece .model pass --tokenizer-type SentencePieceTokenizer."))
    names = sorted(n for n in os.listdir(folder)
                   if _is_tokenizer_file(n) and os.path.isfile(os.path.join(folder, n)))
    if not any(n in names for n in HF_TOKENIZER_ENTRY_POINTS):
        raise TokenizerError(
            f"--tokenizer-model {folder} is not a Hugging Face tokenizer folder: it holds neither "
            f"tokenizer.json nor tokenizer_config.json (what transformers' AutoTokenizer reads). "
            f"Pass the folder a tokenizer was saved to (tokenizer.save_pretrained(DIR)).")
    return names
