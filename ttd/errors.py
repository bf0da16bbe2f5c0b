"""The exceptions and warnings of the library: everything a user can cause is a `TTDError`.

A caller catches `TTDError` for bad input or a bad model (a missing file, an unreadable image, a
refused export, an output in use) and lets anything else surface as the bug it is; the CLI maps
a `TTDError` to one line and exit status 2. Each concrete error also derives from the built-in
class it refines (ValueError, RuntimeError, ...), so older `except ValueError` code still works.
"""

from __future__ import annotations


class TTDError(Exception):
    """Base of every error the library raises for bad input, a bad model or a bad environment."""


class TTDWarning(UserWarning):
    """Base of the library's own warnings (an unfitted margin, a truncated caption, ...)."""


class InputError(TTDError, ValueError):
    """A value, file or setting the caller gave cannot be used; the message names it and says why."""


class RuntimeProblem(TTDError, RuntimeError):
    """This environment cannot do what was asked: a missing optional package, no GPU, a backend or
    engine that refused; the message says what to install or change."""
