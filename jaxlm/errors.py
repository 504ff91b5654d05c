"""jaxlm's exceptions: each message says what was wrong and what to do.

`jaxlm.cli.run` turns any of them into one line on stderr and exit status 2 (75 for StorageUnavailableError, where a
rerun may succeed).
"""


class JaxlmError(Exception):
    """Base class of the errors a user can cause and fix."""


class ConfigError(JaxlmError):
    """An invalid or inconsistent configuration."""


class DataError(JaxlmError):
    """A corpus, tokenizer or data file that cannot be used."""


class StorageError(JaxlmError):
    """A path that cannot be used: a missing bucket, missing permissions or credentials, a full disk."""


class StorageUnavailableError(StorageError):
    """Storage that could not be reached (a network failure, a service error): a later rerun may well succeed, so
    the command line exits with 75 (EX_TEMPFAIL) rather than 2."""


class RunInUseError(JaxlmError):
    """Another process holds the run directory's writer lock."""


class CheckpointError(JaxlmError, RuntimeError):
    """A checkpoint that is missing, unreadable, or from another configuration."""


class NonFiniteError(JaxlmError, FloatingPointError):
    """Training produced a non-finite loss or gradient norm."""
