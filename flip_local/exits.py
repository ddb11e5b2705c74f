"""The ``flip`` command's exit statuses (its ``--help`` lists them)."""

from __future__ import annotations

from flip_core.exits import ExitCode


class FlipExit(ExitCode):
    """What ``flip``'s exit status says; a script may test for these."""

    OK = 0, "done"
    FAILED = (
        1,
        (
            "it failed or does not hold, said in a sentence on stderr: a refusal, a failing cell, no local federation "
            "running (status), no token to revoke, a dataset's files differ (data verify), a run without a model"
        ),
    )
    USAGE = 2, "the command line is wrong (argparse says what)"
    DIFFERENT = 3, "rerun, compare: the two runs' metrics or models differ (what changed is printed)"


__all__ = ["FlipExit"]
