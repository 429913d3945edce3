"""The project's one error base class and its few specialisations.

Every error a user can cause (bad flag, bad path, wrong model, corrupt store) is a
``ClipscopeError`` with a one-line message that names the thing at fault; the CLI turns it
into that line on stderr and exit code 2.
"""


class ClipscopeError(Exception):
    """Base class for every error clipscope raises on bad input or state."""


class ConfigError(ClipscopeError, ValueError):
    """A parameter or flag has an invalid value."""


class ModelError(ClipscopeError):
    """A model cannot be loaded or is not a supported architecture."""


class StoreError(ClipscopeError):
    """A store is missing, locked, corrupt or incompatible with the run."""


class DataError(ClipscopeError):
    """Input data (shards, URLs, sample indexes) cannot be read."""
