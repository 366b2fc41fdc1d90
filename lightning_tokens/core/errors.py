"""The library's own user errors: a wrong option, an unreadable data file, an untrusted checkpoint.

Each message names the field, file or line and the fix. They subclass the built-in exception a caller
would expect (``ValueError``, ``FileNotFoundError``), and share :class:`LightningTokensError`, which the
``lightning-tokens`` command prints as one line (the traceback with ``--debug``); any other exception
is unexpected and keeps its traceback.

Example:
    >>> try:
    ...     raise ConfigError("ratio=1.5 must lie in (0, 1]: set e.g. ratio: 0.6.")
    ... except ValueError as error:
    ...     isinstance(error, LightningTokensError)
    True
"""

from __future__ import annotations

import pickle

__all__ = ["ConfigError", "DataError", "LightningTokensError", "MissingFileError", "UntrustedCheckpointError"]


class LightningTokensError(Exception):
    """Base class of the errors a user can fix from the message alone."""


class ConfigError(LightningTokensError, ValueError):
    """An option, or a combination of options, that cannot work."""


class DataError(LightningTokensError, ValueError):
    """A data or artifact file that cannot be read: the message names the file, the line and the field."""


class MissingFileError(LightningTokensError, FileNotFoundError):
    """A file the configuration names does not exist."""


class UntrustedCheckpointError(LightningTokensError, pickle.UnpicklingError):
    """A checkpoint holds a Python object outside the safe-loading allowlist."""
