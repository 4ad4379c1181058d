"""The embedded default corpus: the Python standard library's own source code.

Every machine that runs this project has a Python installation, so its standard library is a
corpus that needs no download, no licence check (PSF licence) and no network. It is real,
varied text: code, docstrings, comments and prose in English, a few non-ASCII strings.

What it contains
    Every `*.py` file under `sysconfig.get_paths()["stdlib"]` (e.g. /usr/lib/python3.11), one
    document per file, except:

    * test suites: any directory named `test`, `tests` or `idle_test` (e.g. `test/`,
      `unittest/test/`, `lib2to3/tests/`); they are mostly repetitive fixtures,
    * installed third-party code and build products: `site-packages`, `dist-packages`,
      `lib-dynload`, `__pycache__`, the `config-*` build directory,
    * generated tables and data rather than written code: `encodings/` (codec tables),
      `pydoc_data/` (one huge generated string), `_sysconfigdata_*.py` (this build's compiler
      flags and paths, which differ from machine to machine),
    * applications bundled with CPython: `idlelib/`, `turtledemo/`,
    * files that are empty or whitespace only (many `__init__.py`).

    For CPython 3.11.7 that is 525 files and 9.1 MB of text.

Determinism
    Files are taken in sorted order of their path relative to the stdlib root (POSIX form),
    decoded with the encoding they declare (PEP 263, `tokenize.detect_encoding`) and their line
    endings normalized to `\\n`. The same Python installation therefore always gives the same
    documents in the same order. A different Python version gives a different (equally
    deterministic) corpus; `CorpusManifest` records the version and a SHA-256 of the content so
    runs can tell.

Size cap
    `max_bytes` keeps the longest prefix of that sorted list whose UTF-8 size fits in the cap.
    A smaller cap therefore always gives a prefix of what a larger cap gives, which keeps small
    test corpora stable.

Output formats (`write_embedded_corpus`, or `python -m spannorm_megatron.data.corpus OUT.jsonl`)
    * JSONL (`.jsonl`/`.json`): one `{"text": ..., "path": ...}` object per line, one document
      per source file; this is what `tools/preprocess_data.py` reads (Megatron-LM's loose-JSON
      input), `path` is provenance only.
    * plain text (`.txt`): the documents one after another, each followed by a newline. Source
      files contain blank lines, so plain text does *not* keep document boundaries: use it for
      tokenizer training only, JSONL for preprocessing.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sys
import sysconfig
import tokenize
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Union

from spannorm_megatron.errors import DataError

EXCLUDED_DIR_NAMES = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "__pycache__",
        "encodings",
        "pydoc_data",
        "idlelib",
        "turtledemo",
    }
)
"""Directory names skipped wherever they occur below the stdlib root (see the module docstring)."""

EXCLUDED_DIR_PREFIXES = ("config-",)
"""Directory name prefixes skipped: the `config-3.x-<platform>` build directory."""

EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
"""File name prefixes skipped: machine-specific build data."""


@dataclass(frozen=True)
class CorpusDocument:
    """One source file of the embedded corpus."""

    path: str
    """Path relative to the stdlib root, POSIX form (e.g. `json/decoder.py`)."""

    text: str
    """The file's text, decoded per its PEP 263 declaration, line endings normalized to `\\n`."""


@dataclass(frozen=True)
class CorpusManifest:
    """What `write_embedded_corpus` wrote, for logs and reproducibility checks."""

    path: str
    """The file written."""

    format: str
    """`jsonl` or `txt`."""

    num_documents: int
    """Number of source files (documents) written."""

    num_bytes: int
    """UTF-8 size of the documents' text (not of the JSON encoding)."""

    sha256: str
    """SHA-256 over the documents' paths and texts, independent of the output format."""

    python_version: str
    """`platform`-style version of the Python whose stdlib was read, e.g. `3.11.7`."""

    stdlib_root: str
    """The directory the documents came from."""

    def to_dict(self) -> dict:
        return asdict(self)


def stdlib_root() -> Path:
    """The standard library directory of the running Python (inside a venv: the base install)."""
    return Path(sysconfig.get_paths()["stdlib"])


def _excluded_dir(name: str) -> bool:
    return name in EXCLUDED_DIR_NAMES or name.startswith(EXCLUDED_DIR_PREFIXES)


def corpus_files(root: Optional[Union[str, Path]] = None) -> List[str]:
    """Relative POSIX paths of the corpus's candidate `.py` files, sorted.

    Empty files are still listed here; `iter_corpus_documents` drops them.
    """
    root = Path(root) if root is not None else stdlib_root()
    if not root.is_dir():
        raise DataError(
            f"The embedded corpus reads the Python standard library at '{root}', but that is not "
            "a directory. Run with a regular CPython installation (its `sysconfig` stdlib path "
            "must exist), or pass your own text with --input instead of --embedded-corpus."
        )
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk does not descend into excluded trees at all.
        dirnames[:] = [d for d in dirnames if not _excluded_dir(d)]
        for name in filenames:
            if name.endswith(".py") and not name.startswith(EXCLUDED_FILE_PREFIXES):
                found.append(Path(dirpath, name).relative_to(root).as_posix())
    return sorted(found)


def _read_source(path: Path) -> str:
    """Decode like the interpreter does (PEP 263 cookie or UTF-8), normalize newlines."""
    raw = path.read_bytes()
    encoding, _ = tokenize.detect_encoding(io.BytesIO(raw).readline)
    text = raw.decode(encoding)
    if text.startswith("\ufeff"):
        text = text[1:]
    return text.replace("\r\n", "\n").replace("\r", "\n")


def iter_corpus_documents(
    max_bytes: Optional[int] = None, root: Optional[Union[str, Path]] = None
) -> Iterator[CorpusDocument]:
    """Yield the corpus documents in their fixed order, stopping before `max_bytes` is exceeded.

    Args:
        max_bytes: cap on the summed UTF-8 size of the documents' text; None for no cap. The
            result is the longest prefix of the full sorted list that fits.
        root: the directory to read instead of this Python's stdlib (for tests of the reader).
    """
    if max_bytes is not None and max_bytes <= 0:
        raise DataError(
            f"max_bytes={max_bytes} leaves no room for any document of the embedded corpus; "
            "pass a positive size in bytes (e.g. 1000000 for about 1 MB) or None for all of it."
        )
    root = Path(root) if root is not None else stdlib_root()
    total = 0
    for rel in corpus_files(root):
        try:
            text = _read_source(root / rel)
        except (OSError, UnicodeDecodeError, SyntaxError):
            # An unreadable or mis-encoded file is skipped the same way on every run.
            continue
        if not text.strip():
            continue
        size = len(text.encode("utf-8"))
        if max_bytes is not None and total + size > max_bytes:
            return
        total += size
        yield CorpusDocument(rel, text)


def embedded_corpus_documents(
    max_bytes: Optional[int] = None, root: Optional[Union[str, Path]] = None
) -> List[CorpusDocument]:
    """The corpus as a list of `CorpusDocument` (path + text); see `iter_corpus_documents`."""
    documents = list(iter_corpus_documents(max_bytes, root))
    if not documents:
        raise DataError(
            f"The embedded corpus is empty with max_bytes={max_bytes}: the first standard-library "
            f"file under '{root or stdlib_root()}' is already larger than that. Raise the cap "
            "(e.g. 1000000) or leave it unset for the whole corpus."
        )
    return documents


def embedded_corpus(max_bytes: Optional[int] = None) -> List[str]:
    """The corpus as a list of document texts, one per standard-library source file."""
    return [doc.text for doc in embedded_corpus_documents(max_bytes)]


def _content_hash(documents: List[CorpusDocument]) -> str:
    digest = hashlib.sha256()
    for doc in documents:
        for part in (doc.path, doc.text):
            encoded = part.encode("utf-8")
            digest.update(len(encoded).to_bytes(8, "little"))
            digest.update(encoded)
    return digest.hexdigest()


def write_embedded_corpus(
    path: Union[str, Path], max_bytes: Optional[int] = None, fmt: Optional[str] = None
) -> CorpusManifest:
    """Write the corpus to `path` and return what was written.

    Args:
        path: output file; its parent directory is created. Written under a temporary name and
            renamed at the end, so an existing file is replaced only by a complete new one.
        max_bytes: see `iter_corpus_documents`.
        fmt: `jsonl` or `txt`; by default from the suffix (`.txt` → txt, anything else → jsonl).
    """
    path = Path(path)
    fmt = fmt or ("txt" if path.suffix == ".txt" else "jsonl")
    if fmt not in ("jsonl", "txt"):
        raise DataError(
            f"Unknown corpus format '{fmt}' for '{path}'; use 'jsonl' (one JSON document per "
            "line, for tools/preprocess_data.py) or 'txt' (plain text, for tokenizer training)."
        )
    documents = embedded_corpus_documents(max_bytes)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8", newline="\n") as out:
            for doc in documents:
                if fmt == "jsonl":
                    out.write(json.dumps({"text": doc.text, "path": doc.path}, ensure_ascii=False))
                    out.write("\n")
                else:
                    out.write(doc.text if doc.text.endswith("\n") else doc.text + "\n")
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return CorpusManifest(
        path=str(path),
        format=fmt,
        num_documents=len(documents),
        num_bytes=sum(len(doc.text.encode("utf-8")) for doc in documents),
        sha256=_content_hash(documents),
        python_version=".".join(map(str, sys.version_info[:3])),
        stdlib_root=str(stdlib_root()),
    )


def build_parser():
    import argparse

    from spannorm_megatron.config.options import path_type

    parser = argparse.ArgumentParser(
        prog="python -m spannorm_megatron.data.corpus",
        description="Write the embedded corpus (Python stdlib sources) as JSONL or text.",
    )
    parser.add_argument("output", help="output file: .jsonl (documents) or .txt (plain text)",
                        type=path_type("output_file"))
    parser.add_argument("--max-bytes", type=int, default=None, help="size cap in bytes")
    return parser


def main(argv=None) -> int:
    """`python -m spannorm_megatron.data.corpus OUTPUT [--max-bytes N]`: write the corpus."""
    from spannorm_megatron.data.cli import run_cli

    def run(args_list):
        args = build_parser().parse_args(args_list)
        manifest = write_embedded_corpus(args.output, args.max_bytes)
        print(json.dumps(manifest.to_dict(), indent=2))
        return 0

    return run_cli(run, argv)


if __name__ == "__main__":
    sys.exit(main())
