"""Errors with one-line messages that name the file, the value and the fix."""

from __future__ import annotations


class Her2labError(Exception):
    """Base class: the message is one line a user can act on."""


class SlideError(Her2labError):
    """A slide cannot be opened or used (missing, unreadable, no mpp, no tissue)."""


class ManifestError(Her2labError):
    """The cohort manifest is malformed."""


class StaleCacheError(Her2labError):
    """A cached file was made with other parameters than the ones asked for."""


class OutputError(Her2labError):
    """An output location cannot be written."""
