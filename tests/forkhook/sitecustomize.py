"""Test-only: first on PYTHONPATH where a test runs Snakemake through the fork server
(tests/forkserver.py, `ForkServer.env`). A `python -m lambdapipe` process hands its command
to the server named in $LAMBDAPIPE_TEST_FORK_SERVER and exits as the command did; every
other Python process (Snakemake itself, DVC, git hooks) starts as usual."""

import os
import sys


def _relay() -> None:
    path = os.environ.get("LAMBDAPIPE_TEST_FORK_SERVER")
    if not path or sys.orig_argv[1:3] != ["-m", "lambdapipe"]:
        return
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    import forkserver

    forkserver.relay(path, sys.orig_argv[3:])  # never returns


_relay()
