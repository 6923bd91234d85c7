"""User-facing errors: one line that names the bad value and what is allowed.

Library code raises `UserError` for a bad value given as input; the CLI turns it into a
click usage error (exit 2, with the usage line) so nobody sees a traceback for a mistake in
their input. `StateError` is a failure of what the input names rather than of the input
(a corrupt checkpoint, a dataset not prepared, a run directory another process owns, a
network down): one `Error:` line, exit 1, no usage block, as click does for runtime errors.
"""

from __future__ import annotations

from collections.abc import Iterable


class UserError(ValueError):
    """Bad input from the user (a name, a value, a file); the message is one line."""


class StateError(UserError):
    """The command line was fine but what it names is not usable (corrupt, missing, busy):
    the CLI prints one `Error:` line and exits 1, not a usage error. A UserError still, so
    callers that stop on bad input stop on it too."""


class TransferError(StateError):
    """A download failed through no fault of the command line (network, server)."""


def bad_value(what: str, value: object, allowed: str | Iterable[object]) -> UserError:
    """Build the house-style message: `invalid <what> <value>: expected <allowed>`."""
    if not isinstance(allowed, str):
        allowed = "one of " + ", ".join(str(a) for a in allowed)
    return UserError(f"invalid {what} {value!r}: expected {allowed}")
