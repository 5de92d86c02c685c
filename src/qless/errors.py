"""Errors that reach the user.

Every error a user can cause (bad input data, bad settings, a datastore that does not match
the run) is a :class:`QlessError`. Its message names the file, line or field at fault and says
what to do. The command line prints the message as one paragraph and exits with code 2;
anything else escaping is a bug in qless and keeps its traceback.
"""

from __future__ import annotations


class QlessError(Exception):
    """A problem with the user's input or settings, with the fix in its message."""


class ConfigError(QlessError):
    """A setting is invalid or two settings contradict each other."""


class DataError(QlessError):
    """Input data is malformed: unreadable file, bad JSON, missing field, empty response."""


class StoreError(QlessError):
    """A datastore on disk is missing, corrupt, truncated or empty."""


class StoreMismatchError(StoreError):
    """Two datastores (or a store and the requested settings) differ in a field that must match."""


class ModelError(QlessError):
    """A model or adapter cannot be loaded or is unsupported in the requested configuration."""


class OutputError(QlessError):
    """An output cannot be written: it exists already, the folder is read-only, the disk is full."""


class BusyError(QlessError):
    """Another process is writing the same output right now."""


class UnsafeNameError(QlessError):
    """A name that would become a file or folder name could leave the output folder."""
