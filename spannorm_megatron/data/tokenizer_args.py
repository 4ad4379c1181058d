"""The tools' tokenizer flags, Hugging Face tokenizer folders, and the digest that identifies a
tokenizer in a run record. The flags themselves, which type takes which, and their checks are
`spannorm_megatron.config.tokenizer`'s.

No megatron-core or transformers import here (seconds each): the tools check their tokenizer
flags with this module first, so a missing file or a flag of another type fails at once.

Which type takes which flags is stated once, in `config.tokenizer.TOKENIZER_TYPES` (every
tool's `--help` and error message is generated from it). What each type does: `tokenizer.py`,
`tokenizer_types.py`, and the data README.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from spannorm_megatron.config.options import add_arguments, option
from spannorm_megatron.config.tokenizer import (
    FLAG_NAMES,
    SUPPORTED_TOKENIZER_TYPES,
    TOKENIZER_TYPES,
    TYPES_HELP,
    TokenizerConfig,
    TokenizerType,
    tokenizer_config,
)
from spannorm_megatron.config.tokenizer_files import hf_tokenizer_files


# --------------------------------------------------------------------------------- tools
@dataclass
class TokenizerOverrides:
    """The tools' tokenizer flags (Megatron-LM's names), all unset by default: a tool reading a
    run takes the run's recorded tokenizer, and these override or complete it."""

    tokenizer_type: Optional[str] = option(None, TYPES_HELP + ".",
                                           choices=SUPPORTED_TOKENIZER_TYPES)
    tokenizer_model: Optional[str] = option(
        None, "SentencePiece model, or HuggingFaceTokenizer's folder.", metavar="X.model_OR_DIR",
        path="tokenizer_model")
    vocab_file: Optional[str] = option(None, "GPT2BPETokenizer: vocab.json.",
                                       path="input_file")
    merge_file: Optional[str] = option(None, "GPT2BPETokenizer: merges.txt.",
                                       path="input_file")
    vocab_size: Optional[int] = option(None, "NullTokenizer: N.")

    def given(self) -> Dict[str, object]:
        """The flags as `recorded_tokenizer`'s keywords (None: not given)."""
        return {name: getattr(self, name) for name in ("tokenizer_type", *FLAG_NAMES)}


def add_tokenizer_override_flags(parser, title: str) -> None:
    """`TokenizerOverrides`' flags, in a group of their own."""
    add_arguments(parser.add_argument_group(title), TokenizerOverrides)


# --------------------------------------------------------------------------------- HF folders
# --------------------------------------------------------------------------------- identity
def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _combined(items: Iterable[Tuple[str, str]]) -> str:
    return hashlib.sha256("".join(f"{name}\0{_sha256(path)}\n" for name, path in items)
                          .encode()).hexdigest()


def tokenizer_sha256(config: TokenizerConfig) -> Optional[str]:
    """What the run record keeps to recognise the tokenizer's files: the SentencePiece model's
    SHA-256 (as before these types existed, so older records still compare), one digest over
    vocab.json and merges.txt, or over a Hugging Face folder's tokenizer files; None for the
    types without a file (NullTokenizer is told apart by its --vocab-size)."""
    kind = config.tokenizer_type
    if kind in ("SentencePieceTokenizer", "Llama2Tokenizer"):
        return _sha256(config.tokenizer_model)
    if kind == "GPT2BPETokenizer":
        return _combined((("vocab", config.vocab_file), ("merges", config.merge_file)))
    if kind == "HuggingFaceTokenizer":
        folder = config.tokenizer_model
        return _combined((n, os.path.join(folder, n)) for n in hf_tokenizer_files(folder))
    return None


# --------------------------------------------------------------------------------- records
HF_TOKENIZER_KEY = "hf_tokenizer_folder"
"""The run-record key of a checkpoint converted from a Hugging Face folder that names the copy
of that folder's tokenizer beside it (`hf.importer`): read by `recorded_tokenizer` as a
HuggingFaceTokenizer, not by training's check of the tokenizer a run was trained with."""


def recorded_tokenizer(record_args: Optional[dict], **given) -> Tuple[Optional[TokenizerConfig],
                                                                      str]:
    """The tokenizer a tool (evaluate, generate, export) uses for a checkpoint: the flags given
    to it (`given`: tokenizer_type, tokenizer_model, vocab_file, merge_file, vocab_size; None =
    not given), completed from the run record's `args` when the type is the recorded one (or
    not given), e.g. a moved model file passed alone keeps the run's Llama2Tokenizer type.

    Returns (config, "") or (None, why there is none): nothing given and nothing recorded, or a
    recorded file that is not here. Flags that do not fit are left for `check_tokenizer_args`."""
    record_args = record_args if isinstance(record_args, dict) else {}
    if record_args.get(HF_TOKENIZER_KEY) and not record_args.get("tokenizer_type"):
        record_args = dict(record_args, tokenizer_type="HuggingFaceTokenizer",
                           tokenizer_model=record_args[HF_TOKENIZER_KEY])
    given = {k: v for k, v in given.items() if v is not None}
    # A record without a type names a SentencePiece model (the only type there once was).
    recorded_type = record_args.get("tokenizer_type") or (
        "SentencePieceTokenizer" if record_args.get("tokenizer_model") else None)
    kind = given.get("tokenizer_type") or recorded_type
    if kind is None:
        if not given:
            return None, "the checkpoint records no tokenizer"
        kind = "SentencePieceTokenizer"
    values = {"tokenizer_type": kind}
    if kind == recorded_type:
        for name in TOKENIZER_TYPES.get(kind, TokenizerType(kind, (), "")).flags:
            value = record_args.get(name)
            if value is None or name in given:
                continue
            if name != "vocab_size" and not os.path.exists(value):
                return None, (f"the run record's {kind} {FLAG_NAMES[name]} {value} is not here "
                              f"(pass {FLAG_NAMES[name]})")
            values[name] = value
    values.update(given)
    return tokenizer_config(**values), ""


def tokenizer_differences(record_args: Optional[dict], config: TokenizerConfig,
                          sha256: Optional[str]) -> List[str]:
    """How `config` (with its files' digest `sha256`) differs from the tokenizer a run recorded
    in its `args`, as `flag: checkpoint X, this run Y` parts; [] when they agree or the record
    does not say. Compared: the type, the digest of its files and NullTokenizer's --vocab-size."""
    saved = record_args if isinstance(record_args, dict) else {}
    files = [FLAG_NAMES[key] for key in ("tokenizer_model", "vocab_file", "merge_file")
             if saved.get(key)]
    return [f"{flag}: checkpoint {saved.get(key)}, this run {now}" for flag, key, now in (
        ("--tokenizer-type", "tokenizer_type", config.tokenizer_type),
        ("/".join(files) or "tokenizer files", "tokenizer_sha256", sha256),
        ("--vocab-size", "vocab_size", config.vocab_size))
        if saved.get(key) not in (None, now)]


def check_recorded_tokenizer(record_args: Optional[dict], config: Optional[TokenizerConfig],
                             what: str) -> None:
    """Refuse a tokenizer that is not the one the checkpoint's run recorded (its type, its
    files' digest, NullTokenizer's size): another tokenizer of the same vocabulary size gives
    every id another meaning, so `what` (an export, samples) would be silently wrong."""
    from spannorm_megatron.errors import TokenizerError

    if config is None:
        return
    differ = tokenizer_differences(record_args, config, tokenizer_sha256(config))
    if differ:
        raise TokenizerError(
            f"The checkpoint was trained with another tokenizer ({'; '.join(differ)}), and "
            f"{what} with this one would be wrong. Pass the tokenizer it was trained with, or "
            f"none to use the recorded one.")
