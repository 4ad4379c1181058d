"""The tools' tokenizer flags, Hugging Face tokenizer folders, and the digest that identifies a
tokenizer in a run record. The flags themselves, which type takes which, and their checks are
`spannorm_megatron.config.tokenizer`'s.

No megatron-core or transformers import here (seconds each): the tools check their tokenizer
flags with this module first, so a missing file or a flag of another type fails at once.

What each type does: `tokenizer.py`, `tokenizer_types.py`, and the data README.
"""

from __future__ import annotations

import hashlib
import os
from typing import Dict, Iterable, List, Optional, Tuple

from spannorm_megatron.config.tokenizer import (
    FLAG_NAMES,
    SUPPORTED_TOKENIZER_TYPES,
    TOKENIZER_TYPES,
    TokenizerConfig,
    TokenizerType,
    tokenizer_config,
)
from spannorm_megatron.data.errors import TokenizerError


# --------------------------------------------------------------------------------- tools
def add_tokenizer_override_flags(parser, title: str) -> None:
    """The tools' tokenizer flags (Megatron-LM's names), all unset by default: a tool reading a
    run takes the run's recorded tokenizer, and these override or complete it."""
    group = parser.add_argument_group(title)
    group.add_argument("--tokenizer-type", default=None, choices=SUPPORTED_TOKENIZER_TYPES)
    group.add_argument("--tokenizer-model", default=None, metavar="X.model_OR_DIR",
                       help="SentencePiece model, or HuggingFaceTokenizer's folder")
    group.add_argument("--vocab-file", default=None, help="GPT2BPETokenizer: vocab.json")
    group.add_argument("--merge-file", default=None, help="GPT2BPETokenizer: merges.txt")
    group.add_argument("--vocab-size", type=int, default=None, help="NullTokenizer: N")


def given_tokenizer_flags(args) -> Dict[str, object]:
    """What `add_tokenizer_override_flags`' flags hold (None: not given)."""
    return {name: getattr(args, name) for name in ("tokenizer_type", *FLAG_NAMES)}


# --------------------------------------------------------------------------------- HF folders
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
def recorded_tokenizer(record_args: Optional[dict], **given) -> Tuple[Optional[TokenizerConfig],
                                                                      str]:
    """The tokenizer a tool (evaluate, generate, export) uses for a checkpoint: the flags given
    to it (`given`: tokenizer_type, tokenizer_model, vocab_file, merge_file, vocab_size; None =
    not given), completed from the run record's `args` when the type is the recorded one (or
    not given), e.g. a moved model file passed alone keeps the run's Llama2Tokenizer type.

    Returns (config, "") or (None, why there is none): nothing given and nothing recorded, or a
    recorded file that is not here. Flags that do not fit are left for `check_tokenizer_args`."""
    record_args = record_args if isinstance(record_args, dict) else {}
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
