"""Errors a user can act on.

Every error slimkv raises on purpose is a :class:`SlimKVError`: its message says what was wrong, what
was expected and what to do. The CLI prints the message and exits with status 2 instead of a traceback.
"""

from __future__ import annotations


class SlimKVError(ValueError):
    """Base class of slimkv's user-facing errors (a ``ValueError``, so ``except ValueError`` works)."""


class ConfigError(SlimKVError):
    """Invalid configuration: a bad ratio or budget, an unknown method, conflicting options."""


class InputError(SlimKVError):
    """Invalid input: an empty prompt, a prompt longer than the model allows, a missing file."""


class ModelError(SlimKVError):
    """A model that cannot be found, loaded, or run by slimkv's cache."""
