"""Training a SentencePiece tokenizer (the engine behind `spannorm-train-tokenizer`).

Settings that differ from SentencePiece's defaults, and why:

* normalization `identity`, no removal of extra whitespace, whitespace-only pieces allowed:
  source code and formatted text must decode back exactly (indentation included), which
  NFKC normalization and whitespace collapsing would break;
* `byte_fallback` on: any character the vocabulary lacks (including `\\n`, which SentencePiece
  never sees inside a training line) is encoded as its UTF-8 bytes instead of `<unk>`, so
  `detokenize(tokenize(text)) == text` for every text;
* ids 0-3 are `<unk> <s> </s> <pad>` and the control symbols `<CLS> <SEP> <EOD> <MASK>` follow
  (ids 4-7): the pieces Megatron-LM's `SentencePieceTokenizer` expects; the end-of-document id
  (`tokenizer.eod`) is `</s>`, as in megatron-core's tokenizer library;
* `split_digits` on: numbers tokenize digit by digit, a common choice for LLM vocabularies.

Determinism: the same inputs and settings give the same model file. Sampling
(`input_sentence_size`) uses SentencePiece's generator seeded from `seed`. BPE vocabularies do
not depend on the thread count; unigram vocabularies can (floating-point sums in parallel), so
pin `num_threads` for bit-identical unigram models across machines.

Training text: every line of every document is one SentencePiece "sentence" (SentencePiece
trains on lines; document boundaries do not matter to it).
"""

from __future__ import annotations

import io
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, TextIO, Tuple

from spannorm_megatron.data.corpus import iter_corpus_documents
from spannorm_megatron.data.documents import (
    INPUT_FORMATS,
    INPUT_FORMATS_HELP,
    check_input_file,
    iter_documents,
    resolve_format,
)
from spannorm_megatron.errors import DataError
from spannorm_megatron.data.progress import Throughput
from spannorm_megatron.data.sp_model import MEGATRON_SPECIAL_PIECES
from spannorm_megatron.config.options import SEED, option

MODEL_TYPES = ("bpe", "unigram")
NORMALIZATIONS = ("identity", "nfkc", "nmt_nfkc", "nfkc_cf", "nmt_nfkc_cf")
_NUM_META_PIECES = 4  # <unk> <s> </s> <pad>


def _comma_list(value: str) -> List[str]:
    return [item for item in value.split(",") if item]


@dataclass
class TokenizerTrainingConfig:
    """What to train on and how; each field is the `spannorm-train-tokenizer` flag of its name
    (`inputs`: --input)."""

    model_prefix: str = option(
        doc="Output prefix: writes PREFIX.model and PREFIX.vocab (parent dirs are created).",
        required=True, path="output_file")
    inputs: List[str] = option(
        doc="Training text: JSON Lines files (text under --json-keys) and/or plain .txt files "
        "(see documents.py).", flag="--input", nargs="+", metavar="FILE", default_factory=list,
        path="input_file")
    embedded_corpus: bool = option(
        False, "Train on the embedded corpus (Python stdlib sources, see "
        "spannorm_megatron/data/corpus.py) instead of --input.")
    embedded_corpus_max_bytes: Optional[int] = option(
        None, "Use only the first N bytes' worth of embedded-corpus files (a stable prefix); "
        "unset: all of it.")
    json_keys: List[str] = option(
        doc="JSONL keys holding the text (default: text).", nargs="+",
        default_factory=lambda: ["text"])
    input_format: str = option("auto", INPUT_FORMATS_HELP, choices=INPUT_FORMATS)
    vocab_size: int = option(
        32000, "Vocabulary size: the number of pieces, special pieces and (with byte fallback) "
        "the 256 byte pieces included (default 32000).")
    model_type: str = option("bpe", "bpe or unigram (default: bpe).", choices=MODEL_TYPES)
    character_coverage: float = option(
        1.0, "Fraction of characters kept as pieces (default 1.0; rarer ones use byte "
        "fallback).")
    input_sentence_size: int = option(
        0, "Train on a seeded random sample of N lines (default 0: all lines).")
    byte_fallback: bool = option(
        True, "Encode unknown characters as UTF-8 byte pieces instead of <unk> (default: on).")
    control_symbols: List[str] = option(
        doc="Reserved pieces never produced from text, ids right after <unk> <s> </s> <pad> "
        f"(default: {','.join(MEGATRON_SPECIAL_PIECES)}; Megatron-LM's special pieces).",
        parse=_comma_list, metavar="A,B,...",
        default_factory=lambda: list(MEGATRON_SPECIAL_PIECES))
    user_defined_symbols: List[str] = option(
        doc="Pieces always kept whole when they occur in the text (e.g. '<|im_start|>').",
        parse=_comma_list, metavar="A,B,...", default_factory=list)
    normalization: str = option(
        "identity", "SentencePiece normalization rule (default identity: text kept byte-exact, "
        "see the module docstring).", choices=NORMALIZATIONS)
    split_digits: bool = option(True, "Split numbers into single digits (default: on).")
    max_sentence_length: int = option(
        16384, "Longest training line in bytes; longer lines are skipped (default 16384).")
    num_threads: int = option(
        doc="Trainer threads (default: all cores; pin it for bit-identical unigram models).",
        default_factory=lambda: os.cpu_count() or 1)
    seed: int = option(1234, "Seed for line sampling (default 1234).", **SEED)
    verbose: bool = option(False, "Show SentencePiece's own training log (otherwise warnings "
                           "only).")

    def __post_init__(self) -> None:
        self.inputs = list(self.inputs)
        self.json_keys = list(self.json_keys)
        self.control_symbols = list(self.control_symbols)
        self.user_defined_symbols = list(self.user_defined_symbols)
        if self.embedded_corpus == bool(self.inputs):
            raise DataError(
                "Give the training text either as --input FILE [FILE ...] or as --embedded-corpus "
                "(the Python standard library sources), not both and not neither."
            )
        if self.model_type not in MODEL_TYPES:
            raise DataError(
                f"--model-type {self.model_type} is not supported; use bpe or unigram."
            )
        if self.normalization not in NORMALIZATIONS:
            raise DataError(
                f"--normalization {self.normalization} is not a SentencePiece rule; use one of "
                f"{', '.join(NORMALIZATIONS)} (identity keeps text exactly as written)."
            )
        reserved = _NUM_META_PIECES + len(self.control_symbols) + len(self.user_defined_symbols)
        reserved += 256 if self.byte_fallback else 0
        if self.vocab_size <= reserved:
            raise DataError(
                f"--vocab-size {self.vocab_size} leaves no room for learned pieces: {reserved} "
                "ids are reserved (4 meta pieces, the control and user-defined symbols"
                + (", and 256 byte-fallback pieces" if self.byte_fallback else "")
                + f"). Use --vocab-size of at least {reserved + 100}."
            )
        if not 0.0 < self.character_coverage <= 1.0:
            raise DataError(
                f"--character-coverage {self.character_coverage} must be in (0, 1]; 1.0 keeps "
                "every character seen, 0.9995 is SentencePiece's default for large alphabets."
            )
        if self.input_sentence_size < 0 or self.num_threads < 1 or self.max_sentence_length < 1:
            raise DataError(
                "--input-sentence-size must be >= 0 (0: all lines), --num-threads >= 1 and "
                "--max-sentence-length >= 1."
            )
        for path in self.inputs:
            check_input_file(path)
            resolve_format(path, self.input_format)


@dataclass
class TokenizerTrainingResult:
    """What `train_sentencepiece` wrote and read."""

    model_path: str
    vocab_path: str
    vocab_size: int
    documents: int
    lines: int
    bytes: int
    seconds: float


def _iter_texts(config: TokenizerTrainingConfig) -> Iterator[Tuple[str, str]]:
    """(source description, document text) for every training document, in order."""
    if config.embedded_corpus:
        for doc in iter_corpus_documents(config.embedded_corpus_max_bytes):
            yield f"stdlib:{doc.path}", doc.text
        return
    for path in config.inputs:
        for _, doc in iter_documents(path, config.input_format, config.json_keys):
            for sentences in doc.values():
                for text in sentences:
                    yield path, text


class _LineFeed:
    """The sentence iterator SentencePiece reads, counting and reporting as it goes."""

    def __init__(self, config: TokenizerTrainingConfig, log: TextIO, every_bytes: int = 10_000_000):
        self.config = config
        self.log = log
        self.every = every_bytes
        self.totals = Throughput()
        self.lines = 0
        self.error: Optional[DataError] = None

    def __iter__(self) -> Iterator[str]:
        # SentencePiece turns an exception raised in here into a RuntimeError that carries only
        # its text; keep the original so train_sentencepiece can re-raise it as it was.
        try:
            yield from self._lines()
        except DataError as err:
            self.error = err
            raise

    def _lines(self) -> Iterator[str]:
        next_report = self.every
        for _, text in _iter_texts(self.config):
            self.totals.add(documents=1, nbytes=len(text.encode("utf-8")))
            for line in text.split("\n"):
                if line:
                    self.lines += 1
                    yield line
            if self.totals.bytes >= next_report:
                next_report += self.every
                print(
                    f"  read {self.totals.documents:,} documents, {self.lines:,} lines, "
                    f"{self.totals.bytes / 1e6:,.1f} MB",
                    file=self.log,
                    flush=True,
                )


def _vocab_listing(model_bytes: bytes) -> str:
    """The `.vocab` text SentencePiece writes next to a model: `piece<TAB>score` per line."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    return "".join(f"{p.piece}\t{p.score:g}\n" for p in proto.pieces)


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def train_sentencepiece(
    config: TokenizerTrainingConfig, log: Optional[TextIO] = None
) -> TokenizerTrainingResult:
    """Train, then write `<prefix>.model` and `<prefix>.vocab` (only once training succeeded)."""
    import sentencepiece

    log = log if log is not None else sys.stderr
    if not config.embedded_corpus:
        source = ", ".join(config.inputs)
    elif config.embedded_corpus_max_bytes:
        source = f"the embedded corpus (first {config.embedded_corpus_max_bytes:,} bytes)"
    else:
        source = "the embedded corpus (Python stdlib sources)"
    print(
        f"Training a {config.model_type} SentencePiece model, vocab {config.vocab_size:,}, on "
        f"{source}",
        file=log,
        flush=True,
    )
    feed = _LineFeed(config, log)
    model = io.BytesIO()
    sentencepiece.set_random_generator_seed(config.seed)
    # SentencePiece turns every keyword into a `--flag=str(value)`: an empty list must be left
    # out, not passed as None (that would add a piece named "None").
    symbols = {}
    if config.control_symbols:
        symbols["control_symbols"] = config.control_symbols
    if config.user_defined_symbols:
        symbols["user_defined_symbols"] = config.user_defined_symbols
    start = time.perf_counter()
    try:
        sentencepiece.SentencePieceTrainer.train(
            **symbols,
            sentence_iterator=iter(feed),
            model_writer=model,
            model_type=config.model_type,
            vocab_size=config.vocab_size,
            character_coverage=config.character_coverage,
            input_sentence_size=config.input_sentence_size,
            shuffle_input_sentence=True,
            byte_fallback=config.byte_fallback,
            normalization_rule_name=config.normalization,
            remove_extra_whitespaces=False,
            allow_whitespace_only_pieces=True,
            split_digits=config.split_digits,
            max_sentence_length=config.max_sentence_length,
            unk_id=0,
            bos_id=1,
            eos_id=2,
            pad_id=3,
            num_threads=config.num_threads,
            minloglevel=0 if config.verbose else 1,
        )
    except RuntimeError as err:
        if feed.error is not None:
            raise feed.error from None
        if feed.lines == 0:
            raise DataError(
                f"No text found in {source}: every document is empty. Check --json-keys (JSONL) "
                "or the file's content; nothing was written."
            ) from None
        message = str(err).strip()
        hint = ""
        if "required_chars" in message:
            hint = " Raise --vocab-size, or lower --character-coverage (e.g. 0.9995)."
        elif "Vocabulary size too high" in message or "vocab_size" in message.lower():
            hint = " The text is too small for that vocabulary: lower --vocab-size or add text."
        raise DataError(
            f"SentencePiece could not train on {source}: {message}.{hint} No files were written "
            f"for --model-prefix {config.model_prefix}."
        ) from None
    seconds = time.perf_counter() - start

    prefix = Path(config.model_prefix)
    prefix.parent.mkdir(parents=True, exist_ok=True)
    model_path = prefix.with_name(prefix.name + ".model")
    vocab_path = prefix.with_name(prefix.name + ".vocab")
    model_bytes = model.getvalue()
    _write_atomically(model_path, model_bytes)
    _write_atomically(vocab_path, _vocab_listing(model_bytes).encode("utf-8"))
    print(
        f"Read {feed.totals.documents:,} documents, {feed.lines:,} lines, "
        f"{feed.totals.bytes / 1e6:,.2f} MB; trained in {seconds:.1f} s. Wrote {model_path} "
        f"and {vocab_path}.",
        file=log,
        flush=True,
    )
    return TokenizerTrainingResult(
        model_path=str(model_path),
        vocab_path=str(vocab_path),
        vocab_size=config.vocab_size,
        documents=feed.totals.documents,
        lines=feed.lines,
        bytes=feed.totals.bytes,
        seconds=seconds,
    )
