"""Errors for bad user input. Each message names the offending value and how to fix it."""


class ConfigError(ValueError):
    """A configuration value that cannot work."""
