"""Messages of a run through the standard `logging` module: the `lambdapipe` logger, one
line per record with a timestamp and a level name, on stderr (stdout carries the commands'
results). Snakemake's per-job log files then say when each line happened.

The CLI sets the level once per command, before the command runs, from
$LAMBDAPIPE_LOG_LEVEL (debug, info, warning, error; info by default), which a workflow
exports for every job (a bad value: one line, exit 2). Used as a library, the first message
installs the same stderr handler unless the `lambdapipe` logger already has one of its
caller's: then the caller's configuration decides where the lines go.
"""

from __future__ import annotations

import logging
import os
import sys

from lambdapipe.errors import UserError, bad_value

LOGGER = logging.getLogger("lambdapipe")
LEVEL_ENV = "LAMBDAPIPE_LOG_LEVEL"
LEVELS = ("debug", "info", "warning", "error")
FORMAT = "%(asctime)s %(levelname)s %(message)s"
DATE_FORMAT = "%Y-%m-%dT%H:%M:%S%z"  # ISO 8601 with the UTC offset: a log read elsewhere


class _Stderr(logging.StreamHandler):
    """sys.stderr as it is at each record, not when the handler was made: click's test
    runner and pytest's capture replace it between commands (as logging's own last-resort
    handler does)."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)
        self.setFormatter(logging.Formatter(FORMAT, DATE_FORMAT))

    @property
    def stream(self):  # noqa: ANN201 - the attribute StreamHandler writes to
        return sys.stderr


def level_from(name: str | None) -> int:
    """`name` (any case), else $LAMBDAPIPE_LOG_LEVEL, else info; one line naming the bad value
    and what is allowed otherwise."""
    raw = name if name is not None else (os.environ.get(LEVEL_ENV) or "info")
    if raw.strip().lower() not in LEVELS:
        raise bad_value("log level" if name is not None else f"${LEVEL_ENV}", raw, LEVELS)
    return getattr(logging, raw.strip().upper())


def configure(level: str | None = None) -> None:
    """One stderr handler on the `lambdapipe` logger at `level` (idempotent: a second call,
    as by a second command in one process, replaces the first's). Not propagated to the
    root logger, whose handlers would print each line twice."""
    for handler in [h for h in LOGGER.handlers if isinstance(h, _Stderr)]:
        LOGGER.removeHandler(handler)
    LOGGER.addHandler(_Stderr())
    LOGGER.setLevel(level_from(level))
    LOGGER.propagate = False


def emit(msg: str, level: str = "info") -> None:
    """Each line of `msg` as one record at `level` (a name of LEVELS), each with its own
    timestamp."""
    if not LOGGER.handlers:  # a library user's first message (the CLI configured already)
        try:
            configure()
        except UserError as exc:  # a bad $LAMBDAPIPE_LOG_LEVEL must not stop a run here
            configure("info")
            LOGGER.warning(f"{exc}; logging at info")
    for line in msg.splitlines() or [""]:
        LOGGER.log(getattr(logging, level.upper()), line)
