"""Megatron-LM's tokenizer flags: which `--tokenizer-type` takes which file flags, the checks that
run before anything heavy is loaded, and the digest that identifies a tokenizer in a run record.

No megatron-core or transformers import here (seconds each): the tools check their tokenizer
flags with this module first, so a missing file or a flag of another type fails at once.

Which type takes which flags is stated once, in `TOKENIZER_TYPES` (every tool's `--help` and
error message is generated from it). What each type does: `tokenizer.py`, `tokenizer_types.py`,
and the data README.

A flag of another type is refused, where Megatron-LM ignores it: `--vocab-size 32000` next to a
SentencePiece model looks as if it set the vocabulary, and would not.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from typing import Dict, Iterable, List, Optional, Tuple

from spannorm_megatron.data.errors import TokenizerError
from spannorm_megatron.options import add_arguments, check, option


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
        "folder (never downloaded).")
    vocab_file: Optional[str] = option(None, "GPT2BPETokenizer: GPT-2's vocab.json.")
    merge_file: Optional[str] = option(None, "GPT2BPETokenizer: GPT-2's merges.txt.")
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


# --------------------------------------------------------------------------------- tools
@dataclass
class TokenizerOverrides:
    """The tools' tokenizer flags (Megatron-LM's names), all unset by default: a tool reading a
    run takes the run's recorded tokenizer, and these override or complete it."""

    tokenizer_type: Optional[str] = option(None, TYPES_HELP + ".",
                                           choices=SUPPORTED_TOKENIZER_TYPES)
    tokenizer_model: Optional[str] = option(
        None, "SentencePiece model, or HuggingFaceTokenizer's folder.", metavar="X.model_OR_DIR")
    vocab_file: Optional[str] = option(None, "GPT2BPETokenizer: vocab.json.")
    merge_file: Optional[str] = option(None, "GPT2BPETokenizer: merges.txt.")
    vocab_size: Optional[int] = option(None, "NullTokenizer: N.")


def add_tokenizer_override_flags(parser, title: str) -> None:
    """`TokenizerOverrides`' flags, in a group of their own."""
    add_arguments(parser.add_argument_group(title), TokenizerOverrides)


def given_tokenizer_flags(args) -> Dict[str, object]:
    """What `add_tokenizer_override_flags`' flags hold (None: not given)."""
    return {name: getattr(args, name) for name in ("tokenizer_type", *FLAG_NAMES)}


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
        from spannorm_megatron.data.sp_model import check_sentencepiece_model

        check_sentencepiece_model(config.tokenizer_model)
    elif config.tokenizer_model is not None:  # HuggingFaceTokenizer
        hf_tokenizer_files(config.tokenizer_model)
    for name in ("vocab_file", "merge_file"):
        if getattr(config, name) is not None:
            _check_file(FLAG_NAMES[name], getattr(config, name))


def _check_file(flag: str, path: str) -> None:
    if not os.path.exists(path):
        raise TokenizerError(f"{flag} {path} does not exist; check the path.")
    if not os.path.isfile(path):
        raise TokenizerError(f"{flag} {path} is not a file.")
    if not os.access(path, os.R_OK):
        raise TokenizerError(f"{flag} {path} cannot be read (permissions).")


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
