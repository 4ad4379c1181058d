"""Errors for bad user input. Each message names the offending value and how to fix it.

Command-line tools catch `UserError`, print its message without a traceback and exit with 2;
anything else is a bug and keeps its traceback. Data errors name the file (and line, where there
is one), what is wrong with it, and how to fix it.
"""


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
