"""Reading documents from the input files of the data tools: JSON Lines or plain text.

Formats
    JSONL (Megatron-LM's "loose JSON"; any suffix other than .txt/.text): one JSON object per
    line; the document is the string under each `--json-keys` key. As in Megatron-LM, a value
    may also be a list of strings (a document already split into sentences): each becomes one
    sequence of the document in the `.idx`. Blank lines are skipped.

    Plain text (`.txt`/`.text`, or `--input-format text`): documents are separated by one or more
    blank lines (lines holding only ASCII whitespace); a document is its lines joined with `\\n`,
    without the final newline. One document per line would cut prose and code at every line
    break; paragraphs keep them whole (tinyshakespeare: one speech per document; WikiText: one
    paragraph or heading). Line endings `\\r\\n` read as `\\n`.

Records are read as raw bytes by `iter_records` (cheap, in the main process) and decoded by
`RecordDecoder` (JSON parsing and UTF-8 decoding, in the worker processes), so that the parsing
runs in parallel and every error can still name the file and line.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Sequence, Tuple, Union

from spannorm_megatron.config.paths import check_path
from spannorm_megatron.errors import InputFileError, UserError

TEXT_SUFFIXES = (".txt", ".text")
INPUT_FORMATS = ("auto", "jsonl", "text")
INPUT_FORMATS_HELP = "auto (default): .txt/.text files are plain text, everything else JSON Lines."
"""What `--input-format` means, for every tool that reads input files."""

Record = Tuple[int, bytes]
"""(1-based line number where the record starts, its raw bytes)."""


def resolve_format(path: Union[str, os.PathLike], input_format: str = "auto") -> str:
    """`jsonl` or `text` for `path`: explicit, else `.txt`/`.text` → text, anything else → jsonl."""
    if input_format not in INPUT_FORMATS:
        raise InputFileError(
            f"--input-format {input_format} is not known; use one of {', '.join(INPUT_FORMATS)} "
            "(auto: .txt/.text files are plain text, everything else JSON Lines)."
        )
    if input_format != "auto":
        return input_format
    return "text" if Path(path).suffix.lower() in TEXT_SUFFIXES else "jsonl"


def check_input_file(path: Union[str, os.PathLike]) -> Path:
    """Return `path` if it is a readable, non-empty regular file (`config.paths`' check of an
    input file), else raise InputFileError."""
    try:
        check_path("input_file", os.fspath(path))
    except UserError as error:
        raise InputFileError(f"Input file {error}") from None
    return Path(path)


def iter_records(path: Union[str, os.PathLike], fmt: str) -> Iterator[Record]:
    """Yield the raw records (JSONL lines or plain-text paragraphs) of `path` with line numbers."""
    with open(path, "rb") as stream:
        if fmt == "jsonl":
            for number, line in enumerate(stream, start=1):
                if line.strip():
                    yield number, line
            return
        start, lines = 0, []
        for number, line in enumerate(stream, start=1):
            if line.strip():
                if not lines:
                    start = number
                lines.append(line)
            elif lines:
                yield start, b"".join(lines)
                lines = []
        if lines:
            yield start, b"".join(lines)


@dataclass(frozen=True)
class RecordDecoder:
    """Turns a raw record into `{key: [sentence, ...]}`; picklable, so workers can hold one.

    Raises InputFileError naming the file and line for bad UTF-8, bad JSON, a line that is not
    a JSON object, a missing key, or a value that is neither a string nor a list of strings.
    """

    path: str
    """Input file, for error messages."""

    fmt: str
    """`jsonl` or `text`."""

    json_keys: Tuple[str, ...]
    """Keys to read (JSONL); for text, the single name the output is filed under."""

    def __call__(self, record: Record) -> Dict[str, List[str]]:
        number, raw = record
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            line = number + raw[: err.start].count(b"\n")  # a paragraph spans several lines
            column = err.start - raw.rfind(b"\n", 0, err.start)
            raise InputFileError(
                f"Line {line} of '{self.path}' is not valid "
                f"UTF-8 (byte {raw[err.start]:#04x} at byte column {column}). Convert the file "
                "to UTF-8 (e.g. iconv -f latin1 -t utf-8) and run again."
            ) from None
        if self.fmt == "text":
            text = text.replace("\r\n", "\n")
            return {self.json_keys[0]: [text[:-1] if text.endswith("\n") else text]}
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as err:
            snippet = text.strip()
            snippet = snippet if len(snippet) <= 60 else snippet[:57] + "..."
            raise InputFileError(
                f"Line {number} of '{self.path}' is not valid JSON ({err.msg} at column "
                f"{err.colno}): {snippet!r}. JSON Lines input needs one JSON object per line, "
                'e.g. {"text": "..."}; fix or delete that line. A plain-text file needs a .txt '
                "suffix or --input-format text."
            ) from None
        if not isinstance(obj, dict):
            raise InputFileError(
                f"Line {number} of '{self.path}' is a JSON {type(obj).__name__}, not an object. "
                'Each line must be an object such as {"text": "..."}; fix or delete that line.'
            )
        out = {}
        for key in self.json_keys:
            if key not in obj:
                keys = ", ".join(repr(k) for k in list(obj)[:10]) or "none"
                raise InputFileError(
                    f"Line {number} of '{self.path}' has no key '{key}' (its keys: {keys}). Pass "
                    "--json-keys the key(s) that hold the document text, or fix that line."
                )
            value = obj[key]
            if isinstance(value, str):
                out[key] = [value]
            elif isinstance(value, list) and all(isinstance(v, str) for v in value):
                out[key] = value
            else:
                raise InputFileError(
                    f"Line {number} of '{self.path}': the value of '{key}' is a JSON "
                    f"{type(value).__name__}; it must be a string (the document) or a list of "
                    "strings (its sentences). Fix that line or choose another --json-keys key."
                )
        return out


def iter_documents(
    path: Union[str, os.PathLike], fmt: str = "auto", json_keys: Sequence[str] = ("text",)
) -> Iterator[Tuple[int, Dict[str, List[str]]]]:
    """Yield (line number, {key: sentences}) for every document of `path`, in order."""
    path = check_input_file(path)
    fmt = resolve_format(path, fmt)
    decode = RecordDecoder(str(path), fmt, tuple(json_keys))
    for record in iter_records(path, fmt):
        yield record[0], decode(record)
