"""Megatron-LM's tokenizer flags: which `--tokenizer-type` takes which file flags, and the checks
that run before anything heavy is loaded (no megatron-core or transformers import here).

* SentencePieceTokenizer, Llama2Tokenizer: `--tokenizer-model X.model`;
* GPT2BPETokenizer: `--vocab-file vocab.json --merge-file merges.txt`;
* HuggingFaceTokenizer: `--tokenizer-model DIR`, a local folder;
* NullTokenizer: `--vocab-size N`;
* ByteLevelTokenizer: nothing.

A flag of another type is refused, where Megatron-LM ignores it: `--vocab-size 32000` next to a
SentencePiece model looks as if it set the vocabulary, and would not.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

from spannorm_megatron.config.options import check, option
from spannorm_megatron.config.paths import check_path
from spannorm_megatron.config.tokenizer_files import check_sentencepiece_model, hf_tokenizer_files
from spannorm_megatron.errors import TokenizerError, UserError


@dataclass(frozen=True)
class TokenizerType:
    name: str
    flags: Tuple[str, ...]
    """The file/size flags this type needs (field names of `TokenizerConfig`)."""
    summary: str


TOKENIZER_TYPES: Dict[str, TokenizerType] = {t.name: t for t in (
    TokenizerType("SentencePieceTokenizer", ("tokenizer_model",),
                  "a SentencePiece .model (tools/train_tokenizer.py makes one)"),
    TokenizerType("Llama2Tokenizer", ("tokenizer_model",),
                  "a SentencePiece .model with Llama-2's conventions: <s> starts every text, "
                  "</s> ends documents"),
    TokenizerType("GPT2BPETokenizer", ("vocab_file", "merge_file"),
                  "GPT-2's byte-level BPE from its vocab.json and merges.txt"),
    TokenizerType("HuggingFaceTokenizer", ("tokenizer_model",),
                  "a local Hugging Face tokenizer folder, loaded with transformers' "
                  "AutoTokenizer"),
    TokenizerType("NullTokenizer", ("vocab_size",),
                  "no text: documents are whitespace-separated integer ids 0..N-1 and N is "
                  "the end of document"),
    TokenizerType("ByteLevelTokenizer", (),
                  "UTF-8 bytes as ids 0-255, <EOD> 256; no file"),
)}

SUPPORTED_TOKENIZER_TYPES = tuple(TOKENIZER_TYPES)
"""Values of Megatron-LM's `--tokenizer-type` this project implements."""

MEGATRON_LM_TOKENIZER_TYPES = (
    "BertWordPieceLowerCase", "BertWordPieceCase", "GPT2BPETokenizer", "SentencePieceTokenizer",
    "GPTSentencePieceTokenizer", "HuggingFaceTokenizer", "Llama2Tokenizer", "TikTokenizer",
    "MultimodalTokenizer", "NullTokenizer", "NullMultimodalTokenizer", "SFTTokenizer")
"""Megatron-LM core_v0.16.1's choices: the flag takes them all, so that one it has and we do not
build is refused with the reason (`check_tokenizer_type`), not as an unknown word."""

FLAG_NAMES = {"tokenizer_model": "--tokenizer-model", "vocab_file": "--vocab-file",
              "merge_file": "--merge-file", "vocab_size": "--vocab-size"}

TYPES_HELP = "; ".join(
    f"{t.name} ({' '.join(FLAG_NAMES[n] for n in t.flags) or 'no flag'}): {t.summary}"
    for t in TOKENIZER_TYPES.values())
"""Each type with the flags it takes and what it is: `--tokenizer-type`'s help, everywhere."""

UNSUPPORTED_HINT = {
    "GPTSentencePieceTokenizer": "SentencePieceTokenizer (the same ids and end of document: </s>)",
    "TikTokenizer": "HuggingFaceTokenizer with a folder holding the tokenizer as tokenizer.json",
}


@dataclass
class TokenizerConfig:
    """Megatron-LM's tokenizer flags (names and defaults of core_v0.16.1's arguments.py)."""

    tokenizer_type: str = option(
        "SentencePieceTokenizer", f"{TYPES_HELP}. Megatron-LM's other types are refused.",
        choices=(*MEGATRON_LM_TOKENIZER_TYPES, "ByteLevelTokenizer"), required=True)
    tokenizer_model: Optional[str] = option(
        None, "The SentencePiece .model file, or for HuggingFaceTokenizer a local tokenizer "
        "folder (never downloaded).", path="tokenizer_model")
    vocab_file: Optional[str] = option(None, "GPT2BPETokenizer: GPT-2's vocab.json.",
                                       path="input_file")
    merge_file: Optional[str] = option(None, "GPT2BPETokenizer: GPT-2's merges.txt.",
                                       path="input_file")
    vocab_size: Optional[int] = option(
        None, "NullTokenizer: ids 0..N-1 are the data's, N is the end of document (the "
        "tokenizer's vocabulary is N+1).", at_least=1)

    def __post_init__(self) -> None:
        check(self)
        check_tokenizer_type(self.tokenizer_type)
        # What can be checked without the other flags' help, at once (spannorm-train: while
        # parsing): no flag of another type, and the files given are there and of their kind.
        # A missing flag is `check_tokenizer_args`'s: a run without tokenizer flags parses.
        _check_given(self)

    def given(self) -> List[str]:
        """The file/size flags that are set."""
        return [name for name in FLAG_NAMES if getattr(self, name) is not None]

    def describe(self) -> str:
        """`--tokenizer-type X --flag value ...`, as a user would write it."""
        parts = [f"--tokenizer-type {self.tokenizer_type}"]
        parts += [f"{FLAG_NAMES[name]} {getattr(self, name)}" for name in self.given()]
        return " ".join(parts)


def tokenizer_config(source=None, **overrides) -> TokenizerConfig:
    """A TokenizerConfig from an argparse namespace, a dict (a run record's `args`) or keywords
    (which win; None means not given). Without a type: SentencePieceTokenizer, the default."""
    values = {}
    for name in ("tokenizer_type", *FLAG_NAMES):
        value = (source.get(name) if isinstance(source, dict) else getattr(source, name, None))
        if value is not None:
            values[name] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    check_tokenizer_type(values.get("tokenizer_type", "SentencePieceTokenizer"))
    for name in ("tokenizer_model", "vocab_file", "merge_file"):
        if name in values:
            values[name] = os.fspath(values[name])
    return TokenizerConfig(**values)


# --------------------------------------------------------------------------------- checks
def check_tokenizer_type(tokenizer_type: str) -> None:
    """Raise TokenizerError for a `--tokenizer-type` this project does not implement."""
    if tokenizer_type in TOKENIZER_TYPES:
        return
    hint = UNSUPPORTED_HINT.get(tokenizer_type)
    raise TokenizerError(
        f"--tokenizer-type {tokenizer_type} is not supported here"
        + (f" (closest: {hint})" if hint else "") + f". The tokenizer types are {TYPES_HELP}.")


def check_tokenizer_args(config: TokenizerConfig) -> None:
    """Check the flags of `config` before anything heavy is loaded: the type is known, it has
    the flags it needs and none of another type's, and its files are there (a SentencePiece
    model loads, a Hugging Face folder is a local folder with tokenizer files)."""
    _check_given(config)
    kind = config.tokenizer_type
    spec = TOKENIZER_TYPES[kind]
    missing = [name for name in spec.flags if getattr(config, name) is None]
    if missing:
        hint = {"SentencePieceTokenizer": " To make one: python tools/train_tokenizer.py "
                "--embedded-corpus --model-prefix tokenizers/stdlib --vocab-size 32000 (writes "
                "tokenizers/stdlib.model). Or pass --tokenizer-type ByteLevelTokenizer, which "
                "needs no model.",
                "NullTokenizer": " NullTokenizer reads ids, not text: N is one more than the "
                "largest id in the data, and N itself marks the end of a document."}.get(kind, "")
        raise TokenizerError(
            " and ".join(FLAG_NAMES[n] for n in missing)
            + (" is" if len(missing) == 1 else " are")
            + f" required with --tokenizer-type {kind} ({kind}: {spec.summary})." + hint)


def _check_given(config: TokenizerConfig) -> None:
    """The type is known, no flag belongs to another type, and each file given is there and of
    its kind (a SentencePiece model loads, a Hugging Face folder holds tokenizer files)."""
    kind = config.tokenizer_type
    check_tokenizer_type(kind)
    spec = TOKENIZER_TYPES[kind]
    foreign = [name for name in config.given() if name not in spec.flags]
    if foreign:
        names = " and ".join(f"{FLAG_NAMES[n]} ({getattr(config, n)})" for n in foreign)
        takes = (f"takes {' and '.join(FLAG_NAMES[n] for n in spec.flags)}, not {names}"
                 if spec.flags else f"takes no {names}")
        owners = sorted({t.name for t in TOKENIZER_TYPES.values() for n in foreign
                         if n in t.flags})
        raise TokenizerError(
            f"--tokenizer-type {kind} {takes} ({kind}: {spec.summary}); "
            f"{'that flag belongs' if len(foreign) == 1 else 'those flags belong'} to "
            f"{' / '.join(owners)}. Drop it, or pass the --tokenizer-type it belongs to.")
    if config.tokenizer_model is not None and kind in ("SentencePieceTokenizer",
                                                       "Llama2Tokenizer"):
        check_sentencepiece_model(config.tokenizer_model)
    elif config.tokenizer_model is not None:  # HuggingFaceTokenizer
        hf_tokenizer_files(config.tokenizer_model)
    for name in ("vocab_file", "merge_file"):
        if getattr(config, name) is not None:
            _check_file(FLAG_NAMES[name], getattr(config, name))


def _check_file(flag: str, path: str) -> None:
    try:
        check_path("input_file", path)  # the kind these flags declare
    except UserError as error:
        raise TokenizerError(f"{flag} {error}") from None
