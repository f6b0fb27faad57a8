"""samat's user-error type, importable without pydantic (status and collect start faster)."""


class ConfigError(ValueError):
    """A user error in a config file: the message is one line that names the problem and the fix."""
