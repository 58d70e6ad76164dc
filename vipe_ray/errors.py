"""Errors every layer raises: a configuration that cannot be used."""


class ConfigError(ValueError):
    """A configuration file or value that cannot be used; the message names the file and key."""
