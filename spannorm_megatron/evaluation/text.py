"""The evaluated text: checked, read in blocks, tokenized, and cut into scored windows.

A file is read block by block (about `BLOCK_BYTES`, cut after a newline), so a file of any size
is evaluated in bounded memory. Each block is tokenized on its own; the token stream is cut into
consecutive, non-overlapping windows of `seq_length` tokens (the last one may be shorter). In a
window the model reads the tokens and every token after the first is scored: the first one is
context only, because nothing before it is in the window.

Bits per byte needs the bytes of the scored tokens. Every token gets a byte count: the UTF-8
length of its piece (a byte-fallback piece is one byte, control pieces none), and the block's
first token absorbs what the tokenizer adds or drops there (SentencePiece's dummy-prefix space,
whitespace a normalizer removes), so the counts of a block add up to its exact UTF-8 size. The
scored bytes are then the text's bytes minus those of each window's first token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Sequence, Tuple

from spannorm_megatron.config.paths import path_problem
from spannorm_megatron.errors import UserError

BLOCK_BYTES = 256 * 1024


class EvaluationError(UserError):
    """An input `tools/evaluate.py` cannot evaluate (message names it and the fix)."""


# ------------------------------------------------------------------------------ the file


def check_text_file(path: str, max_bytes: int = 0) -> int:
    """UTF-8 bytes that will be evaluated (the whole file, or its first `max_bytes` cut at a
    line end). Reads the file once, before any model is loaded, so that a file that is missing,
    empty or not UTF-8 costs nothing but this error."""
    why = path_problem("input_file", "--input", path)  # the kind --input declares
    if why and not why.endswith("is empty."):  # an empty file: said below, as for blank text
        raise EvaluationError(f"--input {why}")
    total, text_seen = 0, False
    for block in read_blocks(path, max_bytes=max_bytes):
        total += len(block.encode("utf-8"))
        text_seen = text_seen or bool(block.strip())
    if not text_seen:
        raise EvaluationError(f"--input {path} is empty{' (only whitespace)' if total else ''}: "
                              f"there is no text to score.")
    return total


def read_blocks(path: str, block_bytes: int = BLOCK_BYTES, max_bytes: int = 0) -> Iterator[str]:
    """The file's text in blocks of about `block_bytes`, each ending after a newline where there
    is one (else at a character boundary), up to `max_bytes` (0: all) cut the same way.
    EvaluationError, naming the byte offset, where the file is not UTF-8."""
    start = 0      # file offset of the next block
    read = 0       # bytes read from the file
    carry = b""    # read, not yet yielded
    with open(path, "rb") as f:
        while True:
            want = block_bytes if not max_bytes else min(block_bytes, max_bytes - read)
            chunk = f.read(want) if want > 0 else b""
            read += len(chunk)
            limit_hit = bool(max_bytes) and read >= max_bytes
            file_done = len(chunk) < want or (limit_hit and not f.read(1))
            data = carry + chunk
            block, carry = (data, b"") if file_done else _split(data)
            if limit_hit and not file_done and start and b"\n" not in block:
                block = b""  # the limit fell inside a line: the evaluated text ends before it
            if block:
                yield _decode(block, start, path)
                start += len(block)
            if file_done or limit_hit:
                return


def _split(data: bytes) -> Tuple[bytes, bytes]:
    """(up to and including the last newline, the rest); without a newline, (whole characters,
    the bytes of a character cut at the end)."""
    newline = data.rfind(b"\n")
    if newline >= 0:
        return data[:newline + 1], data[newline + 1:]
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.end == len(data) and "unexpected end" in err.reason:
            return data[:err.start], data[err.start:]
    return data, b""  # whole, or not UTF-8: _decode says where


def _decode(block: bytes, start: int, path: str) -> str:
    try:
        return block.decode("utf-8")
    except UnicodeDecodeError as err:
        raise EvaluationError(
            f"--input {path} is not UTF-8 text (byte {start + err.start}: {err.reason}). "
            f"Convert it first, e.g. `iconv -f latin1 -t utf-8 IN > OUT`.") from None


# ------------------------------------------------------------------------------ tokenizers


@dataclass
class EvalTokenizer:
    """What evaluation needs of a tokenizer: ids of a text, each id's byte length, vocab size,
    and the ids the tokenizer puts before a text (Llama-2's `<s>`), which start the stream once:
    context for the first window, never scored, no bytes."""

    name: str
    encode: Callable[[str], List[int]]
    piece_bytes: List[int]
    vocab_size: int
    prefix: List[int] = field(default_factory=list)

    @classmethod
    def of(cls, config) -> "EvalTokenizer":
        """The training stack's tokenizer of these flags (a `TokenizerConfig`): the ids
        evaluation reads are the ids `tools/preprocess_data.py` writes for the same text."""
        kind = config.tokenizer_type
        if kind == "ByteLevelTokenizer":
            return cls.byte_level()
        if kind == "SentencePieceTokenizer":
            return cls.sentencepiece(config.tokenizer_model)
        from spannorm_megatron.data.tokenizer import build_tokenizer

        tok = build_tokenizer(config)
        name = config.describe()
        if kind == "Llama2Tokenizer":
            return cls(name, lambda text: tok.tokenize(text, bos=False),
                       _sentencepiece_bytes(tok._processor, tok.vocab_size), tok.vocab_size,
                       [tok.bos])
        if kind == "GPT2BPETokenizer":
            # every character of a byte-level BPE token stands for one byte
            return cls(name, tok.tokenize, [len(token) for token in tok.vocab], tok.vocab_size)
        if kind == "HuggingFaceTokenizer":
            return cls(name, tok.tokenize, _hf_piece_bytes(tok.transformers_tokenizer),
                       tok.vocab_size)
        if kind == "NullTokenizer":
            # "17 4": each id with the space after it; the block correction fixes the last
            return cls(name, tok.tokenize, [len(str(i)) + 1 for i in range(tok.eod)] + [0],
                       tok.vocab_size)
        raise EvaluationError(f"--tokenizer-type {kind} cannot be evaluated here.")

    @classmethod
    def byte_level(cls) -> "EvalTokenizer":
        from spannorm_megatron.data.tokenizer import ByteLevelTokenizer

        tok = ByteLevelTokenizer()
        return cls("ByteLevelTokenizer", tok.tokenize, [1] * tok.NUM_BYTES + [0], tok.vocab_size)

    @classmethod
    def sentencepiece(cls, model_path: str) -> "EvalTokenizer":
        from spannorm_megatron.data.tokenizer import SentencePieceTokenizer

        tok = SentencePieceTokenizer(model_path)
        return cls(f"SentencePiece {model_path}", tok.tokenize,
                   _sentencepiece_bytes(tok._processor, tok.vocab_size), tok.vocab_size)

    @classmethod
    def huggingface(cls, folder: str) -> "EvalTokenizer":
        from transformers import AutoTokenizer

        from spannorm_megatron.hf.generation import text_prefix_ids

        # trust_remote_code: the folder's config names our model class (see generation.py)
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        # split_special_tokens: text such as "<unk>" (WikiText has it) is text to score, not a
        # control id; our SentencePieceTokenizer never makes special ids from text either.
        return cls(f"Hugging Face tokenizer of {folder}",
                   lambda text: tok.encode(text, add_special_tokens=False,
                                           split_special_tokens=True),
                   _hf_piece_bytes(tok), len(tok), text_prefix_ids(tok, folder))


def _sentencepiece_bytes(sp, vocab_size: int) -> List[int]:
    """Byte count of every id of a SentencePiece model (ids past its pieces, which Megatron-LM
    appends, count none): control and unknown pieces none, a byte-fallback piece one."""
    table = []
    for i in range(vocab_size):
        if i >= sp.get_piece_size() or sp.is_control(i) or sp.is_unknown(i):
            table.append(0)
        elif sp.is_byte(i):
            table.append(1)
        else:
            table.append(len(sp.id_to_piece(i).replace("\u2581", " ").encode("utf-8")))
    return table


def _hf_piece_bytes(tok) -> List[int]:
    """Byte count of every id of a transformers tokenizer."""
    size = len(tok)
    pieces = tok.convert_ids_to_tokens(list(range(size)))
    special = set(tok.all_special_ids)
    byte_decoder = _byte_level_decoder(tok)
    table = []
    for i, piece in enumerate(pieces):
        if piece is None or i in special:
            table.append(0)
        elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", piece):
            table.append(1)
        elif byte_decoder is not None:
            table.append(sum(1 for ch in piece if ch in byte_decoder))
        else:
            table.append(len(piece.replace("\u2581", " ").encode("utf-8")))
    return table


def _byte_level_decoder(tok):
    """GPT-2 style byte-level BPE maps each byte to one printable character: that map's inverse,
    or None for other tokenizers."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None or "ByteLevel" not in repr(backend.decoder):
        return None
    try:
        from transformers.convert_slow_tokenizer import bytes_to_unicode
    except ImportError:  # pragma: no cover - then the block correction absorbs the difference
        return None
    return {char: byte for byte, char in bytes_to_unicode().items()}


# ------------------------------------------------------------------------------ windows


@dataclass
class Window:
    ids: List[int]
    scored_bytes: int

    @property
    def scored_tokens(self) -> int:
        return len(self.ids) - 1


def token_bytes(tokenizer: EvalTokenizer, text: str, ids: Sequence[int]) -> List[int]:
    """Byte count of every token of `ids` (the tokens of `text`), summing to its UTF-8 size."""
    table = tokenizer.piece_bytes
    counts = [table[i] if 0 <= i < len(table) else 0 for i in ids]
    if counts:
        counts[0] = max(0, counts[0] + len(text.encode("utf-8")) - sum(counts))
    return counts


def windows(blocks: Iterator[str], tokenizer: EvalTokenizer,
            seq_length: int) -> Iterator[Tuple[Window, int]]:
    """(window, text bytes read so far) over the blocks' tokens: full windows of `seq_length`
    tokens, then the rest if it holds at least two tokens (one to read, one to score)."""
    ids: List[int] = list(tokenizer.prefix)
    counts: List[int] = [0] * len(ids)
    read = 0
    for block in blocks:
        block_ids = tokenizer.encode(block)
        ids += block_ids
        counts += token_bytes(tokenizer, block, block_ids)
        read += len(block.encode("utf-8"))
        while len(ids) >= seq_length:
            yield Window(ids[:seq_length], sum(counts[1:seq_length])), read
            del ids[:seq_length], counts[:seq_length]
    if len(ids) >= 2:
        yield Window(ids, sum(counts[1:])), read
