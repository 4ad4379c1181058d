"""Errors for bad user input, and for runs that failed though their input was fine. Each
message names the offending value (or what went wrong) and how to fix it.

Command-line tools catch `UserError`, print its message without a traceback and exit with 2;
a `RunFailure` the same way with exit status 1; anything else is a bug and keeps its traceback. Data errors name the file (and line, where there
is one), what is wrong with it, and how to fix it.
"""

import errno


class UserError(ValueError):
    """Input that cannot work: a flag, config, file or checkpoint the user gave."""


class ConfigError(UserError):
    """A configuration value that cannot work."""


class ParallelLayoutError(UserError):
    """Parallel sizes that cannot tile the world size or split the model."""


class DataError(UserError):
    """A data file, path or data setting that cannot work."""


class TokenizerError(DataError):
    """Tokenizer flags or files that cannot work: a missing or foreign flag, a model or folder
    that is missing or not what its type reads, text a NullTokenizer cannot read as ids."""


class InputFileError(DataError):
    """A text/JSONL input that is missing, unreadable or malformed (file and line named)."""


class IndexedDatasetError(DataError):
    """A Megatron `.bin`/`.idx` pair that is missing, truncated or inconsistent."""


class RunFailure(RuntimeError):
    """The run failed though its input was fine: training went non-finite, or the storage
    refused a checkpoint in mid-run. Not bad input (exit 1, not 2), and not a bug either: the
    message says what happened and what to do, without a traceback."""


STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES)
"""What a storage that refuses a write raises (no space, quota, file size limit, read-only,
permissions): the run failed though its input was fine, whichever command wrote."""
