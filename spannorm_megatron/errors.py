"""Errors for bad user input. Each message names the offending value and how to fix it.

Command-line tools catch `UserError`, print its message without a traceback and exit with 2;
anything else is a bug and keeps its traceback.
"""


class UserError(ValueError):
    """Input that cannot work: a flag, config, file or checkpoint the user gave."""


class ConfigError(UserError):
    """A configuration value that cannot work."""


class ParallelLayoutError(UserError):
    """Parallel sizes that cannot tile the world size or split the model."""
