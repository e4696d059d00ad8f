"""Errors of a cache folder that stage two (or `molt cache verify`) cannot use."""
from __future__ import annotations


class CacheError(ValueError):
    """A cache folder that stage two cannot use; the message names the path and the fix."""


class CacheCorruptError(CacheError):
    """Stored bytes fail their checksum or a required file is missing; the message names the
    array, the chunk, its rows and the file, and how to repair (rerun `molt extract`)."""
