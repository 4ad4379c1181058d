"""The lab's compressed tables in docs/: gzip text written in place, atomically, and
byte-identical for identical text (no time stamp or file name in the gzip header), so exporting
an unchanged table again leaves no difference in the repository."""

from __future__ import annotations

import gzip
import os


def write_compressed(path: str, text: str) -> str:
    tmp = path + ".tmp"
    with open(tmp, "wb") as raw:
        with gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as f:
            f.write(text.encode("utf-8"))
    os.replace(tmp, path)
    return path


__all__ = ["write_compressed"]
