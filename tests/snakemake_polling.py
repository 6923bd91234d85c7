"""Test-only: `python tests/snakemake_polling.py ARGS` is `snakemake ARGS` with the SLURM
executor's status polling capped at POLL_S seconds between two checks.

snakemake-executor-plugin-slurm (2.8) waits `init_seconds_before_status_checks` after a check
that saw a job finish and 10 s more after every check that saw none (up to 180 s): a job of
the test grid that takes 15 s is seen finished up to 20 s late, and the grid's stages wait
on each other. The plugin has no setting for the step; this sets what it writes
(`next_seconds_between_status_checks`, snakemake-interface-executor-plugins'
RemoteExecutor) to at most POLL_S. Submission, the status queries (`squeue`) and what they
decide are the plugin's own, unchanged; every job still runs inside SLURM
(tests/test_slurm.py)."""

import sys

from snakemake_interface_executor_plugins.executors.remote import RemoteExecutor

POLL_S = 2

_interval = RemoteExecutor.next_seconds_between_status_checks
RemoteExecutor.next_seconds_between_status_checks = _interval.setter(
    lambda self, seconds: _interval.fset(self, min(seconds, POLL_S)))

if __name__ == "__main__":
    from snakemake.cli import main

    sys.argv[0] = "snakemake"
    sys.exit(main())
