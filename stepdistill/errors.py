"""User-facing errors: the CLI prints their message and exits, with no traceback."""


class StepdistillError(Exception):
    """A mistake the user can fix (bad config key, missing file, incompatible teacher)."""


class ConfigError(StepdistillError):
    """A config file or override that does not validate."""
