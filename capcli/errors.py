"""Typed errors. Library code raises these with a one-line message; the CLI prints it and exits."""

from __future__ import annotations

import re

# Errors of writing a file that are the machine's state, not a bug: said in one line, never a traceback.
WRITE_ERRNOS = frozenset({5, 13, 27, 28, 30, 122})  # EIO EACCES EFBIG ENOSPC EROFS EDQUOT
# ... and of an output path that cannot be one (a folder where the file goes, a file where a folder should be, a
# name too long), where no library code checked it first: also one line.
PATH_ERRNOS = frozenset({17, 20, 21, 36})  # EEXIST ENOTDIR EISDIR ENAMETOOLONG


def os_reason(e: BaseException) -> str:
    """One line saying why a file operation failed: ``strerror`` (or HDF5's "error message"), else the text."""
    text = str(getattr(e, "strerror", None) or e)
    found = re.search(r"error message = '([^']+)'", text)  # HDF5: "... (file write failed: ..., error message = ..."
    return found.group(1) if found else (text.splitlines()[0] if text else type(e).__name__)


class CapcliError(Exception):
    """Base class: a user-facing, one-line error. ``exit_code`` is what the CLI returns."""

    exit_code = 1


class UsageError(CapcliError):
    """Arguments that do not fit together."""

    exit_code = 2


class DatasetError(CapcliError):
    """A dataset (source files or the canonical layout) is missing or malformed."""


class ImageError(CapcliError):
    """One image could not be read or decoded."""


class EncoderError(CapcliError):
    """An encoder is unknown or its weights are unavailable."""


class FeaturesError(CapcliError):
    """A features folder is missing, incomplete or from another encoder."""


class CheckpointError(CapcliError):
    """A checkpoint is missing, corrupt or incompatible."""


class FetchError(CapcliError):
    """A download or extraction failed."""


class EvaluateError(CapcliError):
    """Results or references cannot be scored."""


class GroundingError(CapcliError):
    """The ImageNet word table (grounded captions) is missing or malformed."""


class OutputError(CapcliError):
    """An output could not be written (full disk, permission, a folder that vanished); what was kept is said."""


class LockedError(CapcliError):
    """Another run is writing the same output."""
