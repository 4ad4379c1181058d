"""Which tokenizer made an indexed dataset: a sidecar beside Megatron-LM's files.

`spannorm-preprocess` writes ``<prefix>.tokenizer.json`` (the tokenizer's type, the digest of its
files and its vocabulary size) next to ``<prefix>.bin`` and ``<prefix>.idx``, which stay
byte-identical to Megatron-LM's. Token ids mean nothing without their tokenizer: data made with
one tokenizer and read with another of the same vocabulary size trains and evaluates without a
word, on wrong numbers. Training and evaluation therefore compare the tokenizer they were given
with the sidecar and refuse a mismatch, naming both. Data without a sidecar (made by Megatron-LM's
own tools) is read as before.
"""

from __future__ import annotations

import json
import os
from typing import Optional

from spannorm_megatron.errors import DataError

SUFFIX = ".tokenizer.json"


def sidecar_path(prefix: str) -> str:
    return prefix + SUFFIX


def write_sidecar(prefix: str, tokenizer_config, vocab_size: int) -> str:
    """Record the tokenizer that made `prefix` (atomically: a reader never sees half of it)."""
    from spannorm_megatron.data.tokenizer_args import tokenizer_sha256

    record = {"tokenizer_type": tokenizer_config.tokenizer_type,
              "tokenizer_sha256": tokenizer_sha256(tokenizer_config),
              "vocab_size": vocab_size, "tokenizer": tokenizer_config.describe()}
    path = sidecar_path(prefix)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(record, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_sidecar(prefix: str) -> Optional[dict]:
    try:
        with open(sidecar_path(prefix)) as f:
            record = json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as error:
        raise DataError(f"{sidecar_path(prefix)} cannot be read ({error}): it records which "
                        f"tokenizer made '{prefix}'. Preprocess the data again, or delete the "
                        f"file to read the data unchecked.") from None
    return record if isinstance(record, dict) else None


def check_data_tokenizer(prefix: str, tokenizer_config, sha256: Optional[str],
                         vocab_size: int, flag: str = "--data-path") -> None:
    """Refuse a tokenizer other than the one `prefix` was made with (see the module doc)."""
    record = read_sidecar(prefix)
    if record is None:
        return
    differ = [f"{name}: data {record.get(key)!r}, given {value!r}" for name, key, value in (
        ("type", "tokenizer_type", tokenizer_config.tokenizer_type),
        ("files", "tokenizer_sha256", sha256),
        ("vocabulary size", "vocab_size", vocab_size))
        if record.get(key) is not None and record.get(key) != value]
    if differ:
        raise DataError(
            f"{flag} {prefix} was made with another tokenizer ({record.get('tokenizer')}): "
            + "; ".join(differ) + f". Pass the tokenizer it was made with, or preprocess the "
            f"data with this one (its record: {sidecar_path(prefix)}).")
