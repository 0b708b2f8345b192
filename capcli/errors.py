"""Typed errors. Library code raises these with a one-line message; the CLI prints it and exits."""

from __future__ import annotations


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
