"""User-facing errors: the CLI prints them as one line and exits non-zero, without a traceback."""


class IouctlError(Exception):
    """A problem the user can fix (bad config, missing file, bad data): shown as one line, exit code 2."""

    exit_code = 2


class ConfigError(IouctlError, ValueError):
    """The composed configuration is invalid: unknown key or option, wrong type, missing path."""

