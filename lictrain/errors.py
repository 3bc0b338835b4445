"""The one exception type users see: the CLI prints its message as a single line and exits non-zero."""


class LictrainError(Exception):
    """A problem with the user's input (path, config, file, data) rather than a bug in lictrain."""
