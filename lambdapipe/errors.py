"""User-facing errors: one line that names the bad value and what is allowed.

Library code raises `UserError`; the CLI turns it into a click usage error (exit 2) so
nobody sees a traceback for a mistake in their input.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(ValueError):
    """Bad input from the user (a name, a value, a file); the message is one line."""


def bad_value(what: str, value: object, allowed: str | Iterable[object]) -> UserError:
    """Build the house-style message: `invalid <what> <value>: expected <allowed>`."""
    if not isinstance(allowed, str):
        allowed = "one of " + ", ".join(str(a) for a in allowed)
    return UserError(f"invalid {what} {value!r}: expected {allowed}")
