"""Errors for bad data, tokenizer and input files.

Every message is one paragraph that names the file (and line, where there is one), says what is
wrong with it, and says how to fix it. The command-line tools print the message alone, without a
traceback, and exit with status 2 (see `spannorm_megatron.data.cli`).
"""

from spannorm_megatron.errors import UserError


class DataError(UserError):
    """A data file, path or data setting that cannot work."""


class TokenizerError(DataError):
    """Tokenizer flags or files that cannot work: a missing or foreign flag, a model or folder
    that is missing or not what its type reads, text a NullTokenizer cannot read as ids."""


class InputFileError(DataError):
    """A text/JSONL input that is missing, unreadable or malformed (file and line named)."""


class IndexedDatasetError(DataError):
    """A Megatron `.bin`/`.idx` pair that is missing, truncated or inconsistent."""
