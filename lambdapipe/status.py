"""The statuses a finished run can end in (summary.json `status`), and how a metrics cell reads.

One definition that training writes and the report reads: the report imports no training
code, so without it a status added to training would reach the report as a malformed file
(and stop it). A leaf module: it imports nothing of lambdapipe (tests/test_architecture.py).
"""

from __future__ import annotations

import math

OK = "ok"
DIVERGED = "diverged"  # the training loss went non-finite at iteration `diverged_at`
NON_FINITE = "non-finite"  # training stayed finite, the final val pass or test on best.ckpt not
STATUSES = (OK, DIVERGED, NON_FINITE)
# The statuses that are no result: left out of every mean, named in the report.
FAILED = tuple(s for s in STATUSES if s != OK)


def finite(value) -> float | None:
    """A metrics.csv cell as a float, None where it is empty, unparsable or not finite: how
    the report and DVCLive's curves read a row that training wrote."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None
