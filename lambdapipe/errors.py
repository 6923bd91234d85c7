"""User-facing errors: one line that names the bad value and what is allowed.

Library code raises `UserError`; the CLI turns it into a click usage error (exit 2) so
nobody sees a traceback for a mistake in their input. `TransferError`, a failure of the world
rather than of the input (network down, a server's bad bytes), is one line with exit 1.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(ValueError):
    """Bad input from the user (a name, a value, a file); the message is one line."""


class TransferError(UserError):
    """A download failed through no fault of the command line (network, server): the CLI
    prints one `Error:` line and exits 1, not a usage error. A UserError still, so callers
    that stop on bad input stop on it too."""


def bad_value(what: str, value: object, allowed: str | Iterable[object]) -> UserError:
    """Build the house-style message: `invalid <what> <value>: expected <allowed>`."""
    if not isinstance(allowed, str):
        allowed = "one of " + ", ".join(str(a) for a in allowed)
    return UserError(f"invalid {what} {value!r}: expected {allowed}")
