"""The engine's error for a person's mistake, shared by every module that reads their input."""
from __future__ import annotations


class InputError(ValueError):
    """The user's input cannot be used; the message says what is wrong and what to do.
    ``status``: the HTTP status the worker answers with (a subclass may say 403 or 404)."""

    status = 400
