"""The one error type of the data package, in its own module so every other module can raise it."""

from __future__ import annotations


class DataError(ValueError):
    """Data that cannot be used as given: the message names the file, the row and what to change."""
