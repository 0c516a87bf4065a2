"""User-facing errors: the message names the file or field at fault and the fix."""

from __future__ import annotations


class ShortcutError(ValueError):
    """Bad input from the user (data, config, model choice). The CLI prints it as one line."""


class DataError(ShortcutError):
    """A dataset folder, metadata file, split or image that cannot be used as given."""


class ModelError(ShortcutError):
    """A model that cannot be built or does not fit the data."""
