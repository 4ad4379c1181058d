"""Errors for bad user input. Each message names the offending value and how to fix it."""


class ConfigError(ValueError):
    """A configuration value that cannot work."""


class ParallelLayoutError(ValueError):
    """Parallel sizes that cannot tile the world size or split the model."""
