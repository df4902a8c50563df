"""Errors raised by the prompt library."""


class LibraryError(ValueError):
    """A library operation was given input it cannot use (bad metadata, wrong backbone, ...)."""


class EntryNotFound(LibraryError, KeyError):
    """No entry has the requested id."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "entry not found"


class LibraryCorrupt(LibraryError):
    """The library on disk disagrees with its manifest (missing or altered object file)."""
