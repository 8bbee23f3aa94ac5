"""The mistakes a user can make with data, each a `DataError` whose message names the file, setting or value
and what is allowed. The CLI turns any DataError into one line and exit code 2."""

from __future__ import annotations


class DataError(Exception):
    """A problem with a dataset, its files or its settings that the user can fix."""


class UnknownDatasetError(DataError, KeyError):
    """A dataset name that is not in the registry."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


class MissingDataError(DataError, FileNotFoundError):
    """A file or folder that should be there is not (including a manual download not yet done)."""


class ChecksumError(DataError):
    """A file whose checksum differs from the publisher's."""


class UnsafeArchiveError(DataError):
    """An archive member that would land outside the extraction folder."""


class CorruptImageError(DataError):
    """An image file that cannot be decoded (unreadable, truncated, not an image)."""


class SplitError(DataError):
    """Split lists that are malformed, inconsistent or leak images between train, val and test, or that cannot
    train and test a classifier (fewer than two classes, a class missing from a split the protocol fills)."""


class SplitMismatchError(DataError):
    """A prepared split folder that was made from other data or settings than the ones asked for."""


class UnsafePickleError(DataError):
    """A pickle file that asks for more than the data it should hold (it could run code when loaded)."""
