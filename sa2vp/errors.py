"""Exceptions a user can cause and fix, importable without loading torch (the CLI maps them to exit code 2)."""


class BackboneError(RuntimeError):
    """The backbone could not be built or loaded; the message says what to do about it."""
